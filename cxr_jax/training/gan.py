"""What image translators share (pix2pix today, CycleGAN next): the adversarial loss, the image
value mappings, the constant-then-linear-decay learning rate and the sample-grid hook."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cxr_jax import configlib
from cxr_jax import workdir as workdir_lib
from cxr_jax.data import classes as classes_lib
from cxr_jax.errors import ConfigError
from cxr_jax.training import augment as augment_lib
from cxr_jax.training import sampling
from cxr_jax.training.summary import SummaryWriter
from cxr_jax.utils import grid

if TYPE_CHECKING:  # export imports this module (to_signed / to_uint8)
  from cxr_jax.training.export import Exported

GAN_LOSSES = ("bce", "lsgan")


def gan_loss(logits: jax.Array, real: bool, kind: str) -> jax.Array:
  """Mean adversarial loss of `logits` against the label real (1) or fake (0)."""
  logits = logits.astype(jnp.float32)
  target = jnp.ones_like(logits) if real else jnp.zeros_like(logits)
  if kind == "bce":
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target))
  if kind == "lsgan":
    return jnp.mean(jnp.square(logits - target))
  raise ConfigError(f"config.gan_loss: unknown {kind!r}; use 'bce' or 'lsgan'")


def discriminator_accuracy(real_logits: jax.Array, fake_logits: jax.Array,
                           kind: str) -> tuple[jax.Array, jax.Array]:
  """Shares of real / fake patches the discriminator gets right (its decision threshold is 0 for
  logits, 0.5 for least-squares outputs)."""
  threshold = 0.0 if kind == "bce" else 0.5
  return (jnp.mean((real_logits > threshold).astype(jnp.float32)),
          jnp.mean((fake_logits < threshold).astype(jnp.float32)))


def to_signed(images_u8: jax.Array) -> jax.Array:
  return images_u8.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(images: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def source_target_batch(step: jax.Array, rng: jax.Array, source: jax.Array, target: jax.Array, *,
                        batch_size: int, steps_per_epoch: int,
                        augment: augment_lib.AugmentSpec | None, sharding) -> tuple:
  """The batch of `step` for a translator, drawn on the device: source images in the seeded
  epoch order, target images uniformly at random (pix2pix pairs them, CycleGAN does not),
  augmented (or not) into [-1, 1]; returns (source, target, a key for the step's own noise)."""
  src_idx = sampling.epoch_batch(rng, step, source.shape[0], batch_size, steps_per_epoch)
  key = jax.random.fold_in(rng, step)
  k_pick, k_aug_src, k_aug_tgt, k_step = jax.random.split(key, 4)
  tgt_idx = jax.random.randint(k_pick, (batch_size,), 0, target.shape[0])
  src, tgt = source[src_idx], target[tgt_idx]
  if augment is not None:
    src = augment_lib.augment(src, k_aug_src, augment) * 2.0 - 1.0
    tgt = augment_lib.augment(tgt, k_aug_tgt, augment) * 2.0 - 1.0
  else:
    src, tgt = to_signed(src), to_signed(tgt)
  return (jax.lax.with_sharding_constraint(src, sharding),
          jax.lax.with_sharding_constraint(tgt, sharding), k_step)


def constant_then_linear_decay(learning_rate: float, total_steps: int,
                               decay_steps: int) -> optax.Schedule:
  """Constant for `total_steps - decay_steps` steps, then linear to zero (pix2pix's and
  CycleGAN's 'linear' policy)."""
  constant = optax.constant_schedule(learning_rate)
  if decay_steps <= 0:
    return constant
  return optax.join_schedules(
      [constant, optax.linear_schedule(learning_rate, 0.0, decay_steps)],
      [total_steps - decay_steps])


def sample_rows(seed: int, count: int, inputs: np.ndarray,
                reals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The fixed rows of the sample grids: `count` distinct inputs, each beside a random real image
  of the target class."""
  rng = np.random.default_rng(seed)
  count = min(count, len(inputs))
  return (inputs[np.sort(rng.choice(len(inputs), count, replace=False))],
          reals[rng.integers(0, len(reals), count)])


class SampleGrid:
  """A training hook: a PNG grid (and TensorBoard image) of input | translated | `extra` columns,
  translated through the exported-model path with the state's current generator weights."""

  def __init__(self, generator: Exported, weights: Callable[[Any], tuple[Any, Any]],
               inputs: np.ndarray, extra: tuple[np.ndarray, ...], out_dir: pathlib.Path,
               tag: str):
    self.generator, self.weights, self.inputs, self.extra = generator, weights, inputs, extra
    self.out_dir, self.tag = out_dir, tag

  def __call__(self, step: int, state: Any, writer: SummaryWriter) -> None:
    fake = self.generator.with_weights(*self.weights(state)).translate(
        self.inputs, seed=0, batch_size=len(self.inputs))
    if not workdir_lib.is_writer():
      return
    image = grid.tile(np.stack([self.inputs, fake, *self.extra], axis=1))
    self.out_dir.mkdir(parents=True, exist_ok=True)
    grid.save_png(self.out_dir / f"step_{step:07d}.png", image)
    writer.image(step, self.tag, image)


def validate_translator(config: ml_collections.ConfigDict,
                        extra_positive: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """The checks every translator's config shares (schedule, optimiser, adversarial loss, dtype,
  classes); returns a copy whose source / target classes are canonically spelt
  ('Healthy' -> 'HEALTHY')."""
  for key in ("batch_size", "num_epochs", "steps_per_call", "log_every", "checkpoint_every",
              "sample_every", "keep_checkpoints", "model.ngf", "model.ndf") + extra_positive:
    configlib.require_positive_int(config, key)
  configlib.require(0 <= config.decay_epochs <= config.num_epochs, "decay_epochs",
                    f"must be between 0 and num_epochs ({config.num_epochs}), "
                    f"got {config.decay_epochs}")
  configlib.require(config.learning_rate > 0, "learning_rate", "must be > 0")
  configlib.require(config.gan_loss in GAN_LOSSES, "gan_loss",
                    f"{config.gan_loss!r} is not 'bce' or 'lsgan'")
  configlib.compute_dtype(config.compute_dtype)
  config = config.copy_and_resolve_references()
  for key in ("source_class", "target_class"):
    config[key] = classes_lib.member(config[key], config.data.classes, key)
  configlib.require(config.source_class != config.target_class, "target_class",
                    f"must differ from source_class ({config.source_class})")
  return config
