"""ResNet-50 COVID / normal / viral-pneumonia classifier, from scratch or by ImageNet transfer.

`fit` runs the training; this file holds the network and its ImageNet weights, the loss, the
optimiser (with backbone freezing), the step, the batch sampling, the per-epoch validation (whose
macro-F1 picks the checkpoint that is exported) and the export metadata. Training data is
`original` (the real training split) or `enhanced` (plus synthetic COVID images with provenance);
validation is real images only. The test evaluation is the task layer's
(`cxr_jax.pipeline.classify`).
"""

from __future__ import annotations

import pathlib
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from sklearn.metrics import f1_score

from cxr_jax import configlib
from cxr_jax import console
from cxr_jax.data.dataset import ImageSet
from cxr_jax.errors import ConfigError, UserError
from cxr_jax.models import build
from cxr_jax.models import pretrained as pretrained_lib
from cxr_jax.training import augment as augment_lib
from cxr_jax.training import export
from cxr_jax.training import fit
from cxr_jax.training import loop
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training import sampling
from cxr_jax.training import stream as stream_lib
from cxr_jax.training.fit import NetState
from cxr_jax.training.functional import Functional

CLASSIFIER_DIR = "classifier"
HEAD = "fc"  # the classification layer; the rest is the backbone that freezing holds


@flax.struct.dataclass
class State:
  step: jax.Array
  rng: jax.Array
  net: NetState


def load_pretrained(path: str) -> pretrained_lib.PretrainedWeights:
  """`config.pretrained`: a classifier export of ours (its folder) or a ResNet weight file."""
  p = pathlib.Path(path).expanduser()
  return export.classifier_weights(p) if p.is_dir() else pretrained_lib.load_imagenet_resnet50(p)


def build_model(config: ml_collections.ConfigDict,
                class_names: tuple[str, ...]) -> tuple[Any, Any, dict]:
  """The ResNet, with pretrained weights applied when `config.pretrained` is given (the
  architecture then follows the weights, the first conv is adapted to `model.in_channels`).
  The head is loaded only from an export of ours with the same classes, else initialised afresh.
  Returns (model, the weights' preprocessing or None, the architecture built)."""
  m = config.model
  arch = {"variant": m.variant, "stage_sizes": list(m.stage_sizes), "width": m.width,
          "in_channels": m.in_channels}
  weights = None
  if config.pretrained:
    weights = load_pretrained(config.pretrained)
    arch.update(variant=weights.variant, stage_sizes=list(weights.stage_sizes),
                width=weights.width)
  model = build.build_resnet(arch, num_classes=len(class_names),
                             compute_dtype=config.compute_dtype, seed=config.seed)
  if weights is None:
    return model, None, arch
  load_head = weights.class_names == tuple(class_names)
  if weights.in_channels != m.in_channels:
    logging.info("config.pretrained: the first conv of %s is adapted from %d to %d input "
                 "channel(s) (%s), so that a gray image gets the same response", weights.path,
                 weights.in_channels, m.in_channels,
                 "summed" if m.in_channels == 1 else "replicated / 3", extra=console.FILE_ONLY)
  if not load_head:
    head = (f"its {weights.num_classes}-class head" if weights.num_classes else "it has no head")
    named = (f" ({', '.join(weights.class_names)})" if weights.class_names else "")
    # On the console when the source names its classes (an export of ours): a user may have
    # expected its head; an ImageNet head is always replaced.
    logging.info("config.pretrained: %s: %s%s; this run's head (%s) is initialised afresh",
                 weights.path, head, named, ", ".join(class_names),
                 extra=None if weights.class_names else console.FILE_ONLY)
  pretrained_lib.apply_pretrained(model, weights, in_channels=m.in_channels, load_head=load_head)
  # A scratch-trained export's standardisation is the scratch input: the same input spec.
  return model, None if weights.preprocess == build.SCRATCH else weights.preprocess, arch


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int):
  """SGD with momentum (Nesterov) or AdamW; linear warm-up then cosine decay; decay on kernels.

  During the first `freeze_backbone_epochs` the backbone's transformation is masked out
  (`conditionally_mask`): its updates are zero and its optimiser state (momentum, Adam moments,
  weight decay) does not move, so nothing frozen accumulates. The learning rate follows the
  global step for both parts."""
  warmup = min(config.warmup_epochs * steps_per_epoch, max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total_steps,
                                                end_value=0.0)
  kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
  if config.optimizer == "sgd":   # optax.sgd without its learning rate (applied last)
    core = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=kernels),
                       optax.trace(decay=config.momentum, nesterov=True))
  elif config.optimizer == "adamw":  # optax.adamw without its learning rate
    core = optax.chain(optax.scale_by_adam(),
                       optax.add_decayed_weights(config.weight_decay, mask=kernels))
  else:
    raise ConfigError(f"config.optimizer: {config.optimizer!r} is not 'sgd' or 'adamw'")
  freeze_steps = config.freeze_backbone_epochs * steps_per_epoch
  if freeze_steps:
    core = optax.multi_transform(
        {"head": core,
         "backbone": optax.transforms.conditionally_mask(core, lambda n: n >= freeze_steps)},
        head_or_backbone)
  return optax.chain(core, optax.scale_by_learning_rate(schedule)), schedule


