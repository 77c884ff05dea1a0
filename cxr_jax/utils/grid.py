"""Tiling images into one picture: sample grids for the README, training samples and synthesis."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray, value_range: tuple[float, float] = (0.0, 255.0)) -> np.ndarray:
  """Maps images in `value_range` to uint8, clipping outside it."""
  lo, hi = value_range
  scaled = (np.asarray(images, np.float32) - lo) * (255.0 / (hi - lo))
  return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def tile(rows: np.ndarray, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """[R, C, H, W(, 1)] uint8 -> one [R*(H+pad)-pad, C*(W+pad)-pad] uint8 image."""
  rows = np.asarray(rows)
  if rows.ndim == 5:
    rows = rows[..., 0]
  if rows.ndim != 4:
    raise ValueError(f"expected [rows, cols, H, W], got shape {rows.shape}")
  r, c, h, w = rows.shape
  out = np.full((r * (h + pad) - pad, c * (w + pad) - pad), pad_value, np.uint8)
  for i in range(r):
    for j in range(c):
      out[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = rows[i, j]
  return out


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes a uint8 [H, W] or [H, W, 1] image atomically (no half-written PNG on a crash)."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  tmp = f"{os.fspath(path)}.tmp"
  Image.fromarray(image).save(tmp, format="PNG")
  os.replace(tmp, path)
