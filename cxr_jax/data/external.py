"""The external test set (`config.external_test_dir`): radiographs from elsewhere, for testing only.

A classifier can score high on its own test split by reading what separates the sources of its
classes (age, hospital, markers) rather than the lungs; images from another source, labelled with
the same classes, show how much of the accuracy travels. The external set is read exactly as the
run's own data is (`layout.discover` for any folder layout or zip the project reads, or
`layout.from_labels_csv` for a `file,label[,split]` CSV; prepared once by `tfds_builder`), but
never split, trained on or used to choose anything: it is only predicted.

- Classes: those of `config.data.classes`; a class without images is allowed (named in
  `missing_classes`); a database class the run does not use (e.g. `Lung_Opacity/` of a later
  release) is left out and named; any other class name is an error.
- Unreadable files are skipped, named and counted (`skipped`).
- Overlap with the run's data (every split): an image whose decoded pixels equal one of the run's
  (sha256) or that is a near-duplicate of one (the perceptual-hash rule of `splits.py`) is left
  out of the external figures and listed in `overlap`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping

import ml_collections
import numpy as np
from absl import logging

from cxr_jax.data import classes as classes_lib
from cxr_jax.data import dataset
from cxr_jax.data import layout as layout_lib
from cxr_jax.data import records
from cxr_jax.data import splits as splits_lib
from cxr_jax.data import tfds_builder
from cxr_jax.data.dataset import ImageSet
from cxr_jax.errors import DataError

KEY = "config.external_test_dir"


@dataclasses.dataclass(frozen=True)
class ExternalSet:
  """The external images kept for the figures, and what was found, left out and why."""
  images: ImageSet  # kept: readable, of the run's classes, no overlap with the run's data
  source: str  # the folder (or CSV) as found
  found: dict[str, int]  # readable images per run class, before the overlap check
  missing_classes: tuple[str, ...]  # run classes without an external image
  ignored_classes: dict[str, int]  # database classes the run does not use: images left out
  skipped: tuple[dict[str, str], ...]  # unreadable files: {'file', 'class', 'reason'}
  overlap: tuple[dict[str, Any], ...]  # {'file', 'class', 'kind', 'split', 'matches'}

  def summary(self) -> dict[str, Any]:
    """Plain data for reports (no images)."""
    kinds = [o["kind"] for o in self.overlap]
    return {"source": self.source, "found": dict(self.found), "kept": self.images.counts(),
            "n_kept": len(self.images), "missing_classes": list(self.missing_classes),
            "ignored_classes": dict(self.ignored_classes),
            "skipped": [dict(s) for s in self.skipped], "n_skipped": len(self.skipped),
            "overlap": [dict(o) for o in self.overlap],
            "n_exact_duplicates": kinds.count("exact"),
            "n_near_duplicates": kinds.count("near")}


def _layout(path: pathlib.Path, classes: tuple[str, ...]) -> layout_lib.Layout:
  """The layout of a folder / zip / labels CSV, with the errors naming this config key."""
  try:
    if path.is_file() and path.suffix.lower() == ".csv":
      return layout_lib.from_labels_csv(path, "", classes)
    return layout_lib.discover(path, classes)
  except DataError as e:
    text = str(e).replace("config.data.data_dir", KEY).replace("config.data.labels_csv", KEY)
    raise DataError(text if KEY in text else f"{KEY}: {text}") from None


def load_external(path: str | os.PathLike, data_cfg: ml_collections.ConfigDict,
                  reference: Mapping[str, ImageSet]) -> ExternalSet:
  """The external set at `path` at the run's image size and classes (`data_cfg`), without the
  images that are also (exactly or nearly) in `reference` (the run's splits)."""
  classes, size = dataset.check_config(data_cfg)
  given = pathlib.Path(os.path.expanduser(str(path)))
  if not given.exists():
    raise DataError(f"{KEY}: {given} does not exist")
  layout = _layout(given, classes)
  counts = layout.counts()
  unknown = [c for c in layout.classes if c not in classes and c not in classes_lib.CANONICAL]
  if unknown:
    folders = ", ".join(f"'{'/'.join(layout.class_folders.get(c, (c,)))}'" for c in unknown)
    raise DataError(f"{KEY}: {layout.root_path} holds class(es) {', '.join(unknown)} (folders "
                    f"{folders}) that are not among config.data.classes {classes}; an external "
                    "set must use the run's classes")
  ignored = {c: counts[c] for c in layout.classes if c not in classes}
  if not any(counts.get(c, 0) for c in classes):
    raise DataError(f"{KEY}: {layout.labels_csv or layout.root_path} holds no image of the run's "
                    f"classes {', '.join(classes)}")
  try:
    prepared = tfds_builder.prepare(layout, size, dataset.cache_dir(data_cfg))
  except DataError as e:
    raise DataError(f"{KEY}: {e}") from None
  arrays = tfds_builder.load_arrays(prepared)
  wanted = {prepared.class_names.index(c): k for k, c in enumerate(classes)
            if c in prepared.class_names}
  skipped = tuple(dict(s) for s in prepared.skipped if s["class"] in classes)
  if skipped:
    shown = "; ".join(f"{s['file']} ({s['reason']})" for s in skipped[:20])
    logging.warning("External test set: skipped %d unreadable file(s) of %s: %s%s", len(skipped),
                    prepared.source, shown, " ..." if len(skipped) > 20 else "")
  keep = np.flatnonzero(np.isin(arrays["label"], list(wanted)))
  if not len(keep):
    raise DataError(f"{KEY}: none of the images of {prepared.source} of the run's classes can "
                    f"be read ({len(skipped)} skipped as unreadable)")
  images = ImageSet(images=np.ascontiguousarray(arrays["image"][keep]),
                    labels=np.array([wanted[int(v)] for v in arrays["label"][keep]], np.int32),
                    files=tuple(arrays["file"][i] for i in keep),
                    hashes=tuple(arrays["sha256"][i] for i in keep), class_names=classes)
  found = images.counts()
  missing = tuple(c for c in classes if found[c] == 0)
  overlap = find_overlap(images, reference)
  out = images.subset(np.setdiff1d(np.arange(len(images)), [o["index"] for o in overlap]))
  if not len(out):
    raise DataError(f"{KEY}: every image of {prepared.source} is also (or nearly) an image of "
                    "the run's own data; nothing is left to test on")
  result = ExternalSet(images=out, source=str(prepared.source), found=found,
                       missing_classes=missing, ignored_classes=ignored, skipped=skipped,
                       overlap=tuple({k: v for k, v in o.items() if k != "index"}
                                     for o in overlap))
  logging.info("External test set %s: %d image(s) %s kept; %d left out as exact and %d as near "
               "duplicates of the run's data; %d unreadable%s%s", result.source, len(out),
               out.counts(), result.summary()["n_exact_duplicates"],
               result.summary()["n_near_duplicates"], len(skipped),
               f"; no image of {', '.join(missing)}" if missing else "",
               f"; classes not used: {ignored}" if ignored else "")
  return result


def find_overlap(external: ImageSet, reference: Mapping[str, ImageSet]) -> list[dict[str, Any]]:
  """External images that are exact (equal sha256 of the decoded pixels) or near duplicates
  (`splits.find_near_duplicates`) of an image of `reference` (split name -> ImageSet), with the
  split and files they match; one entry per external image, exact before near."""
  where: dict[str, list[tuple[str, str]]] = {}
  for split, s in reference.items():
    for f, h in zip(s.files, s.hashes):
      where.setdefault(h, []).append((split, f))
  out: dict[int, dict[str, Any]] = {}
  for i, (f, h) in enumerate(zip(external.files, external.hashes)):
    if h in where:
      out[i] = {"index": i, "file": f, "class": external.class_names[external.labels[i]],
                "kind": "exact", "split": where[h][0][0],
                "matches": [m for _, m in where[h][:3]]}
  ref = [s for s in reference.values() if len(s)]
  if ref:
    ref_images = records.concat([s.images for s in ref])
    ref_files = [(split, f) for split, s in reference.items() for f in s.files]
    n = len(ref_images)
    pairs = splits_lib.find_near_duplicates(records.concat([ref_images, external.images]),
                                            np.arange(n), np.arange(n, n + len(external)))
    for p in pairs:
      i = p.test - n
      if i in out:
        if out[i]["kind"] == "near" and len(out[i]["matches"]) < 3:
          out[i]["matches"].append(ref_files[p.train][1])
        continue
      out[i] = {"index": i, "file": external.files[i],
                "class": external.class_names[external.labels[i]], "kind": "near",
                "split": ref_files[p.train][0], "matches": [ref_files[p.train][1]],
                "phash_distance": p.distance, "correlation": round(p.correlation, 4)}
  return [out[i] for i in sorted(out)]
