"""Splits are deterministic, stratified, and keep identical / near-identical images out of test."""

import csv
import hashlib
import json

import numpy as np
import pytest

from cxr_jax.data import splits
from cxr_jax.errors import ConfigError

NAMES = ("COVID", "NORMAL", "VIRAL_PNEUMONIA")
FRACTIONS = (0.7, 0.1, 0.2)


def _smooth(rng, s=32):
  """A distinct, smooth image (random low-frequency field), like radiographs at thumbnail size."""
  low = rng.normal(size=(4, 4))
  up = np.kron(low, np.ones((s // 4, s // 4)))
  up = up + 0.2 * rng.normal(size=(s, s))
  return np.clip(128 + 40 * up, 0, 255).astype(np.uint8)


def _data(counts=(10, 30, 20), seed=0):
  rng = np.random.default_rng(seed)
  imgs, labels, files = [], [], []
  for c, n in enumerate(counts):
    for i in range(n):
      imgs.append(_smooth(rng))
      labels.append(c)
      files.append(f"{NAMES[c]}/{i:03d}.png")
  return files, np.array(labels), imgs


def _hashes(imgs):
  return [hashlib.sha256(a.tobytes()).hexdigest() for a in imgs]


def _split(files, labels, imgs, **kw):
  kw = {"class_names": NAMES, "fractions": FRACTIONS, "seed": 0, **kw}
  return splits.make_split(files, labels, _hashes(imgs), np.stack(imgs)[..., None], **kw)


@pytest.mark.parametrize("bad", [(0.7, 0.2, 0.2), (0.8, 0.2, 0.0), (1.2, -0.1, -0.1),
                                 (0.5, 0.5), "abc", (0.7, 0.1, float("nan"))])
def test_fractions_validated(bad):
  with pytest.raises(ConfigError, match=r"config\.data\.split_fractions"):
    splits.check_fractions(bad)


def test_deterministic_and_seeded():
  files, labels, imgs = _data()
  a = _split(files, labels, imgs)
  assert a == _split(files, labels, imgs)
  assert a.assignment != _split(files, labels, imgs, seed=1).assignment


def test_stratified_per_class():
  files, labels, imgs = _data(counts=(10, 30, 21))
  s = _split(files, labels, imgs)
  for c, n in enumerate((10, 30, 21)):
    got = [sum(1 for i in np.flatnonzero(labels == c) if s.assignment[i] == name)
           for name in splits.SPLITS]
    assert sum(got) == n
    assert all(abs(g - f * n) < 1 for g, f in zip(got, FRACTIONS)), (c, got)


def test_tiny_class_gets_every_split():
  files, labels, imgs = _data(counts=(3, 4, 5))
  s = _split(files, labels, imgs)
  for c in range(3):
    assert {s.assignment[i] for i in np.flatnonzero(labels == c)} == set(splits.SPLITS)


def test_adding_a_class_does_not_move_the_others():
  files, labels, imgs = _data(counts=(10, 30, 20))
  three = _split(files, labels, imgs)
  two = splits.make_split(files[:40], labels[:40], _hashes(imgs[:40]),
                          np.stack(imgs[:40])[..., None], class_names=NAMES, fractions=FRACTIONS,
                          seed=0)
  assert three.assignment[:40] == two.assignment


def test_identical_images_never_straddle_splits():
  files, labels, imgs = _data(counts=(10, 30, 20))
  for k in range(5):  # 5 pairs and one triple of copies inside NORMAL
    imgs[12 + 2 * k] = imgs[11 + 2 * k].copy()
  imgs[31] = imgs[30].copy()
  imgs[32] = imgs[30].copy()
  for seed in range(5):
    s = _split(files, labels, imgs, seed=seed)
    by_hash = {}
    for h, a in zip(_hashes(imgs), s.assignment):
      by_hash.setdefault(h, set()).add(a)
    assert all(len(v) == 1 for v in by_hash.values())
  assert "identical to" in s.notes[30]


def test_same_image_in_two_classes_is_dropped(caplog):
  files, labels, imgs = _data()
  imgs[15] = imgs[3].copy()  # a COVID image also filed as NORMAL
  s = _split(files, labels, imgs)
  assert s.assignment[3] == s.assignment[15] == splits.DROPPED
  assert "ambiguous" in s.notes[3] and files[15] in s.notes[3]
  assert sum(a == splits.DROPPED for a in s.assignment) == 2
  assert any("ambiguous" in r.getMessage() for r in caplog.records)


def test_near_duplicates_found_and_optionally_dropped():
  files, labels, imgs = _data()
  base = _split(files, labels, imgs)
  assert base.near_duplicates == ()  # distinct images: no false positives
  train = int(base.indices("train")[0])
  test = int(base.indices("test")[0])
  imgs[test] = np.clip(imgs[train].astype(int) + 6, 0, 255).astype(np.uint8)  # re-leveled copy
  s = _split(files, labels, imgs)
  assert s.assignment == base.assignment
  assert [(d.train, d.test) for d in s.near_duplicates] == [(train, test)]
  assert "near-duplicate" in s.notes[test] and files[train] in s.notes[test]
  dropped = _split(files, labels, imgs, drop_near_duplicates=True)
  assert dropped.assignment[test] == splits.DROPPED
  assert dropped.assignment[train] == "train"


def test_perceptual_hash_tolerates_small_changes_not_other_images():
  rng = np.random.default_rng(1)
  a, b = _smooth(rng, 64), _smooth(rng, 64)
  bright = np.clip(a.astype(int) + 10, 0, 255).astype(np.uint8)
  h, t = splits.perceptual_hash(np.stack([a, bright, b]))
  assert np.bitwise_count(h[0] ^ h[1]) <= splits.PHASH_MAX_DISTANCE
  assert t[0] @ t[1] > splits.MIN_CORRELATION and t[0] @ t[2] < splits.MIN_CORRELATION


def test_manifest_and_summary(tmp_path):
  rows = [splits.ManifestRow("b.png", "h2", "NORMAL", "test", "note"),
          splits.ManifestRow("a.png", "h1", "COVID", "train"),
          splits.ManifestRow("c.png", "", "COVID", splits.SKIPPED, "unreadable")]
  path = splits.write_manifest(tmp_path, rows, class_names=NAMES, extra={"split_seed": 3})
  assert path == tmp_path / splits.MANIFEST
  with open(path, newline="") as f:
    table = list(csv.reader(f))
  assert table[0] == list(splits.MANIFEST_COLUMNS)
  assert [r[0] for r in table[1:]] == ["a.png", "b.png", "c.png"]
  assert splits.read_manifest(path)[1] == rows[0]
  summary = json.loads((tmp_path / splits.SUMMARY).read_text())
  assert summary["counts"]["train"]["COVID"] == 1 and summary["counts"]["test"]["NORMAL"] == 1
  assert summary["totals"]["skipped"] == 1 and summary["split_seed"] == 3


def test_patients_never_straddle_splits_and_classes_stay_stratified():
  # 40 patients with 1-4 images each; a few patients have films of two classes (serial films).
  files, labels, imgs = _data(counts=(30, 40, 30), seed=3)
  rng = np.random.default_rng(0)
  patients = [f"P{int(p):02d}" for p in rng.integers(0, 40, size=len(files))]
  patients[5] = ""  # an image without a patient id is a group of its own
  stack = np.stack(imgs)
  s = splits.make_split(files, labels, _hashes(imgs), stack, class_names=NAMES,
                        fractions=FRACTIONS, seed=0, patients=patients)
  where: dict[str, set[str]] = {}
  for p, a in zip(patients, s.assignment):
    if p:
      where.setdefault(p, set()).add(a)
  assert all(len(v) == 1 for v in where.values()), where
  assert any(len({labels[i] for i in range(len(files)) if patients[i] == p}) > 1 for p in where)
  for c in range(3):  # every class in every split, roughly at the fractions
    n = np.sum(labels == c)
    for split, frac in zip(splits.SPLITS, FRACTIONS):
      k = np.sum((labels == c) & (np.array(s.assignment) == split))
      assert k > 0 and abs(k / n - frac) < 0.2, (c, split, k, n)
  again = splits.make_split(files, labels, _hashes(imgs), stack, class_names=NAMES,
                            fractions=FRACTIONS, seed=0, patients=patients)
  assert again.assignment == s.assignment
  other = splits.make_split(files, labels, _hashes(imgs), stack, class_names=NAMES,
                            fractions=FRACTIONS, seed=1, patients=patients)
  assert other.assignment != s.assignment


def test_identical_images_of_two_patients_join_their_patients():
  files, labels, imgs = _data(counts=(12, 12, 12), seed=4)
  patients = [f"P{i % 12}" for i in range(len(files))]
  imgs[1] = imgs[20].copy()  # the same picture as COVID (patient P1) and NORMAL (patient P8)
  imgs[14] = imgs[3].copy()  # the same NORMAL picture... filed as COVID 3 (P3) and NORMAL 14 (P2)
  labels = labels.copy()
  labels[14] = labels[3]
  s = splits.make_split(files, labels, _hashes(imgs), np.stack(imgs), class_names=NAMES,
                        fractions=FRACTIONS, seed=0, patients=patients)
  # Identical pixels under two classes are dropped; under one class they join the two patients.
  assert s.assignment[1] == s.assignment[20] == splits.DROPPED
  joined = {s.assignment[i] for i in range(len(files)) if patients[i] in ("P2", "P3")}
  assert len(joined) == 1 and splits.DROPPED not in joined


def test_patient_split_plan_and_too_few_patients():
  assert splits.fold_plan((0.7, 0.1, 0.2)) == (10, (7, 1, 2))
  assert splits.fold_plan((0.5, 0.25, 0.25)) == (4, (2, 1, 1))
  assert splits.fold_plan((0.34, 0.33, 0.33)) == (3, (1, 1, 1))
  files, labels, imgs = _data(counts=(4, 4, 4))
  with pytest.raises(splits.DataError, match=r"needs at least 10 patients.*hold 6"):
    splits.make_split(files, labels, _hashes(imgs), np.stack(imgs), class_names=NAMES,
                      fractions=FRACTIONS, seed=0, patients=[f"P{i % 6}" for i in range(12)])


def test_manifest_metadata_columns_and_patient_counts(tmp_path):
  rows = [splits.ManifestRow("b.png", "h1", "COVID", "train", "", {"patient_id": "P1", "sex": "F",
                                                                     "scanner": "X"}),
          splits.ManifestRow("a.png", "h2", "NORMAL", "test", "", {"patient_id": "P2",
                                                                    "age": "41"}),
          splits.ManifestRow("c.png", "h3", "NORMAL", "train", "", {"patient_id": "P1"})]
  splits.write_manifest(tmp_path, rows, class_names=NAMES[:2])
  with open(tmp_path / splits.MANIFEST, newline="") as f:
    header = next(csv.reader(f))
  assert header == [*splits.MANIFEST_COLUMNS, "patient_id", "age", "sex", "scanner"]
  back = splits.read_manifest(tmp_path / splits.MANIFEST)
  assert back[1].metadata == {"patient_id": "P1", "sex": "F", "scanner": "X"}
  summary = json.loads((tmp_path / splits.SUMMARY).read_text())
  assert summary["patients"]["train"] == 1 and summary["patients"]["test"] == 1
  assert summary["metadata_columns"] == ["patient_id", "age", "sex", "scanner"]
