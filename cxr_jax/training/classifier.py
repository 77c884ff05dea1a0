"""ResNet-50 COVID / normal / viral-pneumonia classifier, from scratch or by ImageNet transfer.

It runs on the machinery pix2pix uses (mesh, device-resident uint8 data, `lax.scan` chunks,
Orbax, TensorBoard). Training data is `original` (the real training split) or `enhanced` (plus
synthetic COVID images with provenance); validation and test are real images only. Each epoch ends
with a validation pass; the checkpoint with the best validation macro-F1 is the one evaluated on
the test split and exported.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from cxr_jax import configlib
from cxr_jax.errors import ConfigError, UserError
from cxr_jax.models import pretrained as pretrained_lib
from cxr_jax.models.resnet import ResNet
from cxr_jax.training import augment as augment_lib
from cxr_jax.training import export
from cxr_jax.training import loop
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training import sampling
from cxr_jax.training.checkpoint import Checkpointer
from cxr_jax.training import functional
from cxr_jax.training.functional import Functional
from cxr_jax.training.summary import SummaryWriter

CLASSIFIER_DIR = "classifier"
# Scratch models see [0, 1] intensities standardised with these (roughly a radiograph's statistics).
SCRATCH_MEAN, SCRATCH_STD = 0.5, 0.25


@flax.struct.dataclass
class State:
  step: jax.Array
  rng: jax.Array
  params: Any
  stats: Any
  opt: Any




@dataclasses.dataclass(frozen=True)
class InputSpec:
  """How uint8 radiographs become network input: size, and the normalisation the weights expect."""
  image_size: int
  in_channels: int
  weights_preprocess: Any = None  # pretrained_lib's description, or None for scratch

  def __call__(self, x01: jax.Array) -> jax.Array:
    """float [B, S, S, 1] in [0, 1] -> normalised network input."""
    if self.weights_preprocess is None:
      x = (x01 - SCRATCH_MEAN) / SCRATCH_STD
      return jnp.repeat(x, self.in_channels, axis=-1) if x.shape[-1] == 1 else x
    return pretrained_lib.normalize(x01, self.weights_preprocess, self.in_channels)


def build_model(model_cfg: ml_collections.ConfigDict, num_classes: int, compute_dtype: str,
                seed: int, pretrained_path: str = "") -> tuple[ResNet, Any, dict]:
  """The ResNet, with ImageNet weights applied when `pretrained_path` is given. The architecture
  (variant, depth, width) then follows the weights file. Returns (model, the weights'
  preprocessing or None, the architecture actually built)."""
  arch = {"variant": model_cfg.variant, "stage_sizes": tuple(model_cfg.stage_sizes),
          "width": model_cfg.width}
  weights = None
  if pretrained_path:
    weights = pretrained_lib.load_imagenet_resnet50(pretrained_path)
    arch = {"variant": weights.variant, "stage_sizes": tuple(weights.stage_sizes),
            "width": weights.width}
  dtype = configlib.compute_dtype(compute_dtype)
  model = functional.build(
      lambda rngs: ResNet(num_classes=num_classes, in_channels=model_cfg.in_channels,
                          rngs=rngs, dtype=dtype, **arch), seed)
  if weights is not None:
    pretrained_lib.apply_pretrained(model, weights, in_channels=model_cfg.in_channels)
    return model, weights.preprocess, arch
  return model, None, arch


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int):
  """SGD with momentum (Nesterov) or AdamW; linear warm-up then cosine decay; decay on kernels."""
  warmup = min(config.warmup_epochs * steps_per_epoch, max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total_steps,
                                                end_value=0.0)
  kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
  if config.optimizer == "sgd":
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=kernels),
                     optax.sgd(schedule, momentum=config.momentum, nesterov=True))
  elif config.optimizer == "adamw":
    tx = optax.adamw(schedule, weight_decay=config.weight_decay, mask=kernels)
  else:
    raise ConfigError(f"config.optimizer: {config.optimizer!r} is not 'sgd' or 'adamw'")
  return tx, schedule


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """'Balanced' weights n / (K * n_c): the classical answer to class imbalance, a baseline
  against GAN enhancement."""
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
  return weights.astype(np.float32)


def loss_fn(logits: jax.Array, labels: jax.Array, *, num_classes: int, label_smoothing: float,
            weights: jax.Array | None) -> jax.Array:
  """Cross-entropy with optional label smoothing and per-class weights (mean over the batch)."""
  onehot = jax.nn.one_hot(labels, num_classes)
  targets = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
  losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  if weights is not None:
    losses = losses * weights[labels]
  return jnp.mean(losses)


class Classifier:
  """Networks, optimiser and compiled functions of one classifier config on one mesh."""

  def __init__(self, config: ml_collections.ConfigDict, *, num_classes: int,
               steps_per_epoch: int, total_steps: int, mesh: jax.sharding.Mesh,
               weights: np.ndarray | None):
    self.config, self.mesh, self.num_classes = config, mesh, num_classes
    self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
    model, weights_pre, self.arch = build_model(config.model, num_classes, config.compute_dtype,
                                                config.seed, config.pretrained)
    self.net, params, stats = Functional.split(model)
    self._init = (params, stats)
    self.preprocess = InputSpec(config.image_size, config.model.in_channels, weights_pre)
    self.tx, self.schedule = make_optimizer(config, total_steps, steps_per_epoch)
    self.augment = augment_lib.AugmentSpec.from_config(config.augment, config.image_size)
    self.class_w = None if weights is None else jnp.asarray(weights)
    self.freeze_steps = config.freeze_backbone_epochs * steps_per_epoch
    self._head_mask = jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(p, "key", None) == "fc" for p in path), params)
    rep, batch = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
    self._batch_sharding = batch
    self.chunk = jax.jit(self._chunk, static_argnums=3, donate_argnums=0,
                         in_shardings=(rep, rep, rep), out_shardings=(rep, rep))
    self.predict_batch = jax.jit(self._predict, in_shardings=(rep, rep, batch),
                                 out_shardings=batch)

  def init_state(self) -> State:
    params, stats = self._init
    state = State(step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(self.config.seed),
                  params=params, stats=stats, opt=self.tx.init(params))
    # Copies: the first chunk donates the state, which must not delete the kept initial values.
    return mesh_lib.put_replicated(jax.tree.map(jnp.copy, state), self.mesh)

  def inputs(self, images_u8: jax.Array, key: jax.Array | None) -> jax.Array:
    """Augmented (training, with a key) or resized (evaluation) and normalised network input."""
    x = (augment_lib.augment(images_u8, key, self.augment) if key is not None
         else augment_lib.resize(images_u8, self.config.image_size))
    return self.preprocess(x)

  def train_step(self, state: State, images_u8: jax.Array, labels: jax.Array,
                 key: jax.Array) -> tuple[State, dict[str, jax.Array]]:
    x = jax.lax.with_sharding_constraint(self.inputs(images_u8, key), self._batch_sharding)

    def objective(params):
      logits, stats = self.net.apply(params, state.stats, x, train=True)
      loss = loss_fn(logits, labels, num_classes=self.num_classes,
                     label_smoothing=self.config.label_smoothing, weights=self.class_w)
      return loss, (stats, logits)

    (loss, (stats, logits)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt = self.tx.update(grads, state.opt, state.params)
    if self.freeze_steps:
      train_backbone = (state.step >= self.freeze_steps).astype(jnp.float32)
      # Frozen: the backbone's weights stay; its BatchNorm statistics keep tracking the radiograph
      # batches they normalise, so that evaluation sees the statistics the head was trained on.
      updates = jax.tree.map(lambda u, head: u if head else u * train_backbone.astype(u.dtype),
                             updates, self._head_mask)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "accuracy": jnp.mean((jnp.argmax(logits, -1) == labels)
                                                  .astype(jnp.float32)),
               "grad_norm": optax.tree.norm(grads),
               "learning_rate": jnp.asarray(self.schedule(state.step), jnp.float32)}
    return state.replace(step=state.step + 1, params=params, stats=stats, opt=opt), metrics

  def sample_batch(self, step: jax.Array, rng: jax.Array, images: jax.Array,
                   labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The batch of `step`: a slice of this epoch's seeded permutation of the training set."""
    idx = sampling.epoch_batch(rng, step, images.shape[0], self.config.batch_size,
                               self.steps_per_epoch)
    return images[idx], labels[idx]

  def _chunk(self, state: State, images: jax.Array, labels: jax.Array, num_steps: int):
    def body(st, _):
      batch_images, batch_labels = self.sample_batch(st.step, st.rng, images, labels)
      return self.train_step(st, batch_images, batch_labels, jax.random.fold_in(st.rng, st.step))

    return jax.lax.scan(body, state, None, length=num_steps)

  def _predict(self, params, stats, images_u8):
    logits, _ = self.net.apply(params, stats, self.inputs(images_u8, None), train=False)
    return jax.nn.softmax(logits)

  def predict(self, params, stats, images_u8: np.ndarray) -> np.ndarray:
    """Class probabilities [N, K] for uint8 images, in fixed-size (padded) batches."""
    return mesh_lib.map_batches(lambda x: self.predict_batch(params, stats, x), (images_u8,),
                                self.config.eval_batch_size, self.mesh)


