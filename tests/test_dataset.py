"""load_splits end to end: folder / zip / synthetic source -> prepared copy -> splits, manifest."""

import collections
import csv
import io
import json
import logging
import pathlib
import zipfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from cxr_jax import configlib
from cxr_jax.data import dataset
from cxr_jax.data import splits
from cxr_jax.data import tfds_builder
from cxr_jax.errors import ConfigError
from cxr_jax.errors import DataError

S = 64
ROOT = "COVID-19_Radiography_Dataset"
FOLDERS = {"COVID": "COVID", "NORMAL": "Normal", "VIRAL_PNEUMONIA": "Viral Pneumonia",
           "LUNG_OPACITY": "Lung_Opacity"}


def _tree(parent: pathlib.Path, n: int = 6) -> pathlib.Path:
  """A later-release tree: distinct images per class, masks, one RGB file, four bad files."""
  rng = np.random.default_rng(0)
  root = parent / ROOT
  for c, folder in FOLDERS.items():
    for i in range(n):
      low = np.kron(rng.normal(size=(4, 4)), np.ones((S // 4, S // 4)))
      a = np.clip(128 + 40 * low + 8 * rng.normal(size=(S, S)), 0, 255).astype(np.uint8)
      path = root / folder / "images" / f"{folder}-{i + 1}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(a).save(path)
      (root / folder / "masks").mkdir(exist_ok=True)
      Image.fromarray(a > 128).save(root / folder / "masks" / path.name)
    (root / f"{folder}.metadata.xlsx").write_bytes(b"xlsx")
  rgb = np.repeat(np.asarray(Image.open(root / "Normal/images/Normal-1.png"))[..., None], 3, -1)
  Image.fromarray(rgb).save(root / "Normal/images/Normal-rgb.png")  # = Normal-1 after conversion
  images = root / "COVID" / "images"
  good = (images / "COVID-1.png").read_bytes()
  (images / "COVID-truncated.png").write_bytes(good[:len(good) // 2])
  (images / "COVID-empty.png").write_bytes(b"")
  (images / "COVID-text.png").write_text("not an image")
  Image.new("L", (1, 1)).save(images / "COVID-1x1.png")
  return parent


def _cfg(data_dir, cache, **kw):
  return configlib.data_config(**{"data_dir": str(data_dir), "cache_dir": str(cache),
                                  "image_size": S, **kw})


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  return _tree(tmp_path_factory.mktemp("db"))


@pytest.fixture(scope="module")
def loaded(tree, tmp_path_factory):
  """One end-to-end load shared by the tests that only read its results."""
  base = tmp_path_factory.mktemp("run")
  cfg = _cfg(tree, base / "cache")
  handler = _Capture()
  logging.getLogger().addHandler(handler)
  try:
    sets = dataset.load_splits(cfg, base / "workdir")
  finally:
    logging.getLogger().removeHandler(handler)
  return cfg, sets, base / "workdir", handler.messages


class _Capture(logging.Handler):

  def __init__(self):
    super().__init__(logging.INFO)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def test_load_splits_end_to_end(loaded):
  _, sets, _, _ = loaded
  assert set(sets) == {"train", "val", "test"}
  for s in sets.values():
    assert s.images.dtype == np.uint8 and s.images.shape[1:] == (S, S, 1)
    assert s.labels.dtype == np.int32 and len(s) == len(s.files) == len(s.hashes)
    assert s.class_names == ("COVID", "NORMAL", "VIRAL_PNEUMONIA")
  total = {c: sum(s.counts()[c] for s in sets.values()) for c in sets["train"].class_names}
  # 6 readable COVID; NORMAL-rgb equals Normal-1 after conversion (same hash, same split).
  assert total == {"COVID": 6, "NORMAL": 7, "VIRAL_PNEUMONIA": 6}
  assert all(not f.startswith("Lung_Opacity") for s in sets.values() for f in s.files)
  assert all("/masks/" not in f for s in sets.values() for f in s.files)
  everything = [f for s in sets.values() for f in s.files]
  assert len(set(everything)) == len(everything)


def test_corrupt_files_skipped_with_one_warning(loaded):
  _, sets, _, messages = loaded
  warnings = [m for m in messages if m.startswith("Skipped")]
  assert len(warnings) == 1
  for name in ("COVID-truncated.png", "COVID-empty.png", "COVID-text.png", "COVID-1x1.png"):
    assert name in warnings[0]
  assert "empty file" in warnings[0] and "too small" in warnings[0]
  assert not any("bad" in f or "1x1" in f for s in sets.values() for f in s.files)


def test_manifest_rows(loaded):
  _, sets, workdir, _ = loaded
  with open(workdir / splits.MANIFEST, newline="") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == list(splits.MANIFEST_COLUMNS)
  by_file = {r["file"]: r for r in rows}
  for name, s in sets.items():
    for f, h in zip(s.files, s.hashes):
      assert by_file[f]["split"] == name and by_file[f]["sha256"] == h
  assert by_file["COVID/images/COVID-empty.png"]["split"] == "skipped"
  assert "converted: RGB -> grayscale" in by_file["Normal/images/Normal-rgb.png"]["note"]
  assert "identical to Normal/images/Normal-1.png" in by_file[
      "Normal/images/Normal-rgb.png"]["note"]
  assert len(rows) == sum(len(s) for s in sets.values()) + 4
  summary = json.loads((workdir / splits.SUMMARY).read_text())
  assert summary["totals"]["skipped"] == 4 and summary["image_size"] == S
  assert summary["counts"]["train"] == sets["train"].counts()


def test_second_load_reuses_prepared_copy_and_split(loaded, tree):
  cfg, sets, workdir, _ = loaded
  records = sorted(pathlib.Path(cfg.cache_dir).glob("tfds/*/*/*/*/*.array_record*"))
  assert len(records) == 1
  stamp = records[0].stat().st_mtime_ns
  dataset._MEMORY.clear()  # read the array_record again, not the in-process copy
  again = dataset.load_splits(cfg, workdir)
  assert records[0].stat().st_mtime_ns == stamp
  for name in sets:
    assert again[name].files == sets[name].files
    np.testing.assert_array_equal(again[name].images, sets[name].images)


def test_prepared_pixels_match_direct_decode(loaded, tree):
  _, sets, _, _ = loaded
  from cxr_jax.data import images  # pylint: disable=import-outside-toplevel
  s = sets["train"]
  direct = images.decode(tree / ROOT / s.files[0], S).pixels
  np.testing.assert_array_equal(s.images[0, ..., 0], direct)
  assert s.hashes[0] == tfds_builder.pixel_hash(direct)


def test_class_selection_and_lung_opacity(tree, tmp_path):
  sets = dataset.load_splits(_cfg(tree, tmp_path, classes=("Lung_Opacity", "covid")))
  assert sets["train"].class_names == ("LUNG_OPACITY", "COVID")
  total = sum((collections.Counter(s.counts()) for s in sets.values()), collections.Counter())
  assert total == {"LUNG_OPACITY": 6, "COVID": 6}
  assert all(f.startswith("Lung_Opacity") for f in sets["train"].of_class("LUNG_OPACITY").files)


def test_requested_class_missing_from_first_release(tmp_path):
  for folder in ("COVID", "NORMAL"):
    for i in range(3):
      p = tmp_path / "db" / folder / f"{folder} ({i + 1}).png"
      p.parent.mkdir(parents=True, exist_ok=True)
      Image.new("L", (S, S), 40 * i + (folder == "COVID")).save(p)
  with pytest.raises(DataError, match="VIRAL_PNEUMONIA") as e:
    dataset.load_splits(_cfg(tmp_path / "db", tmp_path / "cache"))
  assert str(tmp_path / "db") in str(e.value)


def test_nothing_readable(tmp_path):
  for folder in ("COVID", "NORMAL", "Viral Pneumonia"):
    (tmp_path / "db" / folder).mkdir(parents=True)
    (tmp_path / "db" / folder / "x.png").write_text("not an image")
  with pytest.raises(DataError, match="none of the 3 image file") as e:
    dataset.load_splits(_cfg(tmp_path / "db", tmp_path / "cache"))
  assert "NORMAL/x.png (not an image file" in str(e.value)


def test_bad_config_values(tree, tmp_path):
  with pytest.raises(ConfigError, match=r"config\.data\.split_fractions"):
    dataset.load_splits(_cfg(tree, tmp_path, split_fractions=(0.5, 0.1, 0.1)))
  with pytest.raises(ConfigError, match=r"config\.data\.image_size"):
    dataset.load_splits(_cfg(tree, tmp_path, image_size=0))
  with pytest.raises(ConfigError, match=r"config\.data\.classes"):
    dataset.load_splits(_cfg(tree, tmp_path, classes=("COVID", "covid-19")))
  # Any other name is a class of its own: missing here, so the folders found are listed.
  with pytest.raises(DataError, match=r"no images of class PNEUMONITIS, which config\.data\."
                     r"classes asks for .* found: 'COVID' \(10 images\), 'Normal'"):
    dataset.load_splits(_cfg(tree, tmp_path, classes=("COVID", "Pneumonitis")))
  with pytest.raises(DataError, match="does not exist"):
    dataset.load_splits(_cfg(tmp_path / "missing", tmp_path))


def test_zip_source_and_changed_source_is_prepared_again(tree, tmp_path):
  archive = tmp_path / "archive.zip"
  with zipfile.ZipFile(archive, "w") as zf:
    for p in sorted((tree / ROOT).rglob("*")):
      if p.is_file():
        zf.write(p, p.relative_to(tree).as_posix())
  cfg = _cfg(archive, tmp_path / "cache")
  first = dataset.load_splits(cfg)
  assert sum(len(s) for s in first.values()) == 19
  with zipfile.ZipFile(archive, "a") as zf:
    buf = (tree / ROOT / "Viral Pneumonia/images/Viral Pneumonia-1.png").read_bytes()
    flipped = np.asarray(Image.open(io.BytesIO(buf)))[::-1]
    out = io.BytesIO()
    Image.fromarray(flipped).save(out, "PNG")
    zf.writestr(f"{ROOT}/Viral Pneumonia/images/Viral Pneumonia-new.png", out.getvalue())
  second = dataset.load_splits(cfg)
  assert sum(len(s) for s in second.values()) == 20


def test_synthetic_default(tmp_path, caplog):
  cfg = configlib.data_config(cache_dir=str(tmp_path), image_size=S, synthetic_scale=0.01)
  with caplog.at_level(logging.WARNING):
    sets = dataset.load_splits(cfg, tmp_path / "work")
  assert (tmp_path / "synthetic" / f"size{S}-scale0.01-seed0").is_dir()
  assert any("SYNTHETIC" in r.getMessage() for r in caplog.records)
  total = sum(len(s) for s in sets.values())
  assert total == 2 + 13 + 13 and sets["train"].images.shape[1:] == (S, S, 1)
  assert (tmp_path / "work" / splits.MANIFEST).is_file()


def test_prepare_task(tree, tmp_path):
  config = ml_collections.ConfigDict({"data": _cfg(tree, tmp_path / "cache")})
  counts = dataset.prepare_task(config, tmp_path / "work")
  assert set(counts) == {"train", "val", "test"}
  assert (tmp_path / "work" / splits.MANIFEST).is_file()


def test_image_set_methods():
  images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4, 1)
  s = dataset.ImageSet(images=images, labels=np.array([0, 1, 1, 0, 1], np.int32),
                       files=tuple("abcde"), hashes=tuple("vwxyz"),
                       class_names=("COVID", "NORMAL"))
  assert len(s) == 5 and s.counts() == {"COVID": 2, "NORMAL": 3}
  assert s.of_class("Normal").files == ("b", "c", "e")
  assert s.subset([4, 0]).files == ("e", "a") and s.subset([4, 0]).hashes == ("z", "v")
  assert s.subset(np.array([True, False, False, False, True])).files == ("a", "e")
  np.testing.assert_array_equal(s.subset([2]).images[0], images[2])
  with pytest.raises(ConfigError):
    s.of_class("VIRAL_PNEUMONIA")
  with pytest.raises(ValueError):
    dataset.ImageSet(images=images[..., 0], labels=s.labels, files=s.files, hashes=s.hashes,
                     class_names=s.class_names)
  with pytest.raises(ValueError):
    dataset.ImageSet(images=images, labels=s.labels + 5, files=s.files, hashes=s.hashes,
                     class_names=s.class_names)


def test_hosts_with_different_data_are_refused(loaded, monkeypatch):
  """Simulated second process: its split digest is gathered beside process 0's and compared."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  cfg, sets, _, _ = loaded
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  other = {"digest": None}

  def gather(mine):
    theirs = mine if other["digest"] is None else other["digest"]
    return np.stack([mine, theirs])

  monkeypatch.setattr(multihost_utils, "process_allgather", gather)
  dataset._check_same_data_on_every_host(sets, cfg)  # the same data: accepted
  other["digest"] = np.zeros(4, np.uint32)
  with pytest.raises(DataError, match=r"processes \[1\] read other images or another split"):
    dataset._check_same_data_on_every_host(sets, cfg)
