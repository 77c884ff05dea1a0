"""`load_splits(config.data)`: the radiographs of a run, decoded, split and in memory.

Every task that touches data goes through here so that all of them see the same images in the same
splits: source (the configured database or a user's class folders, a labels CSV, or the embedded
synthetic database) -> discovered layout ->
prepared array_record copy at the run's size (cached, built once) -> numpy -> the run's classes
(`config.data.classes`, or "auto": those found, sorted) and views (`config.data.views`) ->
duplicate- and patient-aware stratified split (or the labels CSV's split, with the same checks) ->
`<workdir>/split_manifest.csv` with each image's metadata.

Metadata (patient_id, age, sex, view, source, a CSV's other columns) come from the labels CSV, the
later releases' `<Class>.metadata.xlsx` (source) and DICOM headers (PatientID, ViewPosition,
PatientSex, PatientAge); a CSV's value wins over the header's.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np
from absl import logging

from cxr_jax import workdir as workdir_lib
from cxr_jax.data import classes as classes_lib
from cxr_jax.data import images as images_lib
from cxr_jax.data import layout as layout_lib
from cxr_jax.data import records
from cxr_jax.data import splits as splits_lib
from cxr_jax.data import synthetic_cache
from cxr_jax.errors import ConfigError
from cxr_jax.errors import DataError

# Smaller inputs cannot hold a radiograph's findings (and the synthetic renderer needs 32).
MIN_IMAGE_SIZE = 32


@dataclasses.dataclass(frozen=True)
class ImageSet:
  """Images of one split (or any subset): uint8 [N, H, W, 1] with labels into `class_names`."""
  images: np.ndarray  # uint8 [N, H, W, 1], or a view of them on disk (`records.LazyImages`)
  labels: np.ndarray  # int32 [N], indices into class_names
  files: tuple[str, ...]  # relative to the dataset root
  hashes: tuple[str, ...]  # sha256 hex of the decoded 8-bit pixels
  class_names: tuple[str, ...]  # canonical names, in config.data.classes order
  # file -> metadata (patient_id, age, sex, view, source, ...): non-empty values only; may hold
  # files of other splits (subsets share it).
  metadata: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict, repr=False,
                                                                compare=False)

  def __post_init__(self):
    n = len(self.labels)
    if self.images.ndim != 4 or self.images.shape[-1] != 1 or self.images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 [N, H, W, 1], got {self.images.dtype} "
                       f"{self.images.shape}")
    if not (len(self.images) == n == len(self.files) == len(self.hashes)):
      raise ValueError(f"lengths differ: {len(self.images)} images, {n} labels, "
                       f"{len(self.files)} files, {len(self.hashes)} hashes")
    if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
      raise ValueError(f"labels must index class_names {self.class_names}")

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, indices_or_mask: Sequence[int] | Sequence[bool] | np.ndarray) -> ImageSet:
    """The images at the given indices (in that order), or where a boolean mask is True."""
    idx = np.asarray(indices_or_mask)
    if idx.dtype == bool:
      if idx.shape != (len(self),):
        raise ValueError(f"mask of shape {idx.shape} for {len(self)} images")
      idx = np.flatnonzero(idx)
    idx = idx.astype(np.int64).reshape(-1)
    return ImageSet(images=records.take(self.images, idx), labels=self.labels[idx],
                    files=tuple(self.files[i] for i in idx),
                    hashes=tuple(self.hashes[i] for i in idx), class_names=self.class_names,
                    metadata=self.metadata)

  def of_class(self, name: str) -> ImageSet:
    """The images of one class; `name` in any spelling ('NORMAL', 'Normal', 'Viral Pneumonia')."""
    c = classes_lib.canonical(name)
    if c not in self.class_names:
      raise ConfigError(f"class {name!r} is not among config.data.classes {self.class_names}")
    return self.subset(self.labels == self.class_names.index(c))

  def counts(self) -> dict[str, int]:
    per = np.bincount(self.labels, minlength=len(self.class_names))
    return {c: int(k) for c, k in zip(self.class_names, per)}


def check_config(data_cfg: ml_collections.ConfigDict) -> tuple[tuple[str, ...], int]:
  """Validates the data block; returns (canonical classes, image size). The classes are () for
  config.data.classes='auto' (known once the data are found: `load_splits`)."""
  classes = () if classes_lib.is_auto(data_cfg.classes) else classes_lib.resolve(data_cfg.classes)
  resize = data_cfg.get("resize", "squash")
  if resize not in images_lib.RESIZE_MODES:
    raise ConfigError(f"config.data.resize: {resize!r} is not one of "
                      f"{', '.join(images_lib.RESIZE_MODES)}")
  views(data_cfg)
  size = data_cfg.image_size
  if not isinstance(size, int) or isinstance(size, bool) or size < MIN_IMAGE_SIZE:
    raise ConfigError(f"config.data.image_size: must be an integer >= {MIN_IMAGE_SIZE}, got "
                      f"{size!r}")
  splits_lib.check_fractions(data_cfg.split_fractions)
  records.check_placement(data_cfg)
  if not isinstance(data_cfg.split_seed, int) or isinstance(data_cfg.split_seed, bool):
    raise ConfigError(f"config.data.split_seed: must be an integer, got {data_cfg.split_seed!r}")
  return classes, size


def views(data_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """config.data.views in upper case (DICOM ViewPosition spelling); () keeps every view."""
  value = data_cfg.get("views", ())
  if isinstance(value, str):
    value = [v for v in value.split(",")]
  try:
    out = tuple(str(v).strip().upper() for v in value if str(v).strip())
  except TypeError:
    raise ConfigError(f"config.data.views: expected a list of views (e.g. ('PA', 'AP')), got "
                      f"{value!r}") from None
  return out


def cache_dir(data_cfg: ml_collections.ConfigDict) -> pathlib.Path:
  return pathlib.Path(os.path.expanduser(str(data_cfg.cache_dir or
                                             workdir_lib.default_cache_dir())))


def resolve_source(data_cfg: ml_collections.ConfigDict,
                   classes: Sequence[str] | None = None) -> layout_lib.Layout:
  """The configured data (class folders, or the labels CSV), or the embedded synthetic database
  (generated once into the cache). `classes`: canonical, default config.data.classes."""
  if classes is None:
    classes = check_config(data_cfg)[0]
  if data_cfg.get("labels_csv", ""):
    return layout_lib.from_labels_csv(data_cfg.labels_csv, data_cfg.data_dir, classes,
                                      labels_per_patient=bool(data_cfg.get("labels_per_patient",
                                                                           False)))
  if data_cfg.data_dir:
    return layout_lib.discover(data_cfg.data_dir, classes)
  size = data_cfg.image_size
  scale = float(data_cfg.get("synthetic_scale", 1.0))
  seed = int(data_cfg.get("synthetic_seed", 0))
  if not np.isfinite(scale) or scale <= 0:
    raise ConfigError(f"config.data.synthetic_scale: must be > 0, got {scale!r}")
  out = cache_dir(data_cfg) / "synthetic" / f"size{size}-scale{scale:g}-seed{seed}"
  try:
    root = synthetic_cache.generate_database(out, image_size=size, scale=scale, seed=seed)
  except OSError as e:
    raise DataError(f"{out}: cannot write the synthetic database ({e}); set "
                    "config.data.cache_dir to a writable folder") from None
  logging.warning("config.data.data_dir is empty: using the EMBEDDED SYNTHETIC radiographs in %s "
                  "(procedurally generated, not patient data; results say nothing about real "
                  "COVID-19 diagnosis). Set config.data.data_dir to the COVID-19 Radiography "
                  "Database for real runs.", root)
  return layout_lib.discover(root)


# One in-memory copy per process: the experiment loads the same data for every stage.
_MEMORY: dict[tuple[str, str], dict[str, Any]] = {}


def _load_prepared(layout: layout_lib.Layout, size: int, cache: pathlib.Path,
                   resize: str = "squash", data_cfg: ml_collections.ConfigDict | None = None):
  """The prepared copy and its arrays: in memory, or (streamed, `config.data.placement`) the
  record index with the images left on disk (`records.index`)."""
  from cxr_jax.data import tfds_builder  # pylint: disable=import-outside-toplevel
  prepared = tfds_builder.prepare(layout, size, cache, resize=resize)
  placement = records.choose_placement(data_cfg if data_cfg is not None else {},
                                       prepared.num_examples, size)
  key = (str(prepared.data_dir), layout.fingerprint, placement)
  if key not in _MEMORY:
    if placement == "stream":
      arrays = records.index(prepared)
    else:
      arrays = tfds_builder.load_arrays(prepared)
      arrays["image"].setflags(write=False)
    _MEMORY.clear()
    _MEMORY[key] = arrays
  return prepared, _MEMORY[key]


def load_splits(data_cfg: ml_collections.ConfigDict,
                workdir: str | os.PathLike | None = None) -> dict[str, ImageSet]:
  """{'train', 'val', 'test'} ImageSets of `config.data`; writes the split manifest to `workdir`."""
  classes, size = check_config(data_cfg)
  layout = resolve_source(data_cfg, classes)
  if not classes:  # config.data.classes = 'auto'
    classes = tuple(sorted(layout.classes))
    if len(classes) < 2:
      raise DataError(f"{layout.labels_csv or layout.root_path}: config.data.classes='auto' "
                      f"found {len(classes)} class ({', '.join(classes) or 'none'}); a "
                      "classifier needs at least two class folders (or CSV labels)")
    logging.info("config.data.classes='auto': %d classes found in %s, sorted: %s", len(classes),
                 layout.labels_csv or layout.root_path,
                 ", ".join(f"{k} = {c}" for k, c in enumerate(classes)))
  layout.require_classes(classes)
  unused = [c for c in layout.classes if c not in classes]
  if unused:
    counts = layout.counts()
    logging.info("Classes in %s that config.data.classes does not list, not used: %s",
                 layout.labels_csv or layout.root_path,
                 ", ".join(f"'{'/'.join(layout.class_folders.get(c, (c,)))}' ({counts[c]} images)"
                           for c in unused))
  resize = data_cfg.get("resize", "squash")
  prepared, arrays = _load_prepared(layout, size, cache_dir(data_cfg), resize, data_cfg)
  # Prepared label ids -> indices into config.data.classes.
  wanted = {prepared.class_names.index(c): k for k, c in enumerate(classes)
            if c in prepared.class_names}
  skipped = [s for s in prepared.skipped if s["class"] in classes]
  if skipped:
    shown = "; ".join(f"{s['file']} ({s['reason']})" for s in skipped[:20])
    more = f"; and {len(skipped) - 20} more" if len(skipped) > 20 else ""
    logging.warning("Skipped %d unreadable file(s) of %s: %s%s", len(skipped), prepared.source,
                    shown, more)

  metadata = merged_metadata(layout, prepared)
  keep = np.flatnonzero(np.isin(arrays["label"], list(wanted)))
  keep, skipped_views = _filter_views(keep, arrays["file"], metadata, views(data_cfg),
                                      prepared.class_names, arrays["label"])
  skipped = skipped + [s for s in skipped_views if s["class"] in classes]
  labels = np.array([wanted[int(v)] for v in arrays["label"][keep]], np.int32)
  files = [arrays["file"][i] for i in keep]
  hashes = [arrays["sha256"][i] for i in keep]
  images = (records.take(arrays["image"], keep) if len(keep) != len(arrays["label"])
            else arrays["image"])
  counts = np.bincount(labels, minlength=len(classes))
  empty = [classes[k] for k in range(len(classes)) if counts[k] == 0]
  if empty:
    raise DataError(f"{prepared.source}: no readable image of class {', '.join(empty)} (all "
                    "skipped as unreadable or for a view not in config.data.views: see the "
                    "warnings above)")

  given = [layout.given_splits[f] for f in files] if layout.given_splits else None
  patients = [metadata.get(f, {}).get("patient_id", "") for f in files]
  by_patient = any(patients)
  split = splits_lib.make_split(files, labels, hashes, images, class_names=classes,
                                fractions=data_cfg.split_fractions, seed=data_cfg.split_seed,
                                drop_near_duplicates=bool(data_cfg.drop_near_duplicates),
                                given=given, given_by=layout.labels_csv,
                                patients=patients if by_patient else None)
  kept_metadata = {f: metadata[f] for f in files if f in metadata}
  out = {}
  for name in splits_lib.SPLITS:
    idx = split.indices(name)
    out[name] = ImageSet(images=records.take(images, idx), labels=labels[idx],
                         files=tuple(files[i] for i in idx),
                         hashes=tuple(hashes[i] for i in idx), class_names=classes,
                         metadata=kept_metadata)
  if workdir is not None and workdir_lib.is_writer():
    rows = _manifest_rows(files, labels, hashes, split, classes, skipped, prepared.conversions,
                          metadata)
    if given:
      split_from = layout.labels_csv
    elif by_patient:
      k, per_split = splits_lib.fold_plan(splits_lib.check_fractions(data_cfg.split_fractions))
      split_from = (f"stratified by patient (StratifiedGroupKFold, {k} folds: "
                    f"{'/'.join(str(c) for c in per_split)} train/val/test; split_seed)")
    else:
      split_from = "stratified (split_fractions, split_seed)"
    splits_lib.write_manifest(workdir, rows, class_names=classes, extra={
        "source": prepared.source, "release": prepared.release, "image_size": size,
        "split_fractions": list(splits_lib.check_fractions(data_cfg.split_fractions)),
        "split_seed": int(data_cfg.split_seed),
        "drop_near_duplicates": bool(data_cfg.drop_near_duplicates),
        "near_duplicate_pairs": len(split.near_duplicates),
        "labels_csv": layout.labels_csv,
        "classes_from": "auto (the classes found, sorted)" if classes_lib.is_auto(
            data_cfg.classes) else "config.data.classes",
        "views": list(views(data_cfg)), "resize": resize,
        "split_from": split_from})
  _log_counts(out, classes, split)
  _check_same_data_on_every_host(out, data_cfg)
  return out


def _check_same_data_on_every_host(sets: dict[str, ImageSet], data_cfg) -> None:
  """Hosts that read different copies of the database would train on different images under
  one sharded step and report numbers that belong to neither: refuse, naming what differs."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return
  import hashlib  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  digest = hashlib.sha256()
  for name in splits_lib.SPLITS:
    digest.update(name.encode())
    for h, label in zip(sets[name].hashes, sets[name].labels):
      digest.update(f"{h}:{int(label)};".encode())
  mine = np.frombuffer(digest.digest()[:16], np.uint32)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  differing = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
  if differing:
    raise DataError(f"config.data.data_dir={data_cfg.data_dir!r}: processes {differing} read "
                    "other images or another split than process 0; every host must see the same "
                    "copy of the database (a shared file system, or identical copies)")


