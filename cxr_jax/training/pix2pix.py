"""pix2pix (Isola et al., 2017) translating normal chest X-rays into COVID-19 ones.

The database has no paired images: each normal training image is paired with a COVID training
image drawn at random, afresh at every step. An epoch is one pass over the normal training images
in a seeded random order (`floor(N_normal / batch)` steps, see `sampling.py`). Only the training
split is ever read.

Everything a step needs is on the device: the uint8 training images (replicated), the pairing and
augmentation (drawn from `(rng, step)`, so a resumed run replays the same batches), and the metrics,
which are fetched every `log_every` steps.
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
from flax import nnx

from cxr_jax import configlib
from cxr_jax import workdir as workdir_lib
from cxr_jax.errors import ConfigError, UserError
from cxr_jax.models.patchgan import PatchGAN
from cxr_jax.models.unet import UNet
from cxr_jax.training import augment as augment_lib
from cxr_jax.training import export
from cxr_jax.training import loop
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training import sampling
from cxr_jax.training.checkpoint import Checkpointer
from cxr_jax.training import functional
from cxr_jax.training.functional import Functional
from cxr_jax.training.summary import SummaryWriter
from cxr_jax.utils import grid

GENERATOR_DIR = "generator"


# ----------------------------------------------------------------------------------- losses


def gan_loss(logits: jax.Array, real: bool, kind: str) -> jax.Array:
  """Mean adversarial loss of `logits` against the label real (1) or fake (0)."""
  logits = logits.astype(jnp.float32)
  target = jnp.ones_like(logits) if real else jnp.zeros_like(logits)
  if kind == "bce":
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target))
  if kind == "lsgan":
    return jnp.mean(jnp.square(logits - target))
  raise ConfigError(f"config.gan_loss: unknown {kind!r}; use 'bce' or 'lsgan'")


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str) -> jax.Array:
  """Halved, as in pix2pix, so that D learns more slowly than G."""
  return 0.5 * (gan_loss(real_logits, True, kind) + gan_loss(fake_logits, False, kind))


def generator_loss(fake_logits: jax.Array, fake: jax.Array, target: jax.Array, kind: str,
                   l1_weight: float) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  adv = gan_loss(fake_logits, True, kind)
  l1 = jnp.mean(jnp.abs(fake.astype(jnp.float32) - target.astype(jnp.float32)))
  return adv + l1_weight * l1, (adv, l1)


def to_signed(images_u8: jax.Array) -> jax.Array:
  return images_u8.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(images: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


# ------------------------------------------------------------------------------------ state


@flax.struct.dataclass
class State:
  step: jax.Array
  rng: jax.Array
  g_params: Any
  g_stats: Any
  d_params: Any
  d_stats: Any
  g_opt: Any
  d_opt: Any




def build_networks(model_cfg: ml_collections.ConfigDict, image_size: int, channels: int,
                   compute_dtype: str, seed: int, *,
                   abstract: bool = False) -> tuple[nnx.Module, nnx.Module]:
  dtype = configlib.compute_dtype(compute_dtype)
  gen = functional.build(
      lambda rngs: UNet(image_size=image_size, in_channels=channels, out_channels=channels,
                        ngf=model_cfg.ngf, norm=model_cfg.norm,
                        use_dropout=model_cfg.use_dropout, rngs=rngs, dtype=dtype), seed,
      abstract=abstract)
  disc = functional.build(
      lambda rngs: PatchGAN(in_channels=2 * channels, ndf=model_cfg.ndf,
                            n_layers=model_cfg.n_layers_d, norm=model_cfg.norm, rngs=rngs,
                            dtype=dtype), seed + 1, abstract=abstract)
  return gen, disc


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """Constant for `num_epochs - decay_epochs` epochs, then linear to zero (pix2pix 'linear')."""
  total = config.num_epochs * steps_per_epoch
  decay = config.decay_epochs * steps_per_epoch
  constant = optax.constant_schedule(config.learning_rate)
  if decay <= 0:
    return constant
  return optax.join_schedules(
      [constant, optax.linear_schedule(config.learning_rate, 0.0, decay)], [total - decay])


class Pix2Pix:
  """The networks, optimisers and compiled functions of one pix2pix config on one mesh."""

  def __init__(self, config: ml_collections.ConfigDict, *, image_size: int, steps_per_epoch: int,
               mesh: jax.sharding.Mesh, channels: int = 1):
    self.config, self.mesh, self.channels = config, mesh, channels
    self.image_size, self.steps_per_epoch = image_size, steps_per_epoch
    self.batch_size = config.batch_size
    gen, disc = build_networks(config.model, image_size, channels, config.compute_dtype,
                               config.seed)
    self.gen, g_params, g_stats = Functional.split(gen)
    self.disc, d_params, d_stats = Functional.split(disc)
    self._init = (g_params, g_stats, d_params, d_stats)
    self.schedule = learning_rate_schedule(config, steps_per_epoch)
    self.tx = optax.adam(self.schedule, b1=config.beta1, b2=config.beta2)
    if config.get("flat_optimizer", False):
      # One buffer for all parameters: a few large update kernels instead of a few per tensor.
      self.tx = optax.flatten(self.tx)
    self.augment = (augment_lib.AugmentSpec.from_config(config.augment, image_size)
                    if config.augment.enabled else None)
    self._replicated = mesh_lib.replicated(mesh)
    self._batch = mesh_lib.batch_sharding(mesh)
    self.chunk = jax.jit(self._chunk, static_argnums=3, donate_argnums=0,
                         in_shardings=(self._replicated,) * 3,
                         out_shardings=(self._replicated, self._replicated))

  def init_state(self) -> State:
    g_params, g_stats, d_params, d_stats = self._init
    state = State(step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(self.config.seed),
                  g_params=g_params, g_stats=g_stats, d_params=d_params, d_stats=d_stats,
                  g_opt=self.tx.init(g_params), d_opt=self.tx.init(d_params))
    # Copies: the first chunk donates the state, which must not delete the kept initial values.
    return mesh_lib.put_replicated(jax.tree.map(jnp.copy, state), self.mesh)

  # The step ----------------------------------------------------------------------------------

  def train_step(self, state: State, source: jax.Array, target: jax.Array,
                 dropout_key: jax.Array) -> tuple[State, dict[str, jax.Array]]:
    """One update of D, then of G, on a batch of float images in [-1, 1]."""
    cfg = self.config

    def generate(g_params):
      fake, stats = self.gen.apply(g_params, state.g_stats, source, train=True,
                                   rngs=nnx.Rngs(dropout=dropout_key))
      return fake, stats

    fake, g_vjp, g_stats = jax.vjp(generate, state.g_params, has_aux=True)

    def d_loss_fn(d_params):
      real_logits, stats = self.disc.apply(d_params, state.d_stats,
                                           jnp.concatenate([source, target], -1), train=True)
      fake_logits, stats = self.disc.apply(d_params, stats,
                                           jnp.concatenate([source, jax.lax.stop_gradient(fake)],
                                                           -1), train=True)
      return discriminator_loss(real_logits, fake_logits, cfg.gan_loss), (stats, real_logits,
                                                                          fake_logits)

    (d_loss, (d_stats, real_logits, fake_logits)), d_grads = jax.value_and_grad(
        d_loss_fn, has_aux=True)(state.d_params)
    d_updates, d_opt = self.tx.update(d_grads, state.d_opt, state.d_params)
    d_params = optax.apply_updates(state.d_params, d_updates)

    def g_loss_fn(fake):
      logits, stats = self.disc.apply(d_params, d_stats, jnp.concatenate([source, fake], -1),
                                      train=True)
      total, (adv, l1) = generator_loss(logits, fake, target, cfg.gan_loss, cfg.l1_weight)
      return total, (stats, adv, l1)

    (g_loss, (d_stats, g_adv, g_l1)), fake_grad = jax.value_and_grad(
        g_loss_fn, has_aux=True)(fake)
    (g_grads,) = g_vjp(fake_grad)
    g_updates, g_opt = self.tx.update(g_grads, state.g_opt, state.g_params)
    g_params = optax.apply_updates(state.g_params, g_updates)

    threshold = 0.0 if cfg.gan_loss == "bce" else 0.5
    metrics = {
        "g_loss": g_loss, "g_gan": g_adv, "g_l1": g_l1, "d_loss": d_loss,
        "d_acc_real": jnp.mean((real_logits > threshold).astype(jnp.float32)),
        "d_acc_fake": jnp.mean((fake_logits < threshold).astype(jnp.float32)),
        "g_grad_norm": optax.tree.norm(g_grads), "d_grad_norm": optax.tree.norm(d_grads),
        "learning_rate": jnp.asarray(self.schedule(state.step), jnp.float32),
    }
    new_state = state.replace(step=state.step + 1, g_params=g_params, g_stats=g_stats,
                              d_params=d_params, d_stats=d_stats, g_opt=g_opt, d_opt=d_opt)
    return new_state, metrics

  def sample_batch(self, step: jax.Array, rng: jax.Array, normal: jax.Array, covid: jax.Array):
    """The (normal, COVID) pairs of `step`, and its dropout key, drawn on the device."""
    b = self.batch_size
    src_idx = sampling.epoch_batch(rng, step, normal.shape[0], b, self.steps_per_epoch)
    key = jax.random.fold_in(rng, step)
    k_pair, k_aug_src, k_aug_tgt, k_drop = jax.random.split(key, 4)
    tgt_idx = jax.random.randint(k_pair, (b,), 0, covid.shape[0])
    src, tgt = normal[src_idx], covid[tgt_idx]
    if self.augment is not None:
      src = augment_lib.augment(src, k_aug_src, self.augment) * 2.0 - 1.0
      tgt = augment_lib.augment(tgt, k_aug_tgt, self.augment) * 2.0 - 1.0
    else:
      src, tgt = to_signed(src), to_signed(tgt)
    src = jax.lax.with_sharding_constraint(src, self._batch)
    tgt = jax.lax.with_sharding_constraint(tgt, self._batch)
    return src, tgt, k_drop

  def _chunk(self, state: State, normal: jax.Array, covid: jax.Array, num_steps: int):
    def body(st, _):
      src, tgt, k_drop = self.sample_batch(st.step, st.rng, normal, covid)
      return self.train_step(st, src, tgt, k_drop)
    return jax.lax.scan(body, state, None, length=num_steps)


# ------------------------------------------------------------------------------- inference


def translate_fn(gen: Functional, inference_norm: str):
  """A pure function (params, stats, images_u8, keys) -> uint8 translations.

  'instance' (default) is pix2pix's own test mode: BatchNorm on each image's own statistics and
  dropout kept on as the noise source (seeded per image, so synthesis is reproducible); it is what
  the generator saw when trained at batch size 1. 'running' uses the running averages, no dropout.
  """
  if inference_norm == "running":
    def run(params, stats, images, keys):
      del keys
      out, _ = gen.apply(params, stats, to_signed(images), train=False)
      return to_uint8(out)
  elif inference_norm == "instance":
    def one(params, stats, image, key):
      out, _ = gen.apply(params, stats, to_signed(image[None]), train=True,
                         rngs=nnx.Rngs(dropout=key))
      return to_uint8(out[0])

    def run(params, stats, images, keys):
      return jax.vmap(one, in_axes=(None, None, 0, 0))(params, stats, images, keys)
  else:
    raise ConfigError(f"config.model.inference_norm: {inference_norm!r} is not 'instance' or "
                      "'running'")
  return run


@dataclasses.dataclass
class Generator:
  """An exported generator, ready to translate uint8 images."""
  meta: dict
  gen: Functional
  params: Any
  stats: Any

  def __post_init__(self):
    self._run = jax.jit(translate_fn(self.gen, self.meta["inference_norm"]))

  def translate(self, images_u8: np.ndarray, *, seed: int = 0, first_index: int = 0,
                batch_size: int = 32, mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """uint8 [N, S, S, C] -> uint8 [N, S, S, C]; image i's dropout noise is keyed by
    (seed, first_index + i), so results do not depend on the batch size."""
    if not len(images_u8):
      return np.zeros_like(images_u8)
    mesh = mesh or mesh_lib.make_mesh()
    params, stats = mesh_lib.put_replicated((self.params, self.stats), mesh)
    base = jax.random.PRNGKey(seed)
    keys = np.asarray(jax.vmap(lambda i: jax.random.fold_in(base, i))(
        jnp.arange(first_index, first_index + len(images_u8))))
    return mesh_lib.map_batches(lambda x, k: self._run(params, stats, x, k), (images_u8, keys),
                                batch_size, mesh)


def export_generator(directory: pathlib.Path, model: Pix2Pix, state: State, meta: dict) -> None:
  """The generator's parameters and batch statistics (no optimiser state), for synthesis."""
  meta = dict(meta, kind="pix2pix_generator", image_size=model.image_size,
              channels=model.channels, model=model.config.model.to_dict(),
              compute_dtype=model.config.compute_dtype,
              inference_norm=model.config.model.inference_norm, step=int(state.step))
  export.save(directory, state.g_params, state.g_stats, meta)


