"""Deterministic, stratified, duplicate-aware train / val / test splits and the split manifest.

Test accuracy means something only if no test image is also a training image. The COVID-19
Radiography Database merges several public sources and holds exact and near copies, so:
- images with equal pixels (equal sha256 at the run's size) form one group, and a group goes to one
  split as a whole; a group spread over several classes has no trustworthy label and is dropped
  (warning + manifest);
- near-duplicates (a re-encoded, re-leveled or re-scaled copy) are found with a 64-bit perceptual
  hash (pHash: DCT of a 32 x 32 area-downsample, 8 x 8 lowest frequencies against their median).
  A train/test pair is a near-duplicate when the hashes differ in at most `PHASH_MAX_DISTANCE`
  bits *and* the 32 x 32 thumbnails correlate at `MIN_CORRELATION` or more. The two tests are
  needed together: on the database's uniform paediatric radiographs, different patients can be
  4 bits apart, yet their thumbnails correlate below 0.96; a JPEG re-encode, a +15 % brightness
  or +30 % contrast copy stays within 6 bits and above 0.98. Pairs are always written to the
  manifest; `config.data.drop_near_duplicates` also drops their test images.

Each class is shuffled by its own generator, seeded by (split_seed, class name): adding a class to
`config.data.classes` does not move the images of the others. Per class, the split sizes are the
fractions of the class's images, rounded by largest remainder; a class of 3 or more groups gets at
least one group in every split.

With patients (a `patient_id` column of the labels CSV, or DICOM PatientID), a patient's images
never straddle splits: images of one patient, and images equal to them, form one group (a
patient's images may carry different labels: serial films), and the groups are split by
scikit-learn's `StratifiedGroupKFold` (shuffled by `split_seed`) into `k` folds, `k` the smallest
number of folds (up to 20) in which each fraction is a whole number of folds to within 0.05
(0.7 / 0.1 / 0.2 -> 10 folds: 7 train, 1 val, 2 test; the split summary's `split_from` names
them). Folds hold whole patients, so split sizes are near the fractions, not exact, and a small
class may miss a split. Images without a patient id are groups of their own.

A predefined split (the `split` column of `config.data.labels_csv`) is taken as given, after the
same checks: identical images under different labels are dropped as above; identical images given
to different splits are an error naming both files (the run cannot keep the CSV's split without a
test image also being a training image, and picking one for the user would silently change it);
near-duplicates are reported (and dropped from test) as above; a patient given to two splits is
an error naming the patient. Every split must get an image.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
import pathlib
import warnings
import zlib
from typing import Iterable, Sequence

import numpy as np
from absl import logging
from sklearn import model_selection

from cxr_jax.data import records
from cxr_jax.errors import ConfigError
from cxr_jax.errors import DataError

SPLITS = ("train", "val", "test")
DROPPED = "dropped"
SKIPPED = "skipped"
PHASH_MAX_DISTANCE = 10
MIN_CORRELATION = 0.98
MANIFEST = "split_manifest.csv"
SUMMARY = "split_summary.json"
MANIFEST_COLUMNS = ("file", "sha256", "class", "split", "note")
# Metadata columns with a meaning, written after MANIFEST_COLUMNS in this order (others sorted).
METADATA_COLUMNS = ("patient_id", "age", "sex", "view", "source")


def check_fractions(fractions: Sequence[float], key: str = "data.split_fractions"
                    ) -> tuple[float, float, float]:
  """Train / val / test fractions: three positive numbers that sum to 1."""
  try:
    values = tuple(float(f) for f in fractions)
  except (TypeError, ValueError):
    raise ConfigError(f"config.{key}: expected three numbers (train, val, test), got "
                      f"{fractions!r}") from None
  if len(values) != 3:
    raise ConfigError(f"config.{key}: expected three fractions (train, val, test), got "
                      f"{len(values)}: {fractions!r}")
  if not all(np.isfinite(v) and v > 0 for v in values):
    raise ConfigError(f"config.{key}: every fraction must be > 0, got {fractions!r}")
  if abs(sum(values) - 1.0) > 1e-6:
    raise ConfigError(f"config.{key}: the fractions must sum to 1, got {fractions!r} "
                      f"(sum {sum(values):g})")
  return values  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class NearDuplicate:
  train: int  # index of the train image
  test: int  # index of the test image
  distance: int  # pHash Hamming distance
  correlation: float


@dataclasses.dataclass(frozen=True)
class Split:
  """Per-image assignment ('train' / 'val' / 'test' / 'dropped') and the reasons behind it."""
  assignment: tuple[str, ...]
  notes: tuple[str, ...]
  near_duplicates: tuple[NearDuplicate, ...]

  def indices(self, split: str) -> np.ndarray:
    return np.array([i for i, a in enumerate(self.assignment) if a == split], np.int64)


def make_split(files: Sequence[str], labels: Sequence[int], hashes: Sequence[str],
               images: np.ndarray, *, class_names: Sequence[str], fractions: Sequence[float],
               seed: int, drop_near_duplicates: bool = False,
               given: Sequence[str] | None = None, given_by: str = "",
               patients: Sequence[str] | None = None) -> Split:
  """Splits images (already filtered to the run's classes) into train / val / test.

  `given`: each image's split as predefined (by the file `given_by`), kept instead of the seeded
  stratified split; see the module doc for the duplicate checks. `patients`: each image's patient
  id ('' when unknown); a patient's images go to one split (module doc).
  """
  fractions = check_fractions(fractions)
  n = len(files)
  labels = np.asarray(labels)
  assignment = [""] * n
  notes: list[list[str]] = [[] for _ in range(n)]

  groups: dict[str, list[int]] = collections.defaultdict(list)
  for i, h in enumerate(hashes):
    groups[h].append(i)
  per_class: dict[int, list[list[int]]] = collections.defaultdict(list)
  ambiguous = []
  for members in groups.values():
    members.sort(key=lambda i: files[i])
    group_labels = sorted({int(labels[i]) for i in members})
    if len(group_labels) > 1:
      names = ", ".join(class_names[c] for c in group_labels)
      for i in members:
        assignment[i] = DROPPED
        others = "; ".join(files[j] for j in members if j != i)
        notes[i].append(f"identical image in classes {names} (ambiguous label): {others}")
      ambiguous.append(members)
      continue
    if len(members) > 1:
      for i in members:
        notes[i].append(f"identical to {'; '.join(files[j] for j in members if j != i)} "
                        "(kept in one split)")
    per_class[group_labels[0]].append(members)
  if patients is not None and any(patients):
    kept = [m for groups_ in per_class.values() for m in groups_]
    merged = _merge_patients(kept, patients)
    if given is not None:
      _check_given_patients(files, given, patients, merged, given_by)
      _take_given(files, given, per_class, assignment, notes, given_by)
    else:
      _grouped_assign(merged, labels, fractions, seed, assignment)
    per_class = {}
  elif given is not None:
    _take_given(files, given, per_class, assignment, notes, given_by)
    per_class = {}
  if ambiguous:
    shown = "; ".join(" = ".join(f"{files[i]} ({class_names[labels[i]]})" for i in m)
                      for m in ambiguous[:5])
    logging.warning("Dropped %d image(s): identical pixels under different classes, so the label "
                    "is ambiguous: %s%s", sum(len(m) for m in ambiguous), shown,
                    f" and {len(ambiguous) - 5} more groups (see the split manifest)"
                    if len(ambiguous) > 5 else "")

  for c, class_groups in sorted(per_class.items()):
    class_groups.sort(key=lambda m: files[m[0]])
    rng = np.random.default_rng([seed, zlib.crc32(class_names[c].encode())])
    order = rng.permutation(len(class_groups))
    sizes = [len(class_groups[k]) for k in order]
    quotas = _quotas(sum(sizes), fractions, min_each=len(class_groups) >= len(SPLITS))
    for k, split in zip(order, _assign(sizes, quotas)):
      for i in class_groups[k]:
        assignment[i] = SPLITS[split]

  near = find_near_duplicates(images, [i for i in range(n) if assignment[i] == "train"],
                              [i for i in range(n) if assignment[i] == "test"])
  partners: dict[int, list[NearDuplicate]] = collections.defaultdict(list)
  for d in near:
    partners[d.train].append(d)
    partners[d.test].append(d)
  for i, ds in partners.items():
    is_test = assignment[i] == "test"
    shown = ", ".join(f"{files[d.train if is_test else d.test]} (pHash distance {d.distance}, "
                      f"correlation {d.correlation:.3f})" for d in ds[:3])
    more = f" and {len(ds) - 3} more" if len(ds) > 3 else ""
    note = f"near-duplicate of {'train' if is_test else 'test'} image(s) {shown}{more}"
    if is_test and drop_near_duplicates:
      note += ": dropped from test"
    notes[i].append(note)
  if near:
    logging.warning("%d near-duplicate train/test pair(s) (listed in the split manifest)%s",
                    len(near), "; their test images are dropped" if drop_near_duplicates else
                    "; set config.data.drop_near_duplicates=True to drop their test images")
  if drop_near_duplicates:
    for d in near:
      assignment[d.test] = DROPPED
  return Split(tuple(assignment), tuple("; ".join(x) for x in notes), tuple(near))


def _merge_patients(groups: Sequence[list[int]], patients: Sequence[str]) -> list[list[int]]:
  """Joins groups of identical images that share a patient (union-find): the groups to split."""
  parent = list(range(len(groups)))

  def find(g: int) -> int:
    while parent[g] != g:
      parent[g] = parent[parent[g]]
      g = parent[g]
    return g

  first: dict[str, int] = {}
  for g, members in enumerate(groups):
    for i in members:
      if patients[i]:
        other = first.setdefault(patients[i], g)
        parent[find(g)] = find(other)
  merged: dict[int, list[int]] = collections.defaultdict(list)
  for g, members in enumerate(groups):
    merged[find(g)].extend(members)
  return [sorted(m) for m in merged.values()]


def fold_plan(fractions: Sequence[float]) -> tuple[int, tuple[int, int, int]]:
  """(k, folds per split): the fewest folds in which every fraction is whole to within 0.05."""
  for k in range(len(SPLITS), 21):
    counts = [round(f * k) for f in fractions]
    if min(counts) >= 1 and all(abs(f * k - c) <= 0.05 for f, c in zip(fractions, counts)):
      return k, tuple(counts)  # type: ignore[return-value]
  k = 20
  counts = [max(1, round(f * k)) for f in fractions]
  counts[int(np.argmax(counts))] += k - sum(counts)
  return k, tuple(counts)  # type: ignore[return-value]


def _grouped_assign(groups: Sequence[list[int]], labels: np.ndarray, fractions: Sequence[float],
                    seed: int, assignment: list[str]) -> None:
  """Stratified split of whole groups (patients) with scikit-learn's StratifiedGroupKFold."""
  k, per_split = fold_plan(fractions)
  if len(groups) < k:
    raise DataError(f"config.data.split_fractions={tuple(fractions)}: a split by patient needs "
                    f"at least {k} patients (folds of 1/{k}); the data hold {len(groups)} "
                    "patient group(s) (patients come from the labels CSV's patient_id column, "
                    "else DICOM PatientID; give a patient_id column to override the header's)")
  order = sorted(range(len(groups)), key=lambda g: groups[g][0])
  index = np.array([i for g in order for i in groups[g]], np.int64)
  group_of = np.array([g for g in order for _ in groups[g]], np.int64)
  splitter = model_selection.StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
  with warnings.catch_warnings():  # "least populated class has only n members": the split
    warnings.simplefilter("ignore", UserWarning)  # stays valid, the classes only less balanced
    folds = [test for _, test in splitter.split(np.zeros(len(index)), labels[index], group_of)]
  bounds = np.cumsum(per_split)
  for f, rows in enumerate(folds):
    split = SPLITS[int(np.searchsorted(bounds, f, side="right"))]
    for i in index[rows]:
      assignment[int(i)] = split
  empty = [s for s in SPLITS if s not in assignment]
  if empty:
    raise DataError(f"the split by patient left split(s) {', '.join(empty)} without an image; "
                    "more patients, or other config.data.split_fractions, are needed")


def _check_given_patients(files: Sequence[str], given: Sequence[str], patients: Sequence[str],
                          groups: Sequence[list[int]], given_by: str) -> None:
  """A predefined split must not put one patient's images in two splits."""
  for members in groups:
    splits = {given[i] for i in members}
    if len(splits) > 1:
      shown = "; ".join(f"{files[i]} ({given[i]})" for i in members[:6])
      who = sorted({patients[i] for i in members if patients[i]})
      raise DataError(f"{given_by}: patient {', '.join(who)} has images in splits "
                      f"{', '.join(sorted(splits))}: {shown}. Put each patient in one split.")


def _take_given(files: Sequence[str], given: Sequence[str],
                per_class: dict[int, list[list[int]]], assignment: list[str],
                notes: list[list[str]], given_by: str) -> None:
  """Assigns each kept group its predefined split; refuses identical images in two splits."""
  conflicts = []
  for class_groups in per_class.values():
    for members in class_groups:
      if len({given[i] for i in members}) > 1:
        conflicts.append(" = ".join(f"{files[i]} ({given[i]})" for i in members))
      for i in members:
        if given[i] not in SPLITS:
          raise DataError(f"{given_by}: {files[i]}: unknown split {given[i]!r}")
        assignment[i] = given[i]
        notes[i].append("split as given in the labels CSV")
  if conflicts:
    raise DataError(
        f"{given_by}: {len(conflicts)} group(s) of identical images are given different splits, "
        f"so a held-out image would also be a training image: {'; '.join(conflicts[:5])}"
        f"{' ...' if len(conflicts) > 5 else ''}. Put each group in one split (or remove the "
        "copies) in the CSV.")
  empty = [s for s in SPLITS if s not in assignment]
  if empty:
    raise DataError(f"{given_by}: no image in split(s) {', '.join(empty)}; the split column must "
                    "give every split (train, val, test) at least one image")


def _quotas(n: int, fractions: Sequence[float], min_each: bool) -> list[int]:
  """Largest-remainder rounding of n * fractions (sums to n exactly)."""
  raw = [n * f for f in fractions]
  quotas = [int(np.floor(r)) for r in raw]
  by_remainder = sorted(range(len(raw)), key=lambda k: (-(raw[k] - quotas[k]), k))
  for k in by_remainder[:n - sum(quotas)]:
    quotas[k] += 1
  if min_each:
    for k in range(len(quotas)):
      if quotas[k] == 0:
        quotas[int(np.argmax(quotas))] -= 1
        quotas[k] = 1
  return quotas


def _assign(sizes: Sequence[int], quotas: Sequence[int]) -> list[int]:
  """The split of each group (given in shuffled order): one that still has room for all of it.

  Groups go biggest first (singletons keep the shuffled order), each to the split with the most
  room left relative to its quota. Singletons, almost every group, then fill the quotas exactly;
  a group that fits nowhere goes where most room is left, so sizes stay within a group of target.
  """
  left = list(quotas)
  chosen = [0] * len(sizes)
  for k in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
    fits = [s for s in range(len(left)) if left[s] >= sizes[k]]
    if fits:
      s = max(fits, key=lambda s: (left[s] / max(quotas[s], 1), -s))
    else:
      s = int(np.argmax(left))
    chosen[k] = s
    left[s] -= sizes[k]
  return chosen


def perceptual_hash(images: np.ndarray, chunk: int = 512, *, thumbnails: bool = True
                    ) -> tuple[np.ndarray, np.ndarray | None]:
  """64-bit pHash (uint64 [N]) and unit-norm, zero-mean 32 x 32 thumbnails (float32 [N, 1024];
  None when not asked for). `images` is read `chunk` images at a time (an array, or a view of
  images on disk: `data.records`)."""
  n = len(images)
  hashes = np.zeros(n, np.uint64)
  thumbs = np.zeros((n, 32 * 32), np.float32) if thumbnails else None
  dct = _dct_matrix(32)
  for start in range(0, n, chunk):
    block = np.asarray(images[start:start + chunk])
    if block.ndim == 4:
      block = block[..., 0]
    t = _area_downsample(block, 32)
    coef = (dct @ t @ dct.T)[:, :8, :8].reshape(len(t), 64)
    bits = coef > np.median(coef[:, 1:], axis=1, keepdims=True)
    hashes[start:start + chunk] = np.packbits(bits, axis=1).view(">u8")[:, 0]
    if thumbs is not None:
      flat = t.reshape(len(t), -1)
      flat = flat - flat.mean(axis=1, keepdims=True)
      norm = np.linalg.norm(flat, axis=1, keepdims=True)
      thumbs[start:start + chunk] = flat / np.where(norm > 0, norm, 1.0)
  return hashes, thumbs


def find_near_duplicates(images: np.ndarray, train: Sequence[int], test: Sequence[int],
                         block: int = 256) -> list[NearDuplicate]:
  """Train/test pairs within PHASH_MAX_DISTANCE bits and MIN_CORRELATION (see module doc).
  Hashes first; thumbnails only of the images in a pair close enough by hash, so the memory
  held does not grow with the images' size (a streamed run's images stay on disk)."""
  train, test = np.asarray(train, np.int64), np.asarray(test, np.int64)
  if not len(train) or not len(test):
    return []
  hashes, _ = perceptual_hash(images, thumbnails=False)
  train_hashes = hashes[train]
  pairs = []  # (test image, train image, distance)
  for start in range(0, len(test), block):
    rows = test[start:start + block]
    dist = np.bitwise_count(hashes[rows][:, None] ^ train_hashes[None, :])
    r, t = np.nonzero(dist <= PHASH_MAX_DISTANCE)
    pairs.extend(zip(rows[r].tolist(), train[t].tolist(), dist[r, t].tolist()))
  if not pairs:
    return []
  involved = np.unique([i for p in pairs for i in p[:2]])
  _, thumbs = perceptual_hash(records.take(images, involved))  # read 512 at a time
  where = {int(i): k for k, i in enumerate(involved)}
  out = []
  for te, tr, d in pairs:
    corr = float(thumbs[where[te]] @ thumbs[where[tr]])
    if corr >= MIN_CORRELATION:
      out.append(NearDuplicate(int(tr), int(te), int(d), corr))
  return sorted(out, key=lambda d: (d.test, d.train))


def _area_downsample(x: np.ndarray, size: int) -> np.ndarray:
  """[N, H, W] -> float32 [N, size, size], each output pixel the mean of its input area."""
  _, h, w = x.shape
  r = np.linspace(0, h, size + 1).astype(int)
  c = np.linspace(0, w, size + 1).astype(int)
  s = np.add.reduceat(np.add.reduceat(x, r[:-1], axis=1, dtype=np.float32), c[:-1], axis=2,
                      dtype=np.float32)
  return s / np.outer(np.diff(r), np.diff(c)).astype(np.float32)


def _dct_matrix(n: int) -> np.ndarray:
  k = np.arange(n)[:, None]
  i = np.arange(n)[None, :]
  return np.cos(np.pi * (2 * i + 1) * k / (2 * n)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ManifestRow:
  file: str
  sha256: str
  cls: str
  split: str  # train / val / test / dropped / skipped
  note: str = ""
  metadata: dict[str, str] = dataclasses.field(default_factory=dict)  # extra manifest columns


def write_manifest(workdir: str | os.PathLike, rows: Iterable[ManifestRow], *,
                   class_names: Sequence[str], extra: dict | None = None) -> pathlib.Path:
  """Writes `<workdir>/split_manifest.csv` (one row per file; the metadata columns after the
  fixed ones) and `split_summary.json` (counts; patients per split when rows have a patient_id)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  rows = sorted(rows, key=lambda r: r.file)
  extra_columns = metadata_columns(r.metadata for r in rows)
  path = workdir / MANIFEST
  tmp = path.with_suffix(".tmp")
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(MANIFEST_COLUMNS + tuple(extra_columns))
    for r in rows:
      w.writerow((r.file, r.sha256, r.cls, r.split, r.note,
                  *(r.metadata.get(k, "") for k in extra_columns)))
  tmp.replace(path)
  counts = {s: {c: 0 for c in class_names} for s in (*SPLITS, DROPPED, SKIPPED)}
  patients: dict[str, set[str]] = {s: set() for s in (*SPLITS, DROPPED, SKIPPED)}
  for r in rows:
    counts[r.split][r.cls] = counts[r.split].get(r.cls, 0) + 1
    if r.metadata.get("patient_id"):
      patients[r.split].add(r.metadata["patient_id"])
  summary = {"classes": list(class_names), "counts": counts,
             "totals": {s: sum(v.values()) for s, v in counts.items()},
             "near_duplicate_rule": {"phash_max_distance": PHASH_MAX_DISTANCE,
                                     "min_correlation": MIN_CORRELATION}}
  if any(patients.values()):
    summary["patients"] = {s: len(v) for s, v in patients.items()}
  if extra_columns:
    summary["metadata_columns"] = list(extra_columns)
  summary.update(extra or {})
  (workdir / SUMMARY).write_text(json.dumps(summary, indent=1, sort_keys=False))
  return path


def metadata_columns(metadata: Iterable[dict[str, str]]) -> list[str]:
  """The metadata columns present: the known ones in a fixed order, then the others sorted."""
  present: set[str] = set()
  for m in metadata:
    present.update(k for k, v in m.items() if v)
  return [k for k in METADATA_COLUMNS if k in present] + sorted(present - set(METADATA_COLUMNS))


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
  with open(path, newline="", encoding="utf-8") as f:
    return [ManifestRow(r["file"], r["sha256"], r["class"], r["split"], r["note"],
                        {k: v for k, v in r.items()
                         if k not in MANIFEST_COLUMNS and k is not None and v})
            for r in csv.DictReader(f)]
