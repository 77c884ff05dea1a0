"""CycleGAN (Zhu et al., 2017) translating normal chest X-rays into COVID-19 ones without pairs.

pix2pix needs paired images, which the database does not have; CycleGAN learns from two unpaired
sets. Naming follows the reference (junyanz/pytorch-CycleGAN-and-pix2pix, direction AtoB) with the
domains spelled out: A = `config.source_class` (NORMAL), B = `config.target_class` (COVID).

    G = g_ab: A -> B (reference netG_A)      D_b judges B images (reference netD_A)
    F = g_ba: B -> A (reference netG_B)      D_a judges A images (reference netD_B)

This module holds the CycleGAN-specific pieces as pure functions of arrays: the losses, the
history pool of generated images (kept in the train state on the device, so a resumed run is
exact), and building the selected generator. The adversarial loss is `gan_loss` of the pix2pix
trainer (LSGAN by default here, as the reference's CycleGAN), and the discriminators' loss is its
halved `discriminator_loss`: one implementation of each.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cxr_jax.errors import ConfigError
from cxr_jax.models.patchgan import PatchGAN
from cxr_jax.models.resnet_generator import ResnetGenerator, check_image_size
from cxr_jax.models.unet import UNet
from cxr_jax.training.pix2pix import discriminator_loss, gan_loss

GENERATORS = ("resnet", "unet")


# ----------------------------------------------------------------------------------- losses


def l1(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean absolute difference (torch `L1Loss`), in float32."""
  return jnp.mean(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))


def generator_loss(*, real_a: jax.Array, real_b: jax.Array, rec_a: jax.Array, rec_b: jax.Array,
                   same_a: jax.Array | None, same_b: jax.Array | None,
                   d_b_fake_b_logits: jax.Array, d_a_fake_a_logits: jax.Array, kind: str,
                   lambda_a: float = 10.0, lambda_b: float = 10.0,
                   lambda_identity: float = 0.5) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss of both generators, as the reference's `backward_G`:

      adv_ab   = gan_loss(D_b(G(a)), real)            adv_ba   = gan_loss(D_a(F(b)), real)
      cycle_a  = lambda_a * |F(G(a)) - a|_1           cycle_b  = lambda_b * |G(F(b)) - b|_1
      idt_ab   = lambda_b * lambda_identity * |G(b) - b|_1
      idt_ba   = lambda_a * lambda_identity * |F(a) - a|_1
      total    = adv_ab + adv_ba + cycle_a + cycle_b + idt_ab + idt_ba

  with `rec_a = F(G(a))`, `rec_b = G(F(b))`, `same_b = G(b)`, `same_a = F(a)` (None, or
  lambda_identity 0: no identity terms; the reference then skips those forward passes), and the
  logits of the discriminators on the current (not pooled) fakes. |.|_1 is the mean absolute
  difference. Returns (total, the six terms by the names above).
  """
  parts = {
      "adv_ab": gan_loss(d_b_fake_b_logits, True, kind),
      "adv_ba": gan_loss(d_a_fake_a_logits, True, kind),
      "cycle_a": lambda_a * l1(rec_a, real_a),
      "cycle_b": lambda_b * l1(rec_b, real_b),
  }
  if lambda_identity > 0 and (same_a is None or same_b is None):
    raise ValueError("lambda_identity > 0 needs same_a = F(a) and same_b = G(b)")
  zero = jnp.zeros((), jnp.float32)
  use_idt = lambda_identity > 0
  parts["idt_ab"] = lambda_b * lambda_identity * l1(same_b, real_b) if use_idt else zero
  parts["idt_ba"] = lambda_a * lambda_identity * l1(same_a, real_a) if use_idt else zero
  total = sum(parts.values())
  return total, parts


def discriminator_losses(*, d_a_real_logits: jax.Array, d_a_fake_logits: jax.Array,
                         d_b_real_logits: jax.Array, d_b_fake_logits: jax.Array,
                         kind: str) -> tuple[jax.Array, jax.Array]:
  """(loss of D_a, loss of D_b), each `0.5 * (gan_loss(real, 1) + gan_loss(fake, 0))` as the
  reference's `backward_D_basic`; the fake logits are those of the *pooled* generated images
  (`pool_query`), which are constants for the generators."""
  return (discriminator_loss(d_a_real_logits, d_a_fake_logits, kind),
          discriminator_loss(d_b_real_logits, d_b_fake_logits, kind))


# ------------------------------------------------------------------------------ history pool


class Pool(NamedTuple):
  """The reference's `ImagePool` as arrays: `images[:count]` are stored (count <= size)."""
  images: jax.Array  # [size, H, W, C] float32
  count: jax.Array   # int32 scalar