def merged_metadata(layout: layout_lib.Layout, prepared) -> dict[str, dict[str, str]]:
  """Each file's metadata: the DICOM header's, overridden by the layout's (CSV, xlsx)."""
  out: dict[str, dict[str, str]] = {}
  for source in (prepared.metadata, layout.metadata):
    for f, m in source.items():
      out.setdefault(f, {}).update({k: v for k, v in m.items() if v})
  return out


def _filter_views(keep: np.ndarray, files: Sequence[str], metadata: Mapping[str, Mapping[str, str]],
                  wanted: Sequence[str], class_names: Sequence[str], labels: np.ndarray
                  ) -> tuple[np.ndarray, list[dict[str, str]]]:
  """Leaves out images whose view is known and not in `wanted` (config.data.views), counted."""
  if not wanted:
    return keep, []
  out, skipped = [], []
  counts: dict[str, int] = {}
  for i in keep:
    view = metadata.get(files[i], {}).get("view", "")
    if view and view not in wanted:
      counts[view] = counts.get(view, 0) + 1
      skipped.append({"file": files[i], "class": class_names[int(labels[i])],
                      "reason": f"view {view} is not in config.data.views "
                                f"({', '.join(wanted)})"})
    else:
      out.append(i)
  if skipped:
    logging.warning("Skipped %d image(s) whose view is not in config.data.views (%s): %s; set "
                    "config.data.views to keep them", len(skipped), ", ".join(wanted),
                    ", ".join(f"{v} {k}" for v, k in sorted(counts.items())))
  return np.asarray(out, np.int64), skipped


