"""The README's figure of the embedded synthetic radiographs: one labelled row per class.

  python scripts/synthetic_figure.py --out docs/images/synthetic_samples.png [--per_class 6]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
# pylint: disable=wrong-import-position
from cxr_jax.data import synthetic  # noqa: E402
from cxr_jax.utils import grid as grid_lib  # noqa: E402


def sample_grid(per_class: int = 6, image_size: int = 256, seed: int = 0) -> np.ndarray:
  """[classes, per_class, S, S] uint8: the first images of each class."""
  return np.stack([np.stack([synthetic.render(name, seed, i, image_size) for i in range(per_class)])
                   for name in synthetic.CLASS_COUNTS])


def _label_strip(labels: list[str], cell: int, pad: int, width: int) -> np.ndarray:
  """uint8 [rows * (cell + pad) - pad, width]: each label centred beside its row (black on white).

  Matplotlib's object API (no pyplot), so the caller's backend is left alone.
  """
  height = len(labels) * (cell + pad) - pad
  fig = Figure(figsize=(width / 100.0, height / 100.0), dpi=100, facecolor="white")
  canvas = FigureCanvasAgg(fig)
  for i, label in enumerate(labels):
    fig.text(0.5, 1.0 - (i * (cell + pad) + cell / 2.0) / height, label, ha="center", va="center",
             fontsize=max(6.0, cell / 18.0), fontweight="bold", linespacing=1.3)
  canvas.draw()
  rgb = np.asarray(canvas.buffer_rgba())[:height, :width, :3].astype(np.float32)
  return np.round(rgb.mean(axis=-1)).astype(np.uint8)


def save_sample_figure(path: str | os.PathLike, per_class: int = 6, image_size: int = 256,
                       seed: int = 0, cell: int = 192) -> pathlib.Path:
  """One labelled row per class, written atomically as an 8-bit grayscale PNG.

  Images are rendered at `image_size` and shown at `cell` px (Lanczos) so that the README's figure
  stays small: quantum noise does not compress.
  """
  images = sample_grid(per_class, image_size, seed)
  if cell != image_size:
    images = np.stack([[np.asarray(Image.fromarray(im).resize((cell, cell), Image.LANCZOS))
                        for im in row] for row in images])
  pad = 4
  tiles = grid_lib.tile(images, pad=pad)
  labels = [name.replace("_", "\n") for name in synthetic.CLASS_COUNTS]
  strip = _label_strip(labels, cell, pad, width=max(90, cell // 2 + 20))
  out = np.full((tiles.shape[0], strip.shape[1] + pad + tiles.shape[1]), 255, np.uint8)
  out[:, :strip.shape[1]] = strip
  out[:, strip.shape[1] + pad:] = tiles
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  Image.fromarray(out).save(tmp, format="PNG", optimize=True)
  os.replace(tmp, path)
  return path


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python scripts/synthetic_figure.py",
      description="Write a labelled grid of synthetic radiographs (one row per class).")
  parser.add_argument("--out", default="docs/images/synthetic_samples.png")
  parser.add_argument("--per_class", type=int, default=6)
  parser.add_argument("--size", type=int, default=256, help="rendering size in pixels")
  parser.add_argument("--cell", type=int, default=192, help="size each image is shown at")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if not synthetic.MIN_SIZE <= args.size <= synthetic.MAX_SIZE or args.per_class < 1 or args.cell < 16:
    parser.error(f"need {synthetic.MIN_SIZE} <= --size <= {synthetic.MAX_SIZE}, --per_class >= 1, --cell >= 16")
  path = save_sample_figure(args.out, args.per_class, args.size, args.seed, args.cell)
  print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
  main()