def head_or_backbone(params: Any) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "head" if any(getattr(p, "key", None) == HEAD for p in path)
      else "backbone", params)


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
  """Network, optimiser, step and validation of one classifier config on one mesh (a
  fit.Trainer)."""
  name = "classifier"

  def __init__(self, config: ml_collections.ConfigDict, *, class_names: tuple[str, ...],
               steps_per_epoch: int, total_steps: int, mesh: jax.sharding.Mesh,
               weights: np.ndarray | None = None, val: ImageSet | None = None,
               run_info: dict | None = None, schedule_epoch: int | None = None):
    """`steps_per_epoch` is one pass over the training images (batch order); `schedule_epoch`
    (default: the same) the steps the learning-rate schedule and the freezing count as an epoch,
    which a fixed training budget makes equal for every training set (`run_setup`)."""
    self.config, self.mesh, self.class_names = config, mesh, tuple(class_names)
    self.num_classes = len(class_names)
    self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
    schedule_epoch = schedule_epoch or steps_per_epoch
    model, weights_pre, self.arch = build_model(config, self.class_names)
    self.net, params, stats = Functional.split(model)
    self._init = (params, stats)
    self.input_spec = build.InputSpec(config.image_size, config.model.in_channels, weights_pre,
                                      float(config.data.get("hide_center", 0.0)))
    self.tx, self.schedule = make_optimizer(config, total_steps, schedule_epoch)
    self.augment = augment_lib.AugmentSpec.from_config(config.augment, config.image_size)
    self.class_w = None if weights is None else jnp.asarray(weights)
    self._batch_sharding = mesh_lib.batch_sharding(mesh)
    self.exported = export.Exported(self.export_meta(), self.net, None, None, mesh)
    self.val, self.run_info = val, dict(run_info or {})

  def init_state(self) -> State:
    params, stats = self._init
    return State(step=jnp.zeros((), jnp.int32), rng=jax.random.key(self.config.seed),
                 net=NetState.create(params, stats, self.tx))

  def inputs(self, images_u8: jax.Array, key: jax.Array) -> jax.Array:
    """Augmented and normalised network input; the hidden centre (if any) is blacked out on the
    stored image first, as at inference (`export.network_input`)."""
    images_u8 = augment_lib.hide_center(images_u8, self.input_spec.hide_center)
    return self.input_spec(augment_lib.augment(images_u8, key, self.augment))

  def batch_indices(self, rng: jax.Array, step: jax.Array,
                    sizes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The (image, label) indices of `step` (`fit.Trainer`): a slice of this epoch's seeded
    permutation of the training set."""
    idx = sampling.epoch_batch(rng, step, sizes[0], self.config.batch_size, self.steps_per_epoch)
    return idx, idx

  def train_step(self, state: State, data: tuple[jax.Array, jax.Array]):
    return fit.resident_step(self, state, data)

  def train_on_batch(self, state: State, batch: tuple[jax.Array, jax.Array]):
    """One step on the uint8 images and labels of `state.step` (augmented on the device)."""
    images_u8, labels = batch
    key = jax.random.fold_in(state.rng, state.step)
    x = jax.lax.with_sharding_constraint(self.inputs(images_u8, key), self._batch_sharding)

    def objective(params):
      logits, stats = self.net.apply(params, state.net.stats, x, train=True)
      loss = loss_fn(logits, labels, num_classes=self.num_classes,
                     label_smoothing=self.config.label_smoothing, weights=self.class_w)
      return loss, (stats, logits)

    # Frozen backbone: its weights stay (the optimiser); its BatchNorm statistics keep tracking
    # the radiograph batches they normalise, so evaluation sees the statistics the head saw.
    (loss, (stats, logits)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.net.params)
    metrics = {"loss": loss, "accuracy": jnp.mean((jnp.argmax(logits, -1) == labels)
                                                  .astype(jnp.float32)),
               "grad_norm": optax.tree.norm(grads),
               "learning_rate": jnp.asarray(self.schedule(state.step), jnp.float32)}
    return state.replace(step=state.step + 1,
                         net=state.net.apply_gradients(grads, stats)), metrics

  def validate(self, step: int, state: State) -> dict[str, float]:
    """Accuracy and macro-F1 on the validation split (the best checkpoint's criterion)."""
    del step
    probs = self.exported.with_weights(state.net.params, state.net.stats).predict(
        self.val.images, self.config.eval_batch_size)
    pred = probs.argmax(-1)
    return {"accuracy": float(np.mean(pred == self.val.labels)),
            "macro_f1": float(f1_score(self.val.labels, pred, average="macro",
                                       labels=list(range(self.num_classes)), zero_division=0))}

  def export_meta(self) -> dict:
    cfg = self.config
    return {"kind": export.CLASSIFIER, "class_names": list(self.class_names), "arch": self.arch,
            "input": self.input_spec.to_json(), "image_size": cfg.image_size,
            "compute_dtype": cfg.compute_dtype, "model": cfg.model.to_dict()}

  def export(self, workdir: pathlib.Path, state: State, step: int) -> None:
    logging.info("Exporting the classifier of step %s (best validation macro-F1)", step,
                 extra=console.FILE_ONLY)
    meta = dict(self.export_meta(), best_step=int(step), final_step=self.total_steps,
                **self.run_info)
    export.save(workdir / CLASSIFIER_DIR, state.net.params, state.net.stats, meta,
                self.config)


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
  train_steps = config.get("train_steps", 0)
  configlib.require(isinstance(train_steps, int) and not isinstance(train_steps, bool)
                    and train_steps >= 0, "train_steps",
                    f"must be a whole number of optimizer steps >= 0 (0: num_epochs passes over "
                    f"the training set), got {train_steps!r}")
  configlib.require(0 <= config.freeze_backbone_epochs <= config.num_epochs,
                    "freeze_backbone_epochs", "must be between 0 and num_epochs")
  configlib.require(config.model.in_channels in (1, 3), "model.in_channels", "must be 1 or 3")
  configlib.require(config.image_size <= config.data.image_size, "image_size",
                    f"must not exceed the prepared data's size (data.image_size="
                    f"{config.data.image_size})")
  configlib.compute_dtype(config.compute_dtype)
  hide = config.data.get("hide_center", 0.0)
  configlib.require(isinstance(hide, (int, float)) and not isinstance(hide, bool)
                    and 0.0 <= hide < 1.0, "data.hide_center",
                    f"must be a fraction in [0, 1) (0: nothing hidden), got {hide!r}")
  fit.seeds_mode(config)


class RunSetup(NamedTuple):
  """How long a run trains: `steps_per_epoch` passes the batch order over the training images,
  `total_steps` optimizer steps, `schedule_epoch` steps per epoch of the learning-rate schedule,
  freezing, validation and checkpoints; class weights or None."""
  steps_per_epoch: int
  total_steps: int
  weights: np.ndarray | None
  schedule_epoch: int


def budget_steps(config: ml_collections.ConfigDict, num_train: int) -> int:
  """The training budget in optimizer steps: `config.train_steps`, or (0) `num_epochs` passes
  over `num_train` images. The experiment sets it from the original training split so that every
  row of one initialisation trains as many steps (a larger set sees fewer epochs)."""
  return int(config.get("train_steps", 0)) or config.num_epochs * (num_train //
                                                                   config.batch_size)


def run_setup(config: ml_collections.ConfigDict, train_set: ImageSet) -> RunSetup:
  """The steps and class weights of a run of `config` on `train_set`."""
  if len(train_set) < config.batch_size:
    raise UserError(f"config.batch_size: {config.batch_size} is larger than the training set "
                    f"({len(train_set)} images)")
  steps_per_epoch = len(train_set) // config.batch_size
  total_steps = budget_steps(config, len(train_set))
  schedule_epoch = max(1, total_steps // config.num_epochs)
  logging.info("%s (%s): %d training images %s, %d steps/epoch, %d steps (%.1f epochs)",
               config.name, "transfer" if config.pretrained else "scratch", len(train_set),
               train_set.counts(), steps_per_epoch, total_steps, total_steps / steps_per_epoch)
  names = train_set.class_names
  weights = class_weights(train_set.labels, len(names)) if config.class_weighted_loss else None
  return RunSetup(steps_per_epoch, total_steps, weights, schedule_epoch)


def make_trainer(config: ml_collections.ConfigDict, workdir: pathlib.Path, train_set: ImageSet,
             val_set: ImageSet, mesh: jax.sharding.Mesh, setup: RunSetup) -> Classifier:
  return Classifier(
      config, class_names=train_set.class_names, steps_per_epoch=setup.steps_per_epoch,
      total_steps=setup.total_steps, mesh=mesh, weights=setup.weights, val=val_set,
      schedule_epoch=setup.schedule_epoch,
      run_info={"train_data": config.train_data, "pretrained": config.pretrained,
                "train_counts": train_set.counts(), "workdir": str(workdir),
                "data_image_size": config.data.image_size})


def fit_trainer(config: ml_collections.ConfigDict, trainer, workdir: pathlib.Path,
                train_set: ImageSet,
         setup: RunSetup, *, seeds: int = 1, best_metric: str | None = "macro_f1") -> None:
  fit.fit(trainer, workdir, data=(train_set.images, train_set.labels.astype(np.int32)),
          schedule=loop.Schedule(total_steps=setup.total_steps,
                                 steps_per_call=config.steps_per_call,
                                 log_every=config.log_every,
                                 checkpoint_every=setup.schedule_epoch,
                                 eval_every=setup.schedule_epoch),
          keep_checkpoints=config.keep_checkpoints, images_per_step=config.batch_size * seeds,
          best_metric=best_metric,
          memory_hint=f"lower config.batch_size (now {config.batch_size}) or config.image_size "
                      f"(now {config.image_size}), or use config.compute_dtype='bfloat16'",
          batch_size=config.batch_size, **stream_lib.options(config.data))


def train(config: ml_collections.ConfigDict, workdir: pathlib.Path, train_set: ImageSet,
          val_set: ImageSet, mesh: jax.sharding.Mesh) -> export.Exported:
  """Trains on `train_set`, validates every epoch, exports the best checkpoint; returns it."""
  workdir = pathlib.Path(workdir)
  setup = run_setup(config, train_set)
  fit_trainer(config, make_trainer(config, workdir, train_set, val_set, mesh, setup), workdir, train_set,
       setup)
  return export.load_classifier(workdir / CLASSIFIER_DIR, mesh)