def _manifest_rows(files, labels, hashes, split: splits_lib.Split, classes, skipped,
                   conversions: Mapping[str, Sequence[str]],
                   metadata: Mapping[str, Mapping[str, str]] | None = None
                   ) -> list[splits_lib.ManifestRow]:
  metadata = metadata or {}
  converted: dict[str, list[str]] = {}
  for kind, names in conversions.items():
    for f in names:
      converted.setdefault(f, []).append(kind)
  rows = []
  for i, f in enumerate(files):
    note = "; ".join(x for x in (split.notes[i], "; ".join(f"converted: {k}"
                                                           for k in converted.get(f, ()))) if x)
    rows.append(splits_lib.ManifestRow(f, hashes[i], classes[labels[i]], split.assignment[i],
                                       note, dict(metadata.get(f, {}))))
  for s in skipped:
    reason = s["reason"] if s["reason"].startswith("view ") else f"unreadable: {s['reason']}"
    rows.append(splits_lib.ManifestRow(s["file"], "", s["class"], splits_lib.SKIPPED, reason,
                                       dict(metadata.get(s["file"], {}))))
  return rows


def _log_counts(sets: Mapping[str, ImageSet], classes, split: splits_lib.Split) -> None:
  width = max(len(c) for c in classes)
  lines = [f"{'':{width}}  " + "  ".join(f"{s:>6}" for s in sets)]
  for c in classes:
    lines.append(f"{c:{width}}  " + "  ".join(f"{sets[s].counts()[c]:>6}" for s in sets))
  dropped = sum(a == splits_lib.DROPPED for a in split.assignment)
  logging.info("Split (images per class):\n%s%s", "\n".join(lines),
               f"\n{dropped} image(s) dropped (see the split manifest)" if dropped else "")


def prepare_task(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """The `prepare_data` task: prepare the cached copy, split it, write the manifest."""
  sets = load_splits(config.data, workdir)
  counts = {name: s.counts() for name, s in sets.items()}
  logging.info("Split manifest: %s", pathlib.Path(workdir) / splits_lib.MANIFEST)
  return counts
