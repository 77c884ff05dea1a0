"""A user's own data: class folders with any names, a labels CSV with a predefined split, DICOM."""

from __future__ import annotations

import csv
import json
import pathlib
import zipfile

import numpy as np
import pytest
from PIL import Image

from cxr_jax import configlib
from cxr_jax.data import classes
from cxr_jax.data import dataset
from cxr_jax.data import images
from cxr_jax.data import layout
from cxr_jax.data import splits
from cxr_jax.data import tfds_builder
from cxr_jax.errors import ConfigError
from cxr_jax.errors import DataError

S = 32


def _image(seed: int) -> np.ndarray:
  """A distinct 8-bit image per seed (blocky, so near-duplicate checks do not pair them)."""
  rng = np.random.default_rng(seed)
  low = np.kron(rng.normal(size=(4, 4)), np.ones((S // 4, S // 4)))
  return np.clip(128 + 50 * low + 6 * rng.normal(size=(S, S)), 0, 255).astype(np.uint8)


def _png(path: pathlib.Path, pixels: np.ndarray) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path)
  return path


def _own_folders(parent: pathlib.Path, n: int = 6) -> pathlib.Path:
  """mydata/Tuberculosis/*.png and mydata/Healthy/*.png; pixel value tells the class apart."""
  root = parent / "mydata"
  for k, folder in enumerate(("Tuberculosis", "Healthy")):
    for i in range(n):
      _png(root / folder / f"{folder.lower()}-{i}.png", _image(100 * k + i))
  return root


def _cfg(tmp_path: pathlib.Path, **kw):
  return configlib.data_config(**{"cache_dir": str(tmp_path / "cache"), "image_size": S,
                                  "split_fractions": (0.5, 0.25, 0.25), **kw})


def test_database_aliases_still_resolve():
  assert classes.resolve(["COVID-19", "Normal", "Viral Pneumonia", "lung_opacity"]) == (
      "COVID", "NORMAL", "VIRAL_PNEUMONIA", "LUNG_OPACITY")
  assert classes.resolve(configlib.PAPER_CLASSES) == configlib.PAPER_CLASSES
  assert classes.canonical("covid19") == "COVID"
  # Other names keep their own class, in one spelling for every way of writing it.
  assert classes.resolve(("Tuberculosis", "healthy")) == ("TUBERCULOSIS", "HEALTHY")
  assert classes.ordered(["HEALTHY", "NORMAL", "ABC", "COVID"]) == (
      "COVID", "NORMAL", "ABC", "HEALTHY")


def test_source_and_target_class_in_any_spelling_of_the_configured_classes():
  assert classes.member("healthy", ("Tuberculosis", "Healthy"), "source_class") == "HEALTHY"
  assert classes.member("Normal", configlib.PAPER_CLASSES, "source_class") == "NORMAL"
  with pytest.raises(ConfigError, match=r"config\.target_class: 'Cat' is not among"):
    classes.member("Cat", ("Tuberculosis", "Healthy"), "target_class")


def test_custom_class_folders_load_with_their_labels(tmp_path):
  root = _own_folders(tmp_path / "data")
  cfg = _cfg(tmp_path, data_dir=str(tmp_path / "data"), classes=("Tuberculosis", "Healthy"))
  sets = dataset.load_splits(cfg, tmp_path / "work")
  assert sets["train"].class_names == ("TUBERCULOSIS", "HEALTHY")
  seen = 0
  for s in sets.values():
    for img, label, file in zip(s.images, s.labels, s.files):
      folder = file.split("/")[0]
      assert label == {"Tuberculosis": 0, "Healthy": 1}[folder]
      np.testing.assert_array_equal(img[..., 0], np.asarray(Image.open(root / file)))
      seen += 1
  assert seen == 12
  assert {k: v for k, v in sets["train"].counts().items()} == {"TUBERCULOSIS": 3, "HEALTHY": 3}
  assert len(sets["train"].of_class("healthy")) == 3  # any spelling of the configured class
  # The other order gives the other label ids.
  swapped = dataset.load_splits(_cfg(tmp_path, data_dir=str(root),
                                     classes=("Healthy", "Tuberculosis")))
  t = swapped["test"]
  assert all(lbl == (0 if f.startswith("Healthy/") else 1) for lbl, f in zip(t.labels, t.files))


def test_custom_class_folders_in_a_zip(tmp_path):
  root = _own_folders(tmp_path / "data", n=2)
  archive = tmp_path / "mine.zip"
  with zipfile.ZipFile(archive, "w") as zf:
    for p in sorted(root.rglob("*.png")):
      zf.write(p, p.relative_to(tmp_path / "data").as_posix())
  for wanted in (("TUBERCULOSIS", "HEALTHY"), ()):  # by name, or as folders of images
    lay = layout.discover(archive, wanted)
    assert lay.is_zip and lay.root == "mydata" and lay.classes == ("HEALTHY", "TUBERCULOSIS")
    assert layout.Entry("Healthy/healthy-1.png", "HEALTHY") in lay.entries


def test_missing_configured_class_lists_the_folders_found(tmp_path):
  _own_folders(tmp_path / "data", n=2)
  cfg = _cfg(tmp_path, data_dir=str(tmp_path / "data"), classes=("Tuberculosis", "Pneumothorax"))
  with pytest.raises(DataError) as e:
    dataset.load_splits(cfg)
  msg = str(e.value)
  assert "no images of class PNEUMOTHORAX" in msg and "named 'PNEUMOTHORAX'; case" in msg
  assert "'Healthy' (2 images)" in msg and "'Tuberculosis' (2 images)" in msg


def test_prepared_copy_of_one_class_set_is_not_read_for_another(tmp_path):
  root = _own_folders(tmp_path / "data", n=3)
  cfg = _cfg(tmp_path, data_dir=str(root), classes=("Tuberculosis", "Healthy"),
             split_fractions=(0.34, 0.33, 0.33))
  dataset.load_splits(cfg)
  first = layout.discover(root, ("TUBERCULOSIS", "HEALTHY"))
  prepared = tfds_builder.prepare(first, S, tmp_path / "cache")
  assert prepared.class_names == ("HEALTHY", "TUBERCULOSIS")  # classes.ordered: sorted
  assert prepared.builder().info.features["label"].names == ["HEALTHY", "TUBERCULOSIS"]
  # A third class folder appears: another class set, another copy (label ids would differ).
  _png(root / "Atelectasis" / "a.png", _image(999))
  second = layout.discover(root, ("TUBERCULOSIS", "HEALTHY"))
  assert second.classes == ("ATELECTASIS", "HEALTHY", "TUBERCULOSIS")
  assert tfds_builder.cache_key(second, S) != tfds_builder.cache_key(first, S)
  again = tfds_builder.prepare(second, S, tmp_path / "cache")
  assert again.data_dir != prepared.data_dir and again.class_names == second.classes
  arrays = tfds_builder.load_arrays(again)
  for file, label in zip(arrays["file"], arrays["label"]):
    assert again.class_names[label] == classes.canonical(file.split("/")[0])


# --- labels CSV -------------------------------------------------------------------------------


def _flat_images(folder: pathlib.Path, n: int) -> list[str]:
  for i in range(n):
    _png(folder / "scans" / f"scan-{i:02d}.png", _image(500 + i))
  return [f"scans/scan-{i:02d}.png" for i in range(n)]


def _write_csv(path: pathlib.Path, rows, header=("file", "label", "split")) -> pathlib.Path:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return path


def test_labels_csv_with_predefined_split_is_honoured_exactly(tmp_path):
  files = _flat_images(tmp_path / "data", 10)
  # A split no stratified draw would give: 7 test images, 2 train, 1 val.
  plan = ["train", "test", "test", "val", "test", "train", "test", "test", "test", "test"]
  labels = ["Tuberculosis" if i % 2 else "healthy" for i in range(10)]
  absolute = str(tmp_path / "data" / files[9])  # an absolute path works too
  rows = [(f if i < 9 else absolute, labels[i], plan[i].upper() if i == 3 else plan[i])
          for i, f in enumerate(files)]
  csv_path = _write_csv(tmp_path / "labels.csv", rows)
  cfg = _cfg(tmp_path, data_dir=str(tmp_path / "data"), labels_csv=str(csv_path),
             classes=("Healthy", "Tuberculosis"))
  sets = dataset.load_splits(cfg, tmp_path / "work")
  names = [f if i < 9 else absolute for i, f in enumerate(files)]
  for split in splits.SPLITS:
    want = sorted(n for n, p in zip(names, plan) if p == split)
    assert sorted(sets[split].files) == want
    for f, label in zip(sets[split].files, sets[split].labels):
      assert label == (1 if names.index(f) % 2 else 0)
  rows = splits.read_manifest(tmp_path / "work" / splits.MANIFEST)
  assert {r.file: r.split for r in rows} == dict(zip(names, plan))
  assert all("split as given in the labels CSV" in r.note for r in rows)
  summary = json.loads((tmp_path / "work" / splits.SUMMARY).read_text())
  assert summary["split_from"] == str(csv_path.resolve())
  # Same files, no split column: labels from the CSV, the seeded stratified split.
  no_split = _write_csv(tmp_path / "nosplit.csv", [r[:2] for r in zip(names, labels)],
                        header=("file", "label"))
  sets = dataset.load_splits(_cfg(tmp_path, data_dir=str(tmp_path / "data"),
                                  labels_csv=str(no_split), classes=("Healthy", "Tuberculosis")))
  assert [len(sets[s]) for s in splits.SPLITS] != [2, 1, 7]
  assert sum(len(s) for s in sets.values()) == 10


def test_labels_csv_identical_images_in_two_splits_are_an_error(tmp_path):
  files = _flat_images(tmp_path / "data", 6)
  copy = tmp_path / "data" / "scans" / "copy-of-0.png"
  copy.write_bytes((tmp_path / "data" / files[0]).read_bytes())
  plan = ["train", "train", "val", "val", "test", "test"]
  rows = [(f, "COVID" if i % 2 else "Normal", plan[i]) for i, f in enumerate(files)]
  rows.append(("scans/copy-of-0.png", "Normal", "test"))
  csv_path = _write_csv(tmp_path / "labels.csv", rows)
  cfg = _cfg(tmp_path, data_dir=str(tmp_path / "data"), labels_csv=str(csv_path),
             classes=("COVID", "NORMAL"))
  with pytest.raises(DataError) as e:
    dataset.load_splits(cfg)
  msg = str(e.value)
  assert str(csv_path.resolve()) in msg
  assert "scans/copy-of-0.png (test)" in msg and "scans/scan-00.png (train)" in msg


@pytest.mark.parametrize("rows,header,problem", [
    ([("scans/scan-00.png", "Healthy", "train")], ("path", "class", "split"),
     "line 1: malformed header 'path,class,split'"),
    ([("scans/scan-00.png", "Healthy", "train")], ("file",), "line 1: malformed header 'file'"),
    ([("scans/scan-00.png", "Healthy", "train"), ("scans/missing.png", "Healthy", "test")],
     ("file", "label", "split"), "line 3: file 'scans/missing.png' not found"),
    ([("scans/scan-00.png", "Healthy", "training")], ("file", "label", "split"),
     "line 2: unknown split 'training'; expected train, val or test"),
    ([("scans/scan-00.png", "Healthy", "train"), ("scans/scan-01.png", "Cat", "val")],
     ("file", "label", "split"), "line 3: label 'Cat' is not in config.data.classes"),
    ([("scans/scan-00.png", "Healthy")], ("file", "label", "split"),
     "line 2: 2 field(s), expected 3"),
    ([("scans/scan-00.png", "Healthy", "train"), ("./scans/scan-00.png", "Healthy", "val")],
     ("file", "label", "split"), "line 3: 'scans/scan-00.png' is listed again (first on line 2)"),
])
def test_labels_csv_errors_name_the_csv_line_and_problem(tmp_path, rows, header, problem):
  _flat_images(tmp_path / "data", 2)
  csv_path = _write_csv(tmp_path / "labels.csv", rows, header=header)
  cfg = _cfg(tmp_path, data_dir=str(tmp_path / "data"), labels_csv=str(csv_path),
             classes=("Healthy", "Tuberculosis"))
  with pytest.raises(DataError) as e:
    dataset.load_splits(cfg)
  assert str(e.value).startswith(f"{csv_path.resolve()}: {problem}")


def test_labels_csv_split_must_give_every_split(tmp_path):
  files = _flat_images(tmp_path / "data", 4)
  csv_path = _write_csv(tmp_path / "labels.csv", [(f, "AB" if i % 2 else "CD", "train" if i < 2
                                                   else "test") for i, f in enumerate(files)])
  cfg = _cfg(tmp_path, data_dir=str(tmp_path / "data"), labels_csv=str(csv_path),
             classes=("AB", "CD"))
  with pytest.raises(DataError, match=r"no image in split\(s\) val"):
    dataset.load_splits(cfg)


# --- labels CSV with metadata, patients, views ---------------------------------------------


def _patient_csv(tmp_path: pathlib.Path, n_patients: int = 8, per_patient: int = 3,
                 header=("file", "label", "patient_id", "age", "sex", "view")) -> pathlib.Path:
  """n_patients x per_patient images; patient 0 has films of both classes, patient 1 a lateral."""
  files = _flat_images(tmp_path / "data", n_patients * per_patient)
  rows = []
  for i, f in enumerate(files):
    p = i // per_patient
    label = "Healthy" if p % 2 else "Tuberculosis"
    if p == 0 and i % per_patient == 0:
      label = "Healthy"
    view = "LL" if (p == 1 and i % per_patient == 2) else ("PA" if i % 2 else "ap")
    rows.append((f, label, f"pt-{p}", str(20 + 7 * p), "female" if p % 3 else "M", view))
  return _write_csv(tmp_path / "labels.csv", rows, header=header)


def test_labels_csv_with_patients_keeps_every_patient_in_one_split(tmp_path):
  csv_path = _patient_csv(tmp_path)
  cfg = _cfg(tmp_path, data_dir=str(tmp_path / "data"), labels_csv=str(csv_path),
             classes=("Healthy", "Tuberculosis"))
  sets = dataset.load_splits(cfg, tmp_path / "work")
  rows = splits.read_manifest(tmp_path / "work" / splits.MANIFEST)
  where: dict[str, set[str]] = {}
  for r in rows:
    if r.split in splits.SPLITS:
      where.setdefault(r.metadata["patient_id"], set()).add(r.split)
  assert len(where) == 8 and all(len(v) == 1 for v in where.values())
  # The lateral film is skipped (config.data.views = PA, AP) and says why.
  lateral = [r for r in rows if r.split == splits.SKIPPED]
  assert [r.file for r in lateral] == ["scans/scan-05.png"]
  assert "view LL is not in config.data.views (PA, AP)" in lateral[0].note
  assert lateral[0].metadata["view"] == "LL"
  summary = json.loads((tmp_path / "work" / splits.SUMMARY).read_text())
  assert sum(summary["patients"][s] for s in splits.SPLITS) == 8
  assert summary["split_from"].startswith("stratified by patient (StratifiedGroupKFold, 4 folds")
  assert summary["metadata_columns"] == ["patient_id", "age", "sex", "view"]
  # Metadata normalised and carried by the image sets (every split sees the same mapping).
  meta = sets["test"].metadata
  assert meta["scans/scan-00.png"] == {"patient_id": "pt-0", "age": "20", "sex": "M",
                                       "view": "AP"}
  assert meta["scans/scan-04.png"]["sex"] == "F"
  assert sum(len(s) for s in sets.values()) == 23
  # `group` is the same column under another name.
  grouped = _patient_csv(tmp_path, header=("file", "label", "group", "age", "sex", "view"))
  again = dataset.load_splits(_cfg(tmp_path, data_dir=str(tmp_path / "data"),
                                   labels_csv=str(grouped), classes=("Healthy", "Tuberculosis")))
  assert {k: v.files for k, v in again.items()} == {k: v.files for k, v in sets.items()}
  # views=() keeps the lateral film.
  every = dataset.load_splits(_cfg(tmp_path, data_dir=str(tmp_path / "data"),
                                   labels_csv=str(csv_path), classes=("Healthy", "Tuberculosis"),
                                   views=()))
  assert sum(len(s) for s in every.values()) == 24


@pytest.mark.parametrize("edit,problem", [
    (lambda rows: rows[2].__setitem__(3, "forty"), "line 3: age 'forty' is not a number"),
    (lambda rows: rows[4].__setitem__(4, "X"), "line 5: sex 'X' is not M, F, O"),
    (lambda rows: rows[5].__setitem__(4, "M"), "line 6: patient 'pt-1' has sex M here and F on "
     "line 5"),
    (lambda rows: rows[0].__setitem__(2, "patient_id") or rows[0].__setitem__(3, "group"),
     "line 1: columns 'group' and 'patient_id' both name the patient"),
    (lambda rows: rows[0].__setitem__(5, "age"), "line 1: column 'age' appears twice"),
    (lambda rows: rows[0].__setitem__(5, "Class"), "line 1: column 'class' collides with a "
     "column the split manifest writes"),
    (lambda rows: rows[0].__setitem__(5, "age_band"), "line 1: column 'age_band' collides with "
     "the age band derived from 'age'"),
])
def test_bad_metadata_is_one_line_naming_the_csv_line(tmp_path, edit, problem):
  csv_path = _patient_csv(tmp_path, n_patients=4)
  with open(csv_path, newline="") as f:
    rows = list(csv.reader(f))
  edit(rows)
  _write_csv(csv_path, rows[1:], header=rows[0])
  cfg = _cfg(tmp_path, data_dir=str(tmp_path / "data"), labels_csv=str(csv_path),
             classes=("Healthy", "Tuberculosis"))
  with pytest.raises(DataError) as e:
    dataset.load_splits(cfg)
  assert "\n" not in str(e.value)
  assert str(e.value).startswith(f"{csv_path.resolve()}: {problem}"), str(e.value)


def test_labels_per_patient_refuses_a_patient_with_two_labels(tmp_path):
  csv_path = _patient_csv(tmp_path, n_patients=4)
  cfg = _cfg(tmp_path, data_dir=str(tmp_path / "data"), labels_csv=str(csv_path),
             classes=("Healthy", "Tuberculosis"), labels_per_patient=True)
  with pytest.raises(DataError, match=r"line 3: patient 'pt-0' is labelled TUBERCULOSIS here and "
                     r"HEALTHY on line 2"):
    dataset.load_splits(cfg)


def test_given_split_refuses_a_patient_in_two_splits(tmp_path):
  files = _flat_images(tmp_path / "data", 6)
  plan = ["train", "val", "test", "train", "val", "test"]
  rows = [(f, "AB" if i % 2 else "CD", plan[i], f"p{i // 2}") for i, f in enumerate(files)]
  csv_path = _write_csv(tmp_path / "labels.csv", rows, header=("file", "label", "split", "group"))
  cfg = _cfg(tmp_path, data_dir=str(tmp_path / "data"), labels_csv=str(csv_path),
             classes=("AB", "CD"))
  with pytest.raises(DataError, match=r"patient p0 has images in splits train, val: "
                     r"scans/scan-00.png \(train\); scans/scan-01.png \(val\)"):
    dataset.load_splits(cfg)


def test_classes_auto_takes_the_class_folders_found_sorted(tmp_path):
  root = tmp_path / "data" / "mine"
  for k, folder in enumerate(("zebra stripes", "Apple")):
    for i in range(4):
      _png(root / folder / f"{i}.png", _image(300 + 10 * k + i))
  cfg = _cfg(tmp_path, data_dir=str(tmp_path / "data"), classes=("auto",))  # as the flag gives
  sets = dataset.load_splits(cfg, tmp_path / "work")
  assert sets["train"].class_names == ("APPLE", "ZEBRA_STRIPES")
  for s in sets.values():
    assert all(lbl == (0 if f.startswith("Apple/") else 1) for lbl, f in zip(s.labels, s.files))
  summary = json.loads((tmp_path / "work" / splits.SUMMARY).read_text())
  assert summary["classes"] == ["APPLE", "ZEBRA_STRIPES"]
  assert summary["classes_from"].startswith("auto")
  assert classes.member("apple", "auto", "source_class") == "APPLE"
  # One class folder is not a classification problem.
  lone = tmp_path / "lone" / "x"
  for i in range(3):
    _png(lone / "Only" / f"{i}.png", _image(400 + i))
  with pytest.raises(DataError, match=r"classes='auto' found 1 class \(ONLY\)"):
    dataset.load_splits(_cfg(tmp_path, data_dir=str(tmp_path / "lone"), classes=("AUTO",)))


def test_metadata_xlsx_beside_the_class_folders_fills_the_source(tmp_path):
  openpyxl = pytest.importorskip("openpyxl")
  root = tmp_path / "COVID-19_Radiography_Dataset"
  for folder, prefix in (("COVID", "COVID"), ("Normal", "Normal")):
    for i in (1, 2):
      _png(root / folder / "images" / f"{prefix}-{i}.png", _image(600 + 10 * len(prefix) + i))
  book = openpyxl.Workbook()
  sheet = book.active
  sheet.append(["FILE NAME", "FORMAT", "SIZE", "URL"])
  sheet.append(["COVID-1", "PNG", "256*256", "https://example.org/a"])
  sheet.append(["COVID-2", "PNG", "256*256", "https://example.org/b"])
  sheet.append(["COVID-99", "PNG", "256*256", "https://example.org/none"])  # no such image
  book.save(root / "COVID.metadata.xlsx")
  (root / "Normal.metadata.xlsx").write_bytes(b"not a workbook")  # skipped with a warning
  lay = layout.discover(tmp_path, ("COVID", "NORMAL"))
  assert lay.metadata == {"COVID/images/COVID-1.png": {"source": "https://example.org/a"},
                          "COVID/images/COVID-2.png": {"source": "https://example.org/b"}}
  cfg = _cfg(tmp_path, data_dir=str(tmp_path), classes=("COVID", "Normal"),
             split_fractions=(0.34, 0.33, 0.33))
  dataset.load_splits(cfg, tmp_path / "work")
  rows = {r.file: r for r in splits.read_manifest(tmp_path / "work" / splits.MANIFEST)}
  assert rows["COVID/images/COVID-2.png"].metadata == {"source": "https://example.org/b"}
  assert rows["Normal/images/Normal-1.png"].metadata == {}


# --- DICOM ------------------------------------------------------------------------------------

def _dicom(path: pathlib.Path, stored: np.ndarray, *, photometric: str = "MONOCHROME2",
           window: tuple[float, float] | None = None, slope: float = 1.0,
           intercept: float = 0.0, bits: int = 12, preamble: bool = True,
           syntax: str = "1.2.840.10008.1.2.1", pixel_bytes: bytes | None = None,
           extra: dict | None = None) -> pathlib.Path:
  """A minimal DICOM file written by pydicom (multi-frame when `stored` is 3-D); `extra`: more
  attributes by keyword (VOILUTFunction, VOILUTSequence, ViewPosition, PatientID...)."""
  pytest.importorskip("pydicom")
  from pydicom.dataset import Dataset, FileMetaDataset  # pylint: disable=import-outside-toplevel
  from pydicom.uid import UID, generate_uid  # pylint: disable=import-outside-toplevel
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = UID(syntax)
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "DX"
  ds.Rows, ds.Columns = stored.shape[-2:]
  if stored.ndim == 3:
    ds.NumberOfFrames = stored.shape[0]
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
  ds.PixelRepresentation = 0
  if slope != 1.0 or intercept != 0.0:
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  if window is not None:
    ds.WindowCenter, ds.WindowWidth = window
  for key, value in (extra or {}).items():
    setattr(ds, key, value)
  if pixel_bytes is None:
    ds.PixelData = stored.astype("<u2").tobytes()
  else:
    from pydicom.encaps import encapsulate  # pylint: disable=import-outside-toplevel
    ds.PixelData = encapsulate([pixel_bytes])
    ds["PixelData"].VR = "OB"
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path, enforce_file_format=preamble)
  return path


def _ramp() -> np.ndarray:
  """32 x 32 stored values 0..4092 (12-bit), each row a different level."""
  return (np.arange(S * S).reshape(S, S) * 4).astype(np.uint16)


def test_dicom_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
  stored = _ramp()
  m2 = images.decode(_dicom(tmp_path / "m2.dcm", stored), S)
  m1 = images.decode(_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"), S)
  # No window: full range 0..4092 -> 0..255 (by hand), and MONOCHROME1's 0 is white.
  want = np.rint(stored.astype(np.float64) * 255.0 / 4092.0)
  np.testing.assert_array_equal(m2.pixels, want.astype(np.uint8))
  np.testing.assert_array_equal(m1.pixels.astype(int), 255 - m2.pixels.astype(int))
  assert "DICOM MONOCHROME1 inverted" in m1.notes
  assert m2.pixels[0, 0] == 0 and m1.pixels[0, 0] == 255


def test_dicom_window_clips_as_computed_by_hand(tmp_path):
  stored = _ramp()
  center, width = 2000.0, 1001.0  # linear between 1499.5 and 2499.5
  out = images.decode(_dicom(tmp_path / "w.dcm", stored, window=(center, width)), S).pixels
  x = stored.astype(np.float64)
  expected = np.empty_like(x)
  for idx, v in np.ndenumerate(x):
    if v <= center - 0.5 - (width - 1) / 2:
      expected[idx] = 0
    elif v > center - 0.5 + (width - 1) / 2:
      expected[idx] = 255
    else:
      expected[idx] = ((v - (center - 0.5)) / (width - 1) + 0.5) * 255
  np.testing.assert_array_equal(out, np.rint(expected).astype(np.uint8))
  flat = out.reshape(-1)  # pixel k holds stored value 4 k
  assert flat[1496 // 4] == 0 and flat[2500 // 4] == 255 and flat[2000 // 4] == 128
  assert flat[1800 // 4] == round(((1800 - 1999.5) / 1000 + 0.5) * 255)


def test_dicom_rescale_slope_and_intercept_are_applied_before_the_window(tmp_path):
  stored = _ramp()
  # Modality values = 2 * stored - 1000: window (3000, 2001) in modality units.
  out = images.decode(_dicom(tmp_path / "r.dcm", stored, slope=2.0, intercept=-1000.0,
                             window=(3000.0, 2001.0)), S).pixels
  modality = 2.0 * stored - 1000.0
  expected = np.clip(((modality - 2999.5) / 2000.0 + 0.5) * 255.0, 0, 255)
  np.testing.assert_array_equal(out, np.rint(expected).astype(np.uint8))
  # Without the rescale the same window would give other pixels.
  plain = np.clip(((stored - 2999.5) / 2000.0 + 0.5) * 255.0, 0, 255)
  assert not np.array_equal(out, np.rint(plain).astype(np.uint8))


def test_dicom_without_suffix_is_found_by_its_preamble_and_resized(tmp_path):
  stored = np.kron(_ramp()[::2, ::2], np.ones((4, 4), np.uint16))  # 64 x 64
  data_root = tmp_path / "mydata"
  _dicom(data_root / "Healthy" / "IM0001", stored)
  _dicom(data_root / "Tuberculosis" / "scan.dcm", stored, photometric="MONOCHROME1")
  _png(data_root / "Healthy" / "b.png", _image(1))
  lay = layout.discover(tmp_path, ("HEALTHY", "TUBERCULOSIS"))
  assert sorted(e.file for e in lay.entries) == ["Healthy/IM0001", "Healthy/b.png",
                                                  "Tuberculosis/scan.dcm"]
  out = images.decode(data_root / "Healthy" / "IM0001", S)
  assert out.pixels.shape == (S, S) and out.original_size == (64, 64)
  assert out.pixels[0, 0] < 10 and out.pixels[-1, -1] > 245


def test_dicom_compressed_without_decoder_is_a_one_line_error(tmp_path):
  path = _dicom(tmp_path / "jls.dcm", _ramp(), syntax="1.2.840.10008.1.2.4.80",  # JPEG-LS
                pixel_bytes=b"\xff\xd8\xff\xf7" + b"\x00" * 64)
  try:
    import pylibjpeg  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
    pytest.skip("a JPEG-LS decoder is installed")
  except ImportError:
    pass
  with pytest.raises(images.ImageError) as e:
    images.decode(path, S)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"{path}: compressed DICOM (JPEG-LS Lossless")
  assert "no installed decoder" in msg


def _voi_lut_sequence(entries: int, first: int, bits: int, data):
  from pydicom.dataset import Dataset  # pylint: disable=import-outside-toplevel
  from pydicom.sequence import Sequence  # pylint: disable=import-outside-toplevel
  item = Dataset()
  item.LUTDescriptor = [entries, first, bits]
  item.LUTData = [int(v) for v in data]
  item["LUTData"].VR = "US"
  item["LUTDescriptor"].VR = "US"
  return Sequence([item])


def _pydicom_8bit(path: pathlib.Path, lo: float, hi: float, invert: bool) -> np.ndarray:
  """The reference: pydicom's apply_modality_lut -> apply_voi_lut on the first frame, its output
  range [lo, hi] (from the standard, given by each case) to 0..255, inverted when the file says
  so, rounded once."""
  import pydicom  # pylint: disable=import-outside-toplevel
  from pydicom import pixels  # pylint: disable=import-outside-toplevel
  ds = pydicom.dcmread(path)
  a = ds.pixel_array
  a = a[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else a
  modality = pixels.apply_modality_lut(a, ds)
  if "VOILUTSequence" in ds:  # a LUT's inputs are whole numbers
    modality = np.rint(modality).astype(np.int64)
  x = np.asarray(pixels.apply_voi_lut(modality, ds), np.float64)
  y = np.clip((x - lo) / (hi - lo) * 255.0, 0, 255)
  return np.rint(255.0 - y if invert else y)


def _lut_case():
  # 10-bit VOI LUT over stored values 1000..3047: a gamma curve, values 0..1023.
  data = np.rint(1023 * (np.arange(2048) / 2047) ** 0.5)
  return dict(extra={"VOILUTSequence": _voi_lut_sequence(2048, 1000, 10, data)}), 0, 1023, False


@pytest.mark.parametrize("case", ["rescale_window", "linear_exact", "sigmoid", "voi_lut",
                                  "voi_lut_after_rescale", "monochrome1_window", "inverse_shape",
                                  "multi_frame", "signed_window"])
def test_dicom_agrees_with_pydicom_pipeline_within_one_grey_level(tmp_path, case):
  stored = _ramp()
  kw: dict = {}
  invert = False
  if case == "rescale_window":  # the case: rescale first, then the window
    kw = dict(slope=2.0, intercept=-1000.0, window=(3000.0, 2001.0))
    lo, hi = -1000.0, 4095 * 2.0 - 1000.0
  elif case == "linear_exact":
    kw = dict(window=(2000.0, 40.0), extra={"VOILUTFunction": "LINEAR_EXACT"})  # narrow:
    # LINEAR's (c - 0.5, w - 1) would differ by up to 6 grey levels
    lo, hi = 0.0, 4095.0
  elif case == "sigmoid":
    kw = dict(window=(2048.0, 1200.0), extra={"VOILUTFunction": "SIGMOID"})
    lo, hi = 0.0, 4095.0
  elif case == "voi_lut":
    kw, lo, hi, invert = _lut_case()
    kw["window"] = (100.0, 50.0)  # the LUT is preferred over the window, as in pydicom
  elif case == "voi_lut_after_rescale":
    kw, lo, hi, invert = _lut_case()
    kw.update(slope=1.0, intercept=500.0)
  elif case == "monochrome1_window":
    kw = dict(photometric="MONOCHROME1", window=(2000.0, 3000.0))
    lo, hi, invert = 0.0, 4095.0, True
  elif case == "inverse_shape":
    kw = dict(window=(2000.0, 3000.0), extra={"PresentationLUTShape": "INVERSE"})
    lo, hi, invert = 0.0, 4095.0, True
  elif case == "multi_frame":
    stored = np.stack([_ramp(), 4092 - _ramp()])
    kw = dict(window=(1500.0, 2000.0))
    lo, hi = 0.0, 4095.0
  else:  # signed 12-bit data: output range -2048..2047
    stored = (_ramp().astype(np.int32) - 2046).astype(np.int16)
    kw = dict(window=(0.0, 3000.0), extra={"PixelRepresentation": 1})
    lo, hi = -2048.0, 2047.0
  if stored.dtype == np.int16:
    path = _dicom(tmp_path / f"{case}.dcm", stored.view(np.uint16), **kw)
  else:
    path = _dicom(tmp_path / f"{case}.dcm", stored, **kw)
  ours = images.decode(path, S).pixels.astype(int)
  want = _pydicom_8bit(path, lo, hi, invert).astype(int)
  assert np.abs(ours - want).max() <= 1, case
  assert want.max() - want.min() > 100  # the case exercises a real range, not a flat image
  if case == "rescale_window":  # the value the old pipeline (VOI before rescale) got wrong
    assert abs(int(ours.reshape(-1)[500]) - int(want.reshape(-1)[500])) <= 1


def test_dicom_is_quantised_once_after_the_resize(tmp_path):
  # 12-bit data spanning 40 stored levels: cut to 8 bits first, the resize would see ~3 levels.
  stored = (2000 + (np.arange(64 * 64).reshape(64, 64) % 64) * 40 // 64).astype(np.uint16)
  path = _dicom(tmp_path / "fine.dcm", stored, window=(2020.0, 41.0))
  ours = images.decode(path, S).pixels
  from pydicom import dcmread, pixels  # pylint: disable=import-outside-toplevel
  ds = dcmread(path)
  y = pixels.apply_voi_lut(pixels.apply_modality_lut(ds.pixel_array, ds), ds) * 255.0 / 4095.0
  float_then_round = np.rint(np.clip(np.asarray(
      Image.fromarray(y.astype(np.float32), "F").resize((S, S), Image.Resampling.LANCZOS)),
      0, 255))
  np.testing.assert_allclose(ours, float_then_round, atol=1)
  assert len(np.unique(ours)) > 20


def test_dicom_pad_keeps_the_aspect(tmp_path):
  stored = np.full((32, 64), 4000, np.uint16)  # a wide, bright image
  path = _dicom(tmp_path / "wide.dcm", stored, bits=12)
  squash = images.decode(path, S)
  stored[0, 0] = 0  # a range for the full-range scaling
  path = _dicom(tmp_path / "wide.dcm", stored, bits=12)
  pad = images.decode(path, S, resize="pad")
  assert pad.pixels.shape == (S, S)
  assert pad.pixels[:7, :].max() == 0 and pad.pixels[-7:, :].max() == 0  # black bands
  assert pad.pixels[S // 2, 2:-2].min() > 240
  assert "aspect 64x32 padded to square" in pad.notes
  assert any(n.startswith("aspect 64x32 resized") for n in squash.notes)


def test_dicom_header_metadata_and_the_lateral_view_is_skipped(tmp_path):
  root = tmp_path / "data" / "mine"
  for k, (folder, view) in enumerate((("Healthy", "PA"), ("Healthy", "AP"), ("Healthy", "LL"),
                                      ("Healthy", "PA"), ("Sick", "AP"), ("Sick", "PA"),
                                      ("Sick", "AP"), ("Sick", "LATERAL"))):
    stored = (_ramp() // (k + 1) + 10 * k).astype(np.uint16)
    _dicom(root / folder / f"im{k}.dcm", stored,
           extra={"ViewPosition": view, "PatientID": f"PID{k // 2}", "PatientSex": "F",
                  "PatientAge": "045Y"})
  cfg = _cfg(tmp_path, data_dir=str(tmp_path / "data"), classes=("Healthy", "Sick"),
             split_fractions=(0.34, 0.33, 0.33))
  sets = dataset.load_splits(cfg, tmp_path / "work")
  rows = {r.file: r for r in splits.read_manifest(tmp_path / "work" / splits.MANIFEST)}
  assert rows["Healthy/im2.dcm"].split == rows["Sick/im7.dcm"].split == splits.SKIPPED
  assert "view LATERAL is not in config.data.views" in rows["Sick/im7.dcm"].note
  assert rows["Healthy/im0.dcm"].metadata == {"patient_id": "PID0", "age": "45", "sex": "F",
                                              "view": "PA"}
  assert sum(len(s) for s in sets.values()) == 6
  # PatientID fills patient_id: the patient's two images sit in one split.
  assert rows["Healthy/im0.dcm"].split == rows["Healthy/im1.dcm"].split
  assert rows["Sick/im4.dcm"].split == rows["Sick/im5.dcm"].split
  summary = json.loads((tmp_path / "work" / splits.SUMMARY).read_text())
  assert sum(summary["patients"][s] for s in splits.SPLITS) == 4


@pytest.mark.parametrize("case,reason", [
    ("truncated", "cannot decode the DICOM pixel data"),
    ("no_pixels", "no DICOM pixel data"),
])
def test_dicom_broken_files_are_one_line_errors(tmp_path, case, reason):
  path = _dicom(tmp_path / "x.dcm", _ramp())
  if case == "truncated":
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 900])
  else:
    import pydicom  # pylint: disable=import-outside-toplevel
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
  with pytest.raises(images.ImageError) as e:
    images.decode(path, S)
  assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: {reason}"), str(e.value)


def test_pydicom_records_go_to_the_log_file_not_the_console(tmp_path, capsys):
  import logging  # pylint: disable=import-outside-toplevel
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  from cxr_jax import console  # pylint: disable=import-outside-toplevel
  root = logging.getLogger()
  had_absl, level = absl_logging.get_absl_handler() in root.handlers, root.level
  try:
    console.setup("default")
    log = console.start_log_file(tmp_path, "prepare_data")
    try:
      raise RuntimeError("all plugins are missing dependencies")
    except RuntimeError:
      logging.getLogger("pydicom.pixels.decoders").exception("Unable to decode pixel data")
    logging.getLogger("other.library").error("an error of another library")
    err = capsys.readouterr().err
    assert "Unable to decode" not in err and "Traceback" not in err
    assert "an error of another library" in err
    text = log.read_text()
    assert "Unable to decode pixel data" in text and "all plugins are missing" in text
  finally:
    console.teardown()
    logging.captureWarnings(False)
    root.setLevel(level)
    if had_absl:
      root.addHandler(absl_logging.get_absl_handler())


def test_classifier_trains_on_auto_classes_with_patients_and_reports_subgroups(tmp_path):
  """End to end, once: two arbitrary class folders of DICOM films (classes='auto'), patients from
  PatientID, the lateral films skipped, and the subgroup table in the test report."""
  from cxr_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from cxr_jax.pipeline import classify  # pylint: disable=import-outside-toplevel
  from conftest import REPO_ROOT  # pylint: disable=import-outside-toplevel
  root = tmp_path / "data" / "films"
  rng = np.random.default_rng(0)
  for k in range(28):
    folder = ("Effusion", "Clear")[k % 2]
    stored = (np.kron(rng.integers(0, 4000, (4, 4)), np.ones((8, 8))) + 1000 * (k % 2)
              ).astype(np.uint16)
    _dicom(root / folder / f"f{k:02d}.dcm", stored, bits=13,
           extra={"PatientID": f"P{k // 2}", "PatientSex": "MF"[k % 4 // 2],
                  "PatientAge": f"{20 + 3 * k:03d}Y", "ViewPosition": "LL" if k == 3 else "PA"})
  config = configlib.load_config_file(REPO_ROOT / "configs/classifier.py", "smoke")
  config.data.data_dir = str(tmp_path / "data")
  config.data.classes = ("auto",)
  config.data.split_fractions = (0.5, 0.25, 0.25)
  config.subgroups = ("sex", "age_band")
  config.num_epochs = 1
  run = workdir_lib.prepare(tmp_path / "run", config)
  result = classify.train_and_evaluate(config, run)
  assert result["class_names"] == ["CLEAR", "EFFUSION"]
  rows = splits.read_manifest(run / splits.MANIFEST)
  where: dict[str, set[str]] = {}
  for r in rows:
    if r.split in splits.SPLITS:
      where.setdefault(r.metadata["patient_id"], set()).add(r.split)
  assert len(where) == 14 and all(len(v) == 1 for v in where.values())
  assert [r.file for r in rows if r.split == splits.SKIPPED] == ["Clear/f03.dcm"]
  metrics = json.loads((run / "metrics.json").read_text())
  groups = metrics["subgroups"]["groups"]
  assert sum(g["n"] for g in groups if g["column"] == "sex") == metrics["n"]
  assert {g["column"] for g in groups} == {"sex", "age_band"}
  text = (run / "metrics.md").read_text()
  assert "## Subgroups" in text and "| sex | F |" in text and "| age_band |" in text
  # A subgroup column the data lack is refused before any training, naming the config key.
  config.subgroups = ("source",)
  with pytest.raises(ConfigError, match=r"config.subgroups: 'source' is not a metadata column"):
    classify.train_and_evaluate(config, tmp_path / "run2")