def pool_init(size: int, image_shape: tuple[int, ...]) -> Pool:
  """An empty pool of `size` images of `image_shape` (H, W, C); size 0: no pool (pass-through)."""
  if not isinstance(size, int) or size < 0:
    raise ConfigError(f"config.pool_size: must be an integer >= 0, got {size!r}")
  return Pool(jnp.zeros((size, *image_shape), jnp.float32), jnp.zeros((), jnp.int32))


def pool_query(pool: Pool, images: jax.Array, key: jax.Array) -> tuple[jax.Array, Pool]:
  """The images a discriminator sees instead of the latest `images` [B, H, W, C], and the pool.

  Per image, in batch order, as the reference's `ImagePool.query`: while the pool is not full,
  the image is stored and returned; once full, with probability 0.5 a uniformly drawn stored
  image is returned and the new image takes its place, otherwise the new image is returned and the
  pool is unchanged. Jittable; deterministic given `key`. Gradients stop here (the reference
  stores `image.data`). The output is float32.
  """
  images = jax.lax.stop_gradient(images).astype(jnp.float32)
  size = pool.images.shape[0]
  if size == 0:
    return images, pool
  if images.shape[1:] != pool.images.shape[1:]:
    raise ValueError(f"pool of {pool.images.shape[1:]} images queried with {images.shape}")

  def one(carry, xs):
    stored, count = carry
    image, k = xs
    k_swap, k_slot = jax.random.split(k)
    full = count >= size
    swap = full & (jax.random.uniform(k_swap) > 0.5)
    slot = jnp.where(full, jax.random.randint(k_slot, (), 0, size), jnp.minimum(count, size - 1))
    old = stored[slot]
    stored = stored.at[slot].set(jnp.where(full & ~swap, old, image))
    count = jnp.where(full, count, count + 1).astype(jnp.int32)
    return (stored, count), jnp.where(swap, old, image)

  keys = jax.random.split(key, images.shape[0])
  (stored, count), out = jax.lax.scan(one, (pool.images, pool.count), (images, keys))
  return out, Pool(stored, count)


# -------------------------------------------------------------------------------- networks


def build_generator(model_cfg: ml_collections.ConfigDict, *, image_size: int, channels: int,
                    rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.Module:
  """`config.model.generator`: 'resnet' (the reference's resnet_{n_blocks}blocks, its CycleGAN
  default) or 'unet' (unet_256 at 256 px; one level fewer per halving of the size)."""
  kind = model_cfg.generator
  if kind == "resnet":
    check_image_size(image_size)
    return ResnetGenerator(in_channels=channels, out_channels=channels, ngf=model_cfg.ngf,
                           n_blocks=model_cfg.n_blocks, norm=model_cfg.norm,
                           use_dropout=model_cfg.use_dropout, rngs=rngs, dtype=dtype)
  if kind == "unet":
    return UNet(image_size=image_size, in_channels=channels, out_channels=channels,
                ngf=model_cfg.ngf, norm=model_cfg.norm, use_dropout=model_cfg.use_dropout,
                rngs=rngs, dtype=dtype)
  raise ConfigError(f"config.model.generator: unknown {kind!r}; use one of {GENERATORS}")


def build_discriminator(model_cfg: ml_collections.ConfigDict, *, channels: int, rngs: nnx.Rngs,
                        dtype=jnp.float32) -> nnx.Module:
  """Unconditional PatchGAN: it sees one image (not a pair as in pix2pix)."""
  return PatchGAN(in_channels=channels, ndf=model_cfg.ndf, n_layers=model_cfg.n_layers_d,
                  norm=model_cfg.norm, rngs=rngs, dtype=dtype)