def load_generator(directory: str | pathlib.Path) -> Generator:
  meta = export.read_meta(directory, "pix2pix_generator")
  gen, _ = build_networks(ml_collections.ConfigDict(meta["model"]), meta["image_size"],
                          meta["channels"], meta["compute_dtype"], seed=0, abstract=True)
  gen_f, params, stats = Functional.split(gen)
  export.restore_into(directory, params, stats)
  return Generator(meta=meta, gen=gen_f, params=params, stats=stats)


# ----------------------------------------------------------------------------------- task


def validate(config: ml_collections.ConfigDict) -> None:
  for key in ("batch_size", "num_epochs", "steps_per_call", "log_every", "checkpoint_every",
              "sample_every", "keep_checkpoints", "model.ngf", "model.ndf"):
    configlib.require_positive_int(config, key)
  configlib.require(0 <= config.decay_epochs <= config.num_epochs, "decay_epochs",
                    f"must be between 0 and num_epochs ({config.num_epochs}), "
                    f"got {config.decay_epochs}")
  configlib.require(config.learning_rate > 0, "learning_rate", "must be > 0")
  configlib.require(config.gan_loss in ("bce", "lsgan"), "gan_loss",
                    f"{config.gan_loss!r} is not 'bce' or 'lsgan'")
  configlib.require(config.l1_weight >= 0, "l1_weight", "must be >= 0")
  configlib.compute_dtype(config.compute_dtype)
  size = config.data.image_size
  configlib.require(isinstance(size, int) and size >= 32 and size & (size - 1) == 0,
                    "data.image_size", f"the U-Net halves the image down to 1x1, so it must be a "
                    f"power of two >= 32 (e.g. 64, 128, 256), got {size!r}")
  for key in ("source_class", "target_class"):
    configlib.require(config[key] in config.data.classes, key,
                      f"{config[key]!r} is not among config.data.classes {config.data.classes}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Generator:
  """The `pix2pix` task: trains, checkpoints, writes samples, exports the generator."""
  from cxr_jax.data import dataset  # pylint: disable=import-outside-toplevel

  validate(config)
  workdir = pathlib.Path(workdir)
  mesh = mesh_lib.make_mesh(config.get("num_devices") or None)
  mesh_lib.check_global_batch(config.batch_size, mesh)
  train = dataset.load_splits(config.data, workdir)["train"]
  normal = train.of_class(config.source_class).images
  covid = train.of_class(config.target_class).images
  if len(normal) < config.batch_size or len(covid) == 0:
    raise UserError(f"pix2pix needs at least batch_size={config.batch_size} "
                    f"{config.source_class} and one {config.target_class} training image; the "
                    f"training split has {len(normal)} and {len(covid)}")
  steps_per_epoch = len(normal) // config.batch_size
  total_steps = config.num_epochs * steps_per_epoch
  logging.info("pix2pix: %d %s -> %d %s training images, %d steps/epoch, %d steps", len(normal),
               config.source_class, len(covid), config.target_class, steps_per_epoch, total_steps)

  model = Pix2Pix(config, image_size=config.data.image_size, steps_per_epoch=steps_per_epoch,
                  mesh=mesh, channels=normal.shape[-1])
  state = model.init_state()
  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
  restored, start = ckpt.restore_latest(state)
  if restored is not None:
    state = restored
    logging.info("Resumed from %s at step %d", ckpt.directory, start)
  start = start or 0
  normal_dev, covid_dev = mesh_lib.put_replicated((normal, covid), mesh)
  writer = SummaryWriter(workdir / "tensorboard")
  try:  # closed also when training stops on an error (its event file is flushed)
    sampler = _Sampler(model, normal, covid, workdir / "samples", writer, config.num_samples)

    state = loop.run(
        state, chunk_fn=lambda st, k: model.chunk(st, normal_dev, covid_dev, k),
        schedule=loop.Schedule(total_steps=total_steps, steps_per_call=config.steps_per_call,
                               log_every=config.log_every,
                               checkpoint_every=config.checkpoint_every,
                               hook_every=config.sample_every),
        start_step=start, checkpointer=ckpt, writer=writer, name="pix2pix",
        images_per_step=config.batch_size, hook_fn=sampler,
        memory_hint=f"lower config.batch_size (now {config.batch_size}), config.data.image_size "
                    f"(now {config.data.image_size}) or config.model.ngf (now {config.model.ngf})")
    ckpt.close()
    export_generator(workdir / GENERATOR_DIR, model, state,
                     {"workdir": str(workdir), "checkpoint_step": total_steps,
                      "source_class": config.source_class, "target_class": config.target_class,
                      "split_manifest": str(workdir / "split_manifest.csv")})
  finally:
    writer.close()
  logging.info("Exported the generator to %s", workdir / GENERATOR_DIR)
  return load_generator(workdir / GENERATOR_DIR)


class _Sampler:
  """Every `sample_every` steps: a PNG grid of normal input | generated | a real COVID image."""

  def __init__(self, model: Pix2Pix, normal: np.ndarray, covid: np.ndarray,
               out_dir: pathlib.Path, writer: SummaryWriter, count: int):
    rng = np.random.default_rng(model.config.seed)
    count = min(count, len(normal))
    self.inputs = normal[np.sort(rng.choice(len(normal), count, replace=False))]
    self.reals = covid[rng.integers(0, len(covid), count)]
    self.model, self.out_dir, self.writer = model, out_dir, writer
    self._run = jax.jit(translate_fn(model.gen, model.config.model.inference_norm))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(count))
    self._inputs_dev, self._keys = mesh_lib.put_replicated((self.inputs, keys), model.mesh)

  def __call__(self, step: int, state: State) -> None:
    fake = np.asarray(self._run(state.g_params, state.g_stats, self._inputs_dev, self._keys))
    if not workdir_lib.is_writer():
      return
    image = grid.tile(np.stack([self.inputs, fake, self.reals], axis=1))
    self.out_dir.mkdir(parents=True, exist_ok=True)
    grid.save_png(self.out_dir / f"step_{step:07d}.png", image)
    self.writer.image(step, "samples/normal_generated_covid", image)
