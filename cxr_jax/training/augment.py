"""On-device augmentation, traced into the training step so that it costs no host work.

One random affine warp per image (crop scale, rotation, translation, optional flip) resamples the
stored uint8 image straight to the training resolution, so a 256 px image becomes a 224 px crop in
one bilinear pass; brightness and contrast jitter follow. Horizontal flips are off by default: they
put the heart on the wrong side, which no real PA radiograph shows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  out_size: int
  crop_scale: tuple[float, float] = (0.8, 1.0)   # fraction of the image area kept
  max_rotate_deg: float = 10.0
  max_translate: float = 0.05                     # fraction of the image side
  brightness: float = 0.1                         # +- added to [0, 1] intensities
  contrast: float = 0.1                           # +- relative contrast change
  hflip: bool = False

  @classmethod
  def from_config(cls, cfg, out_size: int) -> "AugmentSpec":
    return cls(out_size=out_size, crop_scale=tuple(cfg.crop_scale),
               max_rotate_deg=float(cfg.max_rotate_deg), max_translate=float(cfg.max_translate),
               brightness=float(cfg.brightness), contrast=float(cfg.contrast),
               hflip=bool(cfg.hflip))


def _warp(image: jax.Array, side: jax.Array, angle: jax.Array, shift: jax.Array,
          flip: jax.Array, out_size: int) -> jax.Array:
  """Samples an `out_size` square, `side` (fraction of the input side) wide, rotated by `angle`
  and centred at 0.5 + `shift`, from one [H, W, C] image, bilinearly."""
  h, w, c = image.shape
  grid = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) / out_size - 0.5
  yy, xx = jnp.meshgrid(grid, grid, indexing="ij")
  xx = jnp.where(flip, -xx, xx)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  ys = (cos * yy - sin * xx) * side + 0.5 + shift[0]
  xs = (sin * yy + cos * xx) * side + 0.5 + shift[1]
  coords = [ys * h - 0.5, xs * w - 0.5]
  channels = [jax.scipy.ndimage.map_coordinates(image[..., i], coords, order=1, mode="nearest")
              for i in range(c)]
  return jnp.stack(channels, axis=-1)


def augment(images: jax.Array, key: jax.Array, spec: AugmentSpec) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 [B, out, out, C] in [0, 1], randomly warped and jittered."""
  b = images.shape[0]
  k_scale, k_rot, k_shift, k_flip, k_bright, k_contrast = jax.random.split(key, 6)
  area = jax.random.uniform(k_scale, (b,), minval=spec.crop_scale[0], maxval=spec.crop_scale[1])
  side = jnp.sqrt(area)
  angle = jnp.deg2rad(spec.max_rotate_deg) * jax.random.uniform(k_rot, (b,), minval=-1, maxval=1)
  shift = spec.max_translate * jax.random.uniform(k_shift, (b, 2), minval=-1, maxval=1)
  flip = (jax.random.bernoulli(k_flip, 0.5, (b,)) if spec.hflip else jnp.zeros((b,), bool))
  x = images.astype(jnp.float32) / 255.0
  x = jax.vmap(_warp, in_axes=(0, 0, 0, 0, 0, None))(x, side, angle, shift, flip, spec.out_size)
  bright = spec.brightness * jax.random.uniform(k_bright, (b, 1, 1, 1), minval=-1, maxval=1)
  contrast = 1.0 + spec.contrast * jax.random.uniform(k_contrast, (b, 1, 1, 1), minval=-1,
                                                      maxval=1)
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return jnp.clip((x - mean) * contrast + mean + bright, 0.0, 1.0)


def resize(images: jax.Array, out_size: int) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 [B, out, out, C] in [0, 1]: the deterministic evaluation view."""
  x = images.astype(jnp.float32) / 255.0
  if x.shape[1] == out_size and x.shape[2] == out_size:
    return x
  return jax.image.resize(x, (x.shape[0], out_size, out_size, x.shape[3]), method="linear",
                          antialias=True)


def center_box(size: int, fraction: float) -> tuple[int, int]:
  """[start, stop) of the central `fraction` of a side of `size` pixels: round(fraction * size)
  pixels (halves up), the spare pixels split evenly with the odd one after the box."""
  n = min(size, int(fraction * size + 0.5))
  start = (size - n) // 2
  return start, start + n


def hide_center(images: jax.Array, fraction: float) -> jax.Array:
  """Images [B, H, W, C] (any dtype) with the central `fraction` of their height and width set
  to 0 (black): where the lungs of a centred radiograph are. `fraction` 0 returns them as they
  are. Static slices, so it traces into the compiled step and inference at no host cost."""
  if not fraction:
    return images
  r0, r1 = center_box(images.shape[1], fraction)
  c0, c1 = center_box(images.shape[2], fraction)
  return images.at[:, r0:r1, c0:c1, :].set(0)
