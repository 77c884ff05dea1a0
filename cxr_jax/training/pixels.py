"""The value maps between stored images (uint8) and generator images (float in [-1, 1])."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_signed(images_u8: jax.Array) -> jax.Array:
  return images_u8.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(images: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
