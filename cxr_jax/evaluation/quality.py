"""Translation-quality figures of any translator (pix2pix, CycleGAN, ...): numpy in, floats out.

A translator trained on random normal/COVID pairs can ignore its input and emit one median COVID
picture; the classifier's accuracy does not show that, these figures do:

- input dependence: mean SSIM(translated_i, source_i) - mean SSIM(translated_i, source_j(i)), with
  j a seeded derangement (j(i) != i). ~0 when the output ignores the input; 1 - mean cross-SSIM for
  the identity mapping (so it must be read beside the target-class share: copying passes it).
- diversity: 1 - mean pairwise Pearson correlation of the standardised images; 0 for one image
  repeated, ~1 for independent noise. `relative_diversity` divides by the real target images' own.
- KID of the translated images against real target-class images, by `fid.kernel_inception_distance`
  on features from a caller-supplied `features_fn` (its sample-size bias is small, unlike FID's).
- target share: the fraction of translated images a classifier calls the target class.
- a labelled grid source | translated | |difference| for the eye.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
from skimage.metrics import structural_similarity

from cxr_jax.evaluation import fid
from cxr_jax.utils import grid

DIVERSITY_MAX_IMAGES = 500   # above this many images, diversity uses a seeded subset's pairs
DIFFERENCE_GAIN = 4.0        # |difference| x 4 in the grid: 64 grey levels of change show as white
_HEADER = 14                 # grid header row height in pixels
_LABELS = ("source", "translated", "|diff| x4")


def _images(x, name: str) -> np.ndarray:
  """[N, H, W] or [N, H, W, 1] -> [N, H, W] (dtype kept)."""
  x = np.asarray(x)
  if x.ndim == 4 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim != 3:
    raise ValueError(f"{name} must be [N, H, W] or [N, H, W, 1] grey images, got shape {x.shape}")
  if x.shape[0] == 0:
    raise ValueError(f"{name} holds no images")
  return x


def _range(x: np.ndarray, data_range: float | None) -> float:
  if data_range is not None:
    return float(data_range)
  if x.dtype == np.uint8:
    return 255.0
  raise ValueError(f"float images of dtype {x.dtype} need an explicit data_range "
                   "(max - min of the scale, e.g. 2.0 for [-1, 1])")


def ssim(a, b, *, data_range: float | None = None) -> float:
  """Mean SSIM of two 2-D images (Wang et al., 2004): scikit-image's `structural_similarity` with
  the paper's settings: 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, population
  covariances, mean over the map without its 5-pixel border. uint8 images have data_range 255;
  float images must say theirs."""
  a, b = np.asarray(a), np.asarray(b)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"ssim needs two 2-D images of one shape, got {a.shape} and {b.shape}")
  if min(a.shape) < 11:
    raise ValueError(f"ssim's 11x11 window needs images of at least 11 px, got {a.shape}")
  rng = _range(a, data_range)
  return float(structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=rng,
                                     gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, K1=0.01, K2=0.03))


def derangement(n: int, seed: int) -> np.ndarray:
  """A seeded permutation j with j[i] != i: one random cycle through all n indices."""
  if n < 2:
    raise ValueError(f"a derangement needs at least 2 images, got {n}")
  order = np.random.default_rng(seed).permutation(n)
  j = np.empty(n, np.int64)
  j[order] = np.roll(order, -1)
  return j


def ssim_to_sources(sources, translated, *, seed: int = 0,
                    data_range: float | None = None) -> tuple[float, float]:
  """(mean SSIM(translated_i, source_i), mean SSIM(translated_i, source_j(i))), j a derangement."""
  s, t = _images(sources, "sources"), _images(translated, "translated")
  if s.shape != t.shape:
    raise ValueError(f"sources {s.shape} and translated {t.shape} must pair one to one")
  rng = _range(t, data_range)
  j = derangement(len(s), seed)
  own = np.mean([ssim(t[i], s[i], data_range=rng) for i in range(len(s))])
  other = np.mean([ssim(t[i], s[j[i]], data_range=rng) for i in range(len(s))])
  return float(own), float(other)


def input_dependence(sources, translated, seed: int = 0, *,
                     data_range: float | None = None) -> float:
  """Mean SSIM to the own source minus mean SSIM to another source (seeded derangement)."""
  own, other = ssim_to_sources(sources, translated, seed=seed, data_range=data_range)
  return own - other


def diversity(images, *, seed: int = 0, max_images: int = DIVERSITY_MAX_IMAGES) -> float:
  """1 - mean Pearson correlation over pairs i < j of the images.

  Each image is standardised over its pixels; the correlation is then a dot product / pixels.
  Above `max_images` images a seeded subset of that many is used (all its pairs). A flat image
  has no correlation: it counts 1 against another flat image (a repeated flat output has no
  diversity) and 0 against a textured one.
  """
  x = _images(images, "images").astype(np.float64)
  n = len(x)
  if n < 2:
    raise ValueError(f"diversity needs at least 2 images, got {n}")
  if n > max_images:
    x = x[np.sort(np.random.default_rng(seed).choice(n, max_images, replace=False))]
    n = max_images
  flat = x.reshape(n, -1)
  flat = flat - flat.mean(1, keepdims=True)
  std = flat.std(1)
  is_flat = std <= 1e-12 * np.maximum(1.0, np.abs(x.reshape(n, -1)).max(1))
  z = np.where(is_flat[:, None], 0.0, flat / np.where(is_flat, 1.0, std)[:, None])
  corr = (z @ z.T) / z.shape[1]
  corr[np.ix_(is_flat, is_flat)] = 1.0
  upper = np.triu_indices(n, 1)
  return float(1.0 - corr[upper].mean())


def relative_diversity(synthetic, real_target, *, seed: int = 0) -> float:
  """diversity(synthetic) / diversity(real_target): 1 means as varied as the real class."""
  real = diversity(real_target, seed=seed)
  if real <= 0.0:
    raise ValueError("the real target images have no diversity: the ratio is undefined")
  return diversity(synthetic, seed=seed) / real


def target_share(probs, target_index: int) -> float:
  """Share of images whose argmax class is `target_index` (probs [N, K] of a classifier)."""
  p = np.asarray(probs)
  if p.ndim != 2 or p.shape[0] == 0:
    raise ValueError(f"probs must be [N, K] with N > 0, got shape {p.shape}")
  if not 0 <= int(target_index) < p.shape[1]:
    raise ValueError(f"target_index {target_index} is not a class of probs [N, {p.shape[1]}]")
  return float(np.mean(p.argmax(1) == int(target_index)))


def labelled_grid(sources, translated, n: int = 8, *, data_range: float | None = None,
                  value_min: float = 0.0) -> np.ndarray:
  """uint8 picture: one row per pair (first n), columns source | translated | |difference|.

  The difference is |translated - source| on the 0-255 scale times DIFFERENCE_GAIN (4), clipped,
  so a change of 64 grey levels or more is white and an unchanged pixel black. A header row carries
  the column labels. Float images are mapped from [value_min, value_min + data_range] to 0-255.
  """
  s, t = _images(sources, "sources"), _images(translated, "translated")
  if s.shape != t.shape:
    raise ValueError(f"sources {s.shape} and translated {t.shape} must pair one to one")
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  s, t = s[:n], t[:n]
  if s.dtype != np.uint8 or t.dtype != np.uint8:
    span = (value_min, value_min + _range(t if t.dtype != np.uint8 else s, data_range))
    s = s if s.dtype == np.uint8 else grid.to_uint8(s, span)
    t = t if t.dtype == np.uint8 else grid.to_uint8(t, span)
  diff = grid.to_uint8(np.abs(t.astype(np.float32) - s.astype(np.float32)) * DIFFERENCE_GAIN)
  body = grid.tile(np.stack([s, t, diff], 1))
  w, pad = s.shape[2], 2
  header = Image.new("L", (body.shape[1], _HEADER), 255)
  draw = ImageDraw.Draw(header)
  font = ImageFont.load_default()
  for col, label in enumerate(_LABELS):
    draw.text((col * (w + pad) + 1, 1), label, fill=0, font=font)
  return np.concatenate([np.asarray(header, np.uint8), np.full((pad, body.shape[1]), 255, np.uint8),
                         body])


def translation_quality(sources, translated, real_target, *,
                        features_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                        probs=None, target_index: int | None = None, seed: int = 0,
                        data_range: float | None = None) -> dict[str, Any]:
  """All figures of one translator as a JSON-serialisable dict of plain numbers.

  `sources` [N, H, W(, 1)] and `translated` (same shape) pair one to one; `real_target` holds real
  images of the target class. KID needs `features_fn` (images -> [N, D] features) and is computed
  on translated vs real target; `target_share` needs `probs` of the translated images and
  `target_index`. Absent inputs leave their figures out.
  """
  own, other = ssim_to_sources(sources, translated, seed=seed, data_range=data_range)
  div = diversity(translated, seed=seed)
  real_div = diversity(real_target, seed=seed)
  out: dict[str, Any] = {
      "n_translated": int(len(_images(translated, "translated"))),
      "n_real_target": int(len(_images(real_target, "real_target"))),
      "ssim_own_source": own, "ssim_other_source": other, "input_dependence": own - other,
      "diversity": div, "diversity_real_target": real_div,
      "relative_diversity": div / real_div if real_div > 0 else None,
      "seed": int(seed),
  }
  if features_fn is not None:
    kid_mean, kid_std = fid.kernel_inception_distance(
        np.asarray(features_fn(np.asarray(translated))),
        np.asarray(features_fn(np.asarray(real_target))), seed=seed)
    out.update(kid=kid_mean, kid_std=kid_std)
  if probs is not None:
    if target_index is None:
      raise ValueError("target_share needs target_index beside probs")
    out["target_share"] = target_share(probs, target_index)
  return out
