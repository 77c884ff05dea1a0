"""The parts every image translator shares: the adversarial loss, the one discriminator update
(the reference's `backward_D_basic` and its optimiser step), the L1 term, the batch draw (indices, then
the augmented inputs) and the constant-then-linear-decay learning rate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cxr_jax.errors import ConfigError
from cxr_jax.training import augment as augment_lib
from cxr_jax.training import pixels
from cxr_jax.training import sampling
from cxr_jax.training.fit import NetState
from cxr_jax.training.functional import Functional

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


def l1(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean absolute difference (torch `L1Loss`), in float32."""
  return jnp.mean(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str) -> jax.Array:
  """`0.5 * (gan_loss(real, 1) + gan_loss(fake, 0))`: halved so that D learns more slowly than G."""
  return 0.5 * (gan_loss(real_logits, True, kind) + gan_loss(fake_logits, False, kind))


def discriminator_accuracy(real_logits: jax.Array, fake_logits: jax.Array,
                           kind: str) -> tuple[jax.Array, jax.Array]:
  """Shares of real / fake patches the discriminator gets right (its decision threshold is 0 for
  logits, 0.5 for least-squares outputs)."""
  threshold = 0.0 if kind == "bce" else 0.5
  return (jnp.mean((real_logits > threshold).astype(jnp.float32)),
          jnp.mean((fake_logits < threshold).astype(jnp.float32)))


def update_discriminator(disc: Functional, net: NetState, real: jax.Array, fake: jax.Array,
                         kind: str, prefix: str = "d_") -> tuple[NetState, dict[str, jax.Array]]:
  """One optimiser step of a discriminator on `real` and `fake` inputs (the fakes are constants
  here): the reference's `backward_D_basic`, used for every discriminator of every translator.
  Returns the updated `NetState` and its metrics named `<prefix>loss`, `<prefix>acc_real`,
  `<prefix>acc_fake` and `<prefix>grad_norm`."""
  fake = jax.lax.stop_gradient(fake).astype(real.dtype)

  def loss_fn(params):
    real_logits, stats = disc.apply(params, net.stats, real, train=True)
    fake_logits, stats = disc.apply(params, stats, fake, train=True)
    return discriminator_loss(real_logits, fake_logits, kind), (stats, real_logits, fake_logits)

  (loss, (stats, real_logits, fake_logits)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(net.params)
  acc_real, acc_fake = discriminator_accuracy(real_logits, fake_logits, kind)
  return net.apply_gradients(grads, stats), {
      f"{prefix}loss": loss, f"{prefix}acc_real": acc_real, f"{prefix}acc_fake": acc_fake,
      f"{prefix}grad_norm": optax.tree.norm(grads)}


def source_target_indices(rng: jax.Array, step: jax.Array, num_source: int, num_target: int, *,
                          batch_size: int, steps_per_epoch: int) -> tuple[jax.Array, jax.Array]:
  """The images of `step` for a translator: source indices in the seeded epoch order, target
  indices uniformly at random (pix2pix pairs them, the unpaired translators do not). A pure
  function of (rng, step): drawn on the device from resident images, or on the host for a
  streamed run (`training/stream.py`), the same indices either way."""
  src_idx = sampling.epoch_batch(rng, step, num_source, batch_size, steps_per_epoch)
  k_pick = jax.random.split(jax.random.fold_in(rng, step), 4)[0]
  return src_idx, jax.random.randint(k_pick, (batch_size,), 0, num_target)


def source_target_inputs(rng: jax.Array, step: jax.Array, src: jax.Array, tgt: jax.Array, *,
                         augment: augment_lib.AugmentSpec | None, sharding) -> tuple:
  """The uint8 source and target images of `step` augmented (or not) into [-1, 1] on the device;
  returns (source, target, a key for the step's own noise)."""
  _, k_aug_src, k_aug_tgt, k_step = jax.random.split(jax.random.fold_in(rng, step), 4)
  if augment is not None:
    src = augment_lib.augment(src, k_aug_src, augment) * 2.0 - 1.0
    tgt = augment_lib.augment(tgt, k_aug_tgt, augment) * 2.0 - 1.0
  else:
    src, tgt = pixels.to_signed(src), pixels.to_signed(tgt)
  return (jax.lax.with_sharding_constraint(src, sharding),
          jax.lax.with_sharding_constraint(tgt, sharding), k_step)


def constant_then_linear_decay(learning_rate: float, total_steps: int,
                               decay_steps: int) -> optax.Schedule:
  """Constant for `total_steps - decay_steps` steps, then linear to zero (the reference's
  'linear' policy)."""
  constant = optax.constant_schedule(learning_rate)
  if decay_steps <= 0:
    return constant
  return optax.join_schedules(
      [constant, optax.linear_schedule(learning_rate, 0.0, decay_steps)],
      [total_steps - decay_steps])
