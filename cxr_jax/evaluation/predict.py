"""Classify a folder of radiographs, or one image, with a trained classifier.

One workdir serves many inputs (`input` may change between runs, see
`workdir.TASK_RESUME_SAFE_KEYS`): each input's predictions go to their own
`predictions-<slug of input>.csv`, so a new input never overwrites another's file.
"""

from __future__ import annotations

import hashlib
import pathlib
import re

import ml_collections
import numpy as np
from absl import logging

from cxr_jax import configlib
from cxr_jax.data import images as images_lib
from cxr_jax.errors import DataError
from cxr_jax.evaluation.report_classifier import write_predictions
from cxr_jax.training import export
from cxr_jax.utils import files as files_lib


def list_inputs(path: pathlib.Path) -> list[pathlib.Path]:
  if path.is_file():
    return [path]
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.is_file() and images_lib.is_image_name(p.name))
    if not files:
      raise DataError(f"{path}: no image files (looked for {', '.join(images_lib.IMAGE_SUFFIXES)})")
    return files
  raise DataError(f"{path}: no such file or folder")


def predictions_file(input_path: str | pathlib.Path) -> str:
  """`predictions-<name>-<8 hex>.csv` for an input: the name for the reader, the hash of the
  absolute path so that two inputs of the same name (`a/images`, `b/images`) never share a file."""
  path = pathlib.Path(input_path).expanduser().absolute()
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", files_lib.printable(path.name)).strip("._") or "input"
  digest = hashlib.sha256(files_lib.printable(str(path)).encode("utf-8")).hexdigest()[:8]
  return f"predictions-{name[:40]}-{digest}.csv"


def predict_task(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """The `predict` task: per-image class probabilities, printed and written to this input's CSV."""
  configlib.require(bool(config.classifier_dir), "classifier_dir",
                    "set it to an exported classifier (<classifier workdir>/classifier)")
  configlib.require(bool(config.input), "input", "set it to an image file or a folder of images")
  trained = export.load_classifier(config.classifier_dir)
  size = trained.meta.get("data_image_size") or config.data.image_size
  root = pathlib.Path(config.input)
  decoded, names, skipped = [], [], []
  for path in list_inputs(root):
    try:
      decoded.append(images_lib.decode(path, size).pixels)
      names.append(files_lib.printable(str(path.relative_to(root)) if root.is_dir() else path.name))
    except images_lib.ImageError as e:
      skipped.append(str(e))
  if skipped:
    logging.warning("Skipped %d unreadable file(s): %s", len(skipped), "; ".join(skipped[:10]))
  if not decoded:
    raise DataError(f"{root}: none of the images could be read")
  probs = trained.predict(np.stack(decoded)[..., None])
  class_names = list(trained.meta["class_names"])
  out = pathlib.Path(workdir) / predictions_file(root)
  write_predictions(out, names, None, probs, class_names)
  for name, p in zip(names, probs):
    print(f"{name}: {class_names[int(p.argmax())]}  " +
          "  ".join(f"{c}={v:.3f}" for c, v in zip(class_names, p)))
  logging.info("Wrote %s", out)
  return {"predictions": str(out), "count": len(names), "skipped": len(skipped)}