# ----------------------------------------------------------------------------------- export


@dataclasses.dataclass
class TrainedClassifier:
  """An exported classifier: probabilities, pooled features (for FID) and Grad-CAM inputs."""
  meta: dict
  net: Functional
  params: Any
  stats: Any
  preprocess: InputSpec

  def __post_init__(self):
    self._probs = jax.jit(self._probs_fn)
    self._feats = jax.jit(self._feats_fn)

  def network_input(self, images_u8):
    return self.preprocess(augment_lib.resize(images_u8, self.preprocess.image_size))

  def _probs_fn(self, params, stats, images_u8):
    logits, _ = self.net.apply(params, stats, self.network_input(images_u8), train=False)
    return jax.nn.softmax(logits)

  def _feats_fn(self, params, stats, images_u8):
    fmap, _ = self.net.apply(params, stats, self.network_input(images_u8), train=False,
                             method="features")
    return jnp.mean(fmap.astype(jnp.float32), axis=(1, 2))

  def predict(self, images_u8: np.ndarray, batch_size: int = 64) -> np.ndarray:
    mesh = mesh_lib.make_mesh()
    params, stats = mesh_lib.put_replicated((self.params, self.stats), mesh)
    return mesh_lib.map_batches(lambda x: self._probs(params, stats, x), (images_u8,),
                                batch_size, mesh)

  def features(self, images_u8: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Globally pooled last-stage features, [N, 2048] for ResNet-50."""
    mesh = mesh_lib.make_mesh()
    params, stats = mesh_lib.put_replicated((self.params, self.stats), mesh)
    return mesh_lib.map_batches(lambda x: self._feats(params, stats, x), (images_u8,),
                                batch_size, mesh)

  def feature_and_head_fns(self):
    """(features_fn, head_fn) over network input, for Grad-CAM."""
    def features_fn(x):
      return self.net.apply(self.params, self.stats, x, train=False, method="features")[0]

    def head_fn(fmap):
      return self.net.apply(self.params, self.stats, fmap, method="head")[0]
    return features_fn, head_fn


def export_classifier(directory: pathlib.Path, model: Classifier, params, stats, meta: dict):
  cfg = model.config
  meta = dict(meta, kind="classifier", class_names=list(meta["class_names"]),
              model=dict(cfg.model.to_dict(), **model.arch),
              image_size=cfg.image_size, compute_dtype=cfg.compute_dtype,
              weights_preprocess=(None if model.preprocess.weights_preprocess is None else
                                  pretrained_lib.preprocess_to_json(
                                      model.preprocess.weights_preprocess)))
  export.save(directory, params, stats, meta)


def load_classifier(directory: str | pathlib.Path) -> TrainedClassifier:
  meta = export.read_meta(directory, "classifier")
  model_cfg = ml_collections.ConfigDict(meta["model"])
  model = functional.build(
      lambda rngs: ResNet(num_classes=len(meta["class_names"]), in_channels=model_cfg.in_channels,
                          stage_sizes=tuple(model_cfg.stage_sizes), width=model_cfg.width,
                          variant=model_cfg.variant, rngs=rngs,
                          dtype=configlib.compute_dtype(meta["compute_dtype"])), 0, abstract=True)
  net, params, stats = Functional.split(model)
  export.restore_into(directory, params, stats)
  pre = meta.get("weights_preprocess")
  preprocess = InputSpec(meta["image_size"], model_cfg.in_channels,
                         pretrained_lib.preprocess_from_json(pre) if pre else None)
  return TrainedClassifier(meta=meta, net=net, params=params, stats=stats, preprocess=preprocess)


# ------------------------------------------------------------------------------------- task


def validate(config: ml_collections.ConfigDict) -> None:
  for key in ("batch_size", "eval_batch_size", "num_epochs", "steps_per_call", "log_every",
              "keep_checkpoints", "image_size", "model.width", "model.in_channels"):
    configlib.require_positive_int(config, key)
  configlib.require(config.train_data in ("original", "enhanced"), "train_data",
                    f"{config.train_data!r} is not 'original' or 'enhanced'")
  configlib.require(config.train_data != "enhanced" or bool(config.synthetic_dir),
                    "synthetic_dir", "train_data='enhanced' needs the folder written by the "
                    "synthesize task (its manifest.csv)")
  configlib.require(0.0 <= config.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
  configlib.require(config.learning_rate > 0, "learning_rate", "must be > 0")
  configlib.require(0 <= config.freeze_backbone_epochs <= config.num_epochs,
                    "freeze_backbone_epochs", "must be between 0 and num_epochs")
  configlib.require(config.model.in_channels in (1, 3), "model.in_channels", "must be 1 or 3")
  configlib.require(config.image_size <= config.data.image_size, "image_size",
                    f"must not exceed the prepared data's size (data.image_size="
                    f"{config.data.image_size})")
  configlib.compute_dtype(config.compute_dtype)


def training_set(config, splits) -> Any:
  """The real training split, plus the synthetic images for `enhanced` (leakage-checked)."""
  from cxr_jax.data import enhanced  # pylint: disable=import-outside-toplevel
  train = splits["train"]
  if config.train_data == "enhanced":
    synthetic = enhanced.load_synthetic_set(config.synthetic_dir, splits,
                                            image_size=config.data.image_size)
    logging.info("Enhanced training set: %d real + %d synthetic images (%s)", len(train),
                 len(synthetic), config.synthetic_dir)
    train = enhanced.concatenate(train, synthetic)
  return train


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """The `classifier` task: trains, keeps the best checkpoint, evaluates it on the test split."""
  from cxr_jax.data import dataset  # pylint: disable=import-outside-toplevel
  from cxr_jax.evaluation import report_classifier  # pylint: disable=import-outside-toplevel

  validate(config)
  workdir = pathlib.Path(workdir)
  mesh = mesh_lib.make_mesh(config.get("num_devices") or None)
  mesh_lib.check_global_batch(config.batch_size, mesh)
  mesh_lib.check_global_batch(config.eval_batch_size, mesh, "eval_batch_size")
  splits = dataset.load_splits(config.data, workdir)
  train = training_set(config, splits)
  class_names = train.class_names
  if len(train) < config.batch_size:
    raise UserError(f"config.batch_size: {config.batch_size} is larger than the training set "
                    f"({len(train)} images)")
  steps_per_epoch = len(train) // config.batch_size
  total_steps = config.num_epochs * steps_per_epoch
  logging.info("classifier (%s, %s): %d training images %s, %d steps/epoch, %d steps",
               config.train_data, "transfer" if config.pretrained else "scratch", len(train),
               train.counts(), steps_per_epoch, total_steps)
  weights = (class_weights(train.labels, len(class_names)) if config.class_weighted_loss
             else None)
  model = Classifier(config, num_classes=len(class_names), steps_per_epoch=steps_per_epoch,
                     total_steps=total_steps, mesh=mesh, weights=weights)
  state = model.init_state()
  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints,
                      best_metric="macro_f1")
  restored, start = ckpt.restore_latest(state)
  if restored is not None:
    state = restored
    logging.info("Resumed from %s at step %d", ckpt.directory, start)
  images_dev, labels_dev = mesh_lib.put_replicated(
      (train.images, train.labels.astype(np.int32)), mesh)
  writer = SummaryWriter(workdir / "tensorboard")
  try:  # closed also when training stops on an error (its event file is flushed)
    val = splits["val"]

    def evaluate(step, st):
      from sklearn.metrics import f1_score  # pylint: disable=import-outside-toplevel
      probs = model.predict(st.params, st.stats, val.images)
      pred = probs.argmax(-1)
      return {"accuracy": float(np.mean(pred == val.labels)),
              "macro_f1": float(f1_score(val.labels, pred, average="macro",
                                         labels=list(range(len(class_names))), zero_division=0))}

    # Chunks of a length dividing the epoch, and logs on chunk boundaries: one compiled program.
    k = max(d for d in range(1, min(config.steps_per_call, steps_per_epoch) + 1)
            if steps_per_epoch % d == 0)
    state = loop.run(
        state, chunk_fn=lambda st, n: model.chunk(st, images_dev, labels_dev, n),
        schedule=loop.Schedule(total_steps=total_steps, steps_per_call=k,
                               log_every=-(-config.log_every // k) * k,
                               checkpoint_every=steps_per_epoch, eval_every=steps_per_epoch),
        start_step=start or 0, checkpointer=ckpt, writer=writer, name="classifier",
        images_per_step=config.batch_size, eval_fn=evaluate,
        memory_hint=f"lower config.batch_size (now {config.batch_size}) or config.image_size "
                    f"(now {config.image_size}), or use config.compute_dtype='bfloat16'")
    best, best_step = ckpt.restore_best(state)
    best = state if best is None else best
    ckpt.close()
    logging.info("Best validation macro-F1 at step %s; evaluating it on the test split", best_step)
    meta = {"class_names": class_names, "train_data": config.train_data,
            "pretrained": config.pretrained, "best_step": best_step,
            "train_counts": train.counts(), "workdir": str(workdir),
            "data_image_size": config.data.image_size}
    export_classifier(workdir / CLASSIFIER_DIR, model, best.params, best.stats, meta)
    trained = load_classifier(workdir / CLASSIFIER_DIR)
    result = report_classifier.evaluate_on_test(trained, splits["test"], workdir,
                                                title=config.name, num_gradcam=config.num_gradcam,
                                                n_bootstrap=config.n_bootstrap,
                                                train_hashes=train.hashes)
    writer.scalars(total_steps, {f"test/{k}": v for k, v in result["summary"].items()})
  finally:
    writer.close()
  return result
