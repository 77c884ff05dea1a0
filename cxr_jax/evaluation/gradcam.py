"""Grad-CAM (Selvaraju et al. 2017): where in the radiograph the classifier looked.

Model-agnostic: it only needs the split `features_fn(images) -> [N, h, w, C]` and
`head_fn(fmap) -> logits [N, K]` (`ResNet.features` / `ResNet.head` in eval mode), so the same code
serves any backbone and a hand-built linear pair in the tests. Pure JAX, no Python branching on
values: wrap it in `jax.jit` with the two functions closed over.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import colormaps

from cxr_jax.evaluation.plots import new_figure, save_figure
from cxr_jax.training import augment


def gradcam(features_fn: Callable[[jax.Array], jax.Array], head_fn: Callable[[jax.Array], jax.Array],
            images: jax.Array, class_index: jax.Array | int | None) -> jax.Array:
  """Heatmaps `[N, H, W]` in [0, 1] of `class_index` (int or `[N]`; None: the predicted class).

  weights = spatial mean of d logit_c / d fmap; cam = relu(sum_C weights * fmap), bilinearly
  resized to the image size and min-max normalised per image; a flat map (e.g. zero gradient)
  stays 0. The head must treat samples independently (eval mode), as one backward pass serves
  the whole batch.
  """
  fmap = features_fn(images)
  if fmap.ndim != 4:
    raise ValueError(f"features_fn must return [N, h, w, C], got shape {fmap.shape}")
  logits, head_vjp = jax.vjp(head_fn, fmap)
  n, k = logits.shape
  if class_index is None:
    class_index = jnp.argmax(logits, axis=-1)
  class_index = jnp.broadcast_to(jnp.asarray(class_index, jnp.int32), (n,))
  (grads,) = head_vjp(jax.nn.one_hot(class_index, k, dtype=logits.dtype))
  weights = jnp.mean(grads.astype(jnp.float32), axis=(1, 2))                  # [N, C]
  cam = jax.nn.relu(jnp.einsum("nhwc,nc->nhw", fmap.astype(jnp.float32), weights))
  height, width = images.shape[1], images.shape[2]
  if cam.shape[1:] != (height, width):
    cam = jax.image.resize(cam, (n, height, width), method="bilinear")
  lo = jnp.min(cam, axis=(1, 2), keepdims=True)
  span = jnp.max(cam, axis=(1, 2), keepdims=True) - lo
  ok = span > 1e-12
  return jnp.where(ok, (cam - lo) / jnp.where(ok, span, 1.0), 0.0)


def center_share(heatmaps: jax.Array, fraction: float) -> jax.Array:
  """[N] share of each heatmap's mass inside the central `fraction` of its height and width (the
  box `augment.hide_center` blacks out); NaN for a map without mass. A map spread evenly scores
  about fraction ** 2."""
  _, h, w = heatmaps.shape
  r0, r1 = augment.center_box(h, fraction)
  c0, c1 = augment.center_box(w, fraction)
  heat = heatmaps.astype(jnp.float32)
  total = jnp.sum(heat, axis=(1, 2))
  inside = jnp.sum(heat[:, r0:r1, c0:c1], axis=(1, 2))
  return jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), jnp.nan)


def overlay(images_uint8, heatmaps, *, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
  """uint8 `[N, H, W, 3]`: grayscale images alpha-blended with the colour-mapped heatmaps."""
  images = np.asarray(images_uint8)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  heat = np.clip(np.asarray(heatmaps, np.float32), 0.0, 1.0)
  if images.ndim != 3 or heat.shape != images.shape:
    raise ValueError(f"need images [N, H, W(, 1)] and heatmaps [N, H, W] of the same size, got "
                     f"{np.shape(images_uint8)} and {np.shape(heatmaps)}")
  gray = np.repeat(images[..., None].astype(np.float32) / 255.0, 3, axis=-1)
  colour = colormaps[cmap](heat)[..., :3]
  blended = (1.0 - alpha) * gray + alpha * colour
  return np.clip(np.round(blended * 255.0), 0, 255).astype(np.uint8)


def overlay_png(path: str | os.PathLike, images_uint8, heatmaps,
                titles: Sequence[str] | None = None, *, alpha: float = 0.4,
                cols: int = 4) -> None:
  """A grid PNG with one tile per image: radiograph plus heatmap overlay, optional title."""
  tiles = overlay(images_uint8, heatmaps, alpha=alpha)
  n = tiles.shape[0]
  if titles is not None and len(titles) != n:
    raise ValueError(f"{len(titles)} titles for {n} images")
  cols = max(1, min(cols, n))
  rows = max(1, math.ceil(n / cols))
  fig = new_figure((2.6 * cols, 2.8 * rows if titles else 2.6 * rows))
  for i in range(n):
    ax = fig.add_subplot(rows, cols, i + 1)
    ax.imshow(tiles[i], interpolation="nearest")
    ax.set_axis_off()
    if titles is not None:
      ax.set_title(str(titles[i]), fontsize=8)
  fig.tight_layout()
  save_figure(fig, path)
