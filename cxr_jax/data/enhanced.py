"""Synthetic images with provenance: the folder the synthesize task writes and the classifier's
`enhanced` training data reads.

`<dir>/manifest.csv` traces every synthetic PNG to the real training image it was translated from
(file and pixel hash) and to the generator that made it. Reading it back is where leakage is
refused: a synthetic image made from a validation or test image, or equal to one, would let the
test set into training.
"""

from __future__ import annotations

import csv
import os
import pathlib
from typing import Mapping, Sequence

import numpy as np

from cxr_jax.data import classes as classes_lib
from cxr_jax.data import images as images_lib
from cxr_jax.data import records
from cxr_jax.data.dataset import ImageSet
from cxr_jax.data.images import pixel_hash
from cxr_jax.errors import DataError
from cxr_jax.utils import files

MANIFEST = "manifest.csv"
COLUMNS = ("file", "sha256", "class", "source_file", "source_sha256", "generator",
           "generator_step", "seed")


def write_manifest(directory: str | os.PathLike, rows: Sequence[Mapping[str, object]]) -> None:
  files.write_csv_atomic(pathlib.Path(directory) / MANIFEST, COLUMNS,
                         ([row[k] for k in COLUMNS] for row in rows))


def read_manifest(directory: str | os.PathLike) -> list[dict[str, str]]:
  path = pathlib.Path(directory) / MANIFEST
  if not path.is_file():
    raise DataError(f"{path}: no synthetic-image manifest; config.synthetic_dir must be the folder "
                    "written by the synthesize task")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = set(COLUMNS) - set(reader.fieldnames or ())
    if missing:
      raise DataError(f"{path}: not a synthetic-image manifest (missing columns "
                      f"{sorted(missing)})")
    return list(reader)


def resolve_inside(root: pathlib.Path, relative: str, manifest: pathlib.Path) -> pathlib.Path:
  """A manifest's file path, refused if it leads outside the folder the manifest describes."""
  path = (root / relative).resolve()
  if not path.is_relative_to(root.resolve()):
    raise DataError(f"{manifest}: entry {relative!r} points outside {root}; refusing to read it")
  return path


def load_synthetic_set(directory: str | os.PathLike, splits: Mapping[str, ImageSet], *,
                       image_size: int) -> ImageSet:
  """The synthetic images as an ImageSet over the splits' classes, after the leakage checks."""
  root = pathlib.Path(directory)
  manifest = root / MANIFEST
  rows = read_manifest(root)
  train = splits["train"]
  class_names = train.class_names
  held_out = {h: name for name in ("val", "test") for h in splits[name].hashes}
  train_hashes = set(train.hashes)
  problems = []
  pixels, labels, files, hashes = [], [], [], []
  for row in rows:
    cls = classes_lib.canonical(row["class"])  # written as config.target_class was spelt
    if cls not in class_names:
      raise DataError(f"{manifest}: {row['file']} has class {row['class']!r}, not one of "
                      f"{class_names}")
    if row["source_sha256"] in held_out:
      problems.append(f"{row['file']} was made from {held_out[row['source_sha256']]} image "
                      f"{row['source_file']}")
      continue
    if row["source_sha256"] not in train_hashes:
      problems.append(f"{row['file']} was made from {row['source_file']}, which is not in this "
                      "run's training split")
      continue
    decoded = images_lib.decode(resolve_inside(root, row["file"], manifest), image_size)
    digest = pixel_hash(decoded.pixels)
    if digest in held_out:
      problems.append(f"{row['file']} is identical to a {held_out[digest]} image")
      continue
    pixels.append(decoded.pixels)
    labels.append(class_names.index(cls))
    files.append(f"synthetic/{row['file']}")
    hashes.append(digest)
  if problems:
    raise DataError(f"{manifest}: refusing the enhanced set, {len(problems)} synthetic image(s) "
                    f"would leak held-out data into training (the split must be the one the "
                    f"generator was trained on): " + "; ".join(problems[:3]))
  if not pixels:
    raise DataError(f"{manifest}: lists no synthetic images")
  return ImageSet(images=np.stack(pixels)[..., None].astype(np.uint8),
                  labels=np.asarray(labels, np.int32), files=tuple(files),
                  hashes=tuple(hashes), class_names=tuple(class_names))


def concatenate(a: ImageSet, b: ImageSet) -> ImageSet:
  if tuple(a.class_names) != tuple(b.class_names):
    raise DataError(f"cannot combine image sets over classes {a.class_names} and {b.class_names}")
  return ImageSet(images=records.concat([a.images, b.images]),
                  labels=np.concatenate([a.labels, b.labels]).astype(np.int32),
                  files=tuple(a.files) + tuple(b.files), hashes=tuple(a.hashes) + tuple(b.hashes),
                  class_names=tuple(a.class_names))
