"""Finding the database in every form users have it, and clear errors when it is not there."""

import os
import pathlib
import zipfile

import numpy as np
import pytest
from PIL import Image

from cxr_jax.data import classes
from cxr_jax.data import layout
from cxr_jax.errors import ConfigError
from cxr_jax.errors import DataError

LATER = "COVID-19_Radiography_Dataset"


def _png(path: pathlib.Path, value: int = 100) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((64, 64), value, np.uint8)).save(path)
  return path


def first_release(root: pathlib.Path, n: int = 2) -> pathlib.Path:
  for folder in ("COVID", "NORMAL", "Viral Pneumonia"):
    for i in range(n):
      _png(root / folder / f"{folder} ({i + 1}).png", 10 * i)
  return root


def later_release(parent: pathlib.Path, n: int = 2) -> pathlib.Path:
  root = parent / LATER
  for folder in ("COVID", "Normal", "Viral Pneumonia", "Lung_Opacity"):
    for i in range(n):
      _png(root / folder / "images" / f"{folder}-{i + 1}.png", 10 * i)
      _png(root / folder / "masks" / f"{folder}-{i + 1}.png", 255)
    (root / f"{folder}.metadata.xlsx").write_bytes(b"PK\x03\x04 not really")
  (root / "README.md.txt").write_text("readme")
  return root


def test_first_release_flat(tmp_path):
  lay = layout.discover(first_release(tmp_path / "db"))
  assert lay.release == layout.FIRST_RELEASE and not lay.is_zip and lay.root == ""
  assert [e.file for e in lay.entries] == sorted(e.file for e in lay.entries)
  assert lay.entries[0] == layout.Entry("COVID/COVID (1).png", "COVID")
  assert lay.counts() == {"COVID": 2, "NORMAL": 2, "VIRAL_PNEUMONIA": 2, "LUNG_OPACITY": 0}
  assert lay.class_folders["VIRAL_PNEUMONIA"] == ("Viral Pneumonia",)


def test_later_release_ignores_masks_and_metadata(tmp_path):
  lay = layout.discover(later_release(tmp_path))
  assert lay.release == layout.LATER_RELEASE and lay.root == ""
  assert lay.counts() == {"COVID": 2, "NORMAL": 2, "VIRAL_PNEUMONIA": 2, "LUNG_OPACITY": 2}
  assert all("/images/" in e.file and "masks" not in e.file for e in lay.entries)
  assert layout.Entry("Lung_Opacity/images/Lung_Opacity-1.png", "LUNG_OPACITY") in lay.entries
  assert lay.class_folders["NORMAL"] == ("Normal",)


def test_parent_folder(tmp_path):
  later_release(tmp_path / "download")
  lay = layout.discover(tmp_path / "download")
  assert lay.root == LATER and lay.source == (tmp_path / "download").resolve()
  assert lay.root_path.endswith(LATER) and len(lay.entries) == 8
  with lay.reader() as read:
    assert read(lay.entries[0].file) == (tmp_path / "download" / LATER /
                                         lay.entries[0].file).read_bytes()


def test_kaggle_zip_read_without_extracting(tmp_path):
  root = later_release(tmp_path / "tree")
  archive = tmp_path / "archive.zip"
  with zipfile.ZipFile(archive, "w") as zf:
    for p in sorted(root.rglob("*")):
      if p.is_file():
        zf.write(p, p.relative_to(root.parent).as_posix())
    zf.writestr(f"__MACOSX/{LATER}/COVID/images/._COVID-1.png", b"\x00\x05AppleDouble")
    zf.writestr(f"{LATER}/COVID/images/._COVID-1.png", b"\x00\x05AppleDouble")
  lay = layout.discover(archive)
  folder = layout.discover(root)
  assert lay.is_zip and lay.root == LATER and lay.release == layout.LATER_RELEASE
  assert lay.entries == folder.entries
  with lay.reader() as read:
    assert read(lay.entries[0].file) == (root / lay.entries[0].file).read_bytes()
  assert lay.display(lay.entries[0].file).startswith(str(archive))
  assert not list(tmp_path.glob("**/*.extracted"))  # nothing written beside the zip
  assert sorted(p.name for p in tmp_path.iterdir()) == ["archive.zip", "tree"]


def test_aliases_and_class_selection():
  assert classes.canonical("Viral Pneumonia") == classes.canonical("viral_pneumonia") == \
      "VIRAL_PNEUMONIA"
  assert classes.canonical("Lung_Opacity") == "LUNG_OPACITY"
  assert classes.canonical("Normal") == "NORMAL" and classes.canonical("COVID-19") == "COVID"
  assert classes.database_class("masks") is None
  # Any other name is a class of its own, in one stable spelling.
  assert classes.canonical("Tuberculosis") == classes.canonical("tuberculosis") == "TUBERCULOSIS"
  assert classes.canonical(" bacterial--pneumonia ") == "BACTERIAL_PNEUMONIA"
  assert classes.canonical(" _ ") is None
  assert classes.resolve(["normal", "Covid"]) == ("NORMAL", "COVID")
  assert classes.resolve("COVID, Viral Pneumonia") == ("COVID", "VIRAL_PNEUMONIA")
  assert classes.resolve(["Tuberculosis", "Healthy"]) == ("TUBERCULOSIS", "HEALTHY")
  for bad in (["COVID", ""], ["COVID"], ["COVID", "covid"], ["Healthy", "HEALTHY"]):
    with pytest.raises(ConfigError, match=r"config\.data\.classes"):
      classes.resolve(bad)


def test_missing_directory(tmp_path):
  with pytest.raises(DataError, match=str(tmp_path / "nope")):
    layout.discover(tmp_path / "nope")


def test_file_that_is_neither_folder_nor_zip(tmp_path):
  (tmp_path / "db.tar").write_text("hello")
  with pytest.raises(DataError, match="neither a folder nor a zip") as e:
    layout.discover(tmp_path / "db.tar")
  assert str(tmp_path / "db.tar") in str(e.value)


def test_no_class_folder_lists_what_it_saw(tmp_path):
  (tmp_path / "db" / "cats" / "a").mkdir(parents=True)
  (tmp_path / "db" / "dogs").mkdir(parents=True)
  (tmp_path / "db" / "dogs" / "notes.txt").write_text("no image")
  with pytest.raises(DataError) as e:
    layout.discover(tmp_path / "db")
  msg = str(e.value)
  assert str(tmp_path / "db") in msg and "'cats'" in msg and "'dogs'" in msg
  assert "'Viral Pneumonia'" in msg and "'Normal'" in msg


def test_folders_of_images_with_other_names_are_classes_and_missing_ones_are_listed(tmp_path):
  _png(tmp_path / "db" / "cats" / "a.png")
  _png(tmp_path / "db" / "dogs" / "b.png")
  lay = layout.discover(tmp_path)  # found one level down, by its folders of images
  assert lay.classes == ("CATS", "DOGS") and lay.counts()["CATS"] == 1
  with pytest.raises(DataError) as e:
    lay.require_classes(["COVID", "NORMAL"])
  msg = str(e.value)
  assert "no images of class COVID, NORMAL" in msg
  assert "'cats' (1 images), 'dogs' (1 images)" in msg


def test_pointing_at_a_class_folder_hints_at_the_parent(tmp_path):
  root = later_release(tmp_path)
  with pytest.raises(DataError, match="folder above"):
    layout.discover(root / "COVID")


def test_requested_class_without_images(tmp_path):
  lay = layout.discover(first_release(tmp_path / "db"))
  lay.require_classes(["COVID", "NORMAL"])
  with pytest.raises(DataError, match="LUNG_OPACITY") as e:
    lay.require_classes(["COVID", "LUNG_OPACITY"])
  assert str(tmp_path / "db") in str(e.value) and "Lung_Opacity" in str(e.value)
  (tmp_path / "db" / "Lung_Opacity").mkdir()  # present but empty
  with pytest.raises(DataError, match="no images of class LUNG_OPACITY"):
    layout.discover(tmp_path / "db").require_classes(["COVID", "LUNG_OPACITY"])


def test_other_folder_beside_the_database_is_a_class_of_its_own(tmp_path):
  root = first_release(tmp_path / "db")
  _png(root / "Bacterial Pneumonia" / "x.png")
  lay = layout.discover(root)
  assert lay.ignored_folders == ()
  assert lay.class_folders["BACTERIAL_PNEUMONIA"] == ("Bacterial Pneumonia",)
  assert layout.Entry("Bacterial Pneumonia/x.png", "BACTERIAL_PNEUMONIA") in lay.entries
  assert lay.classes == ("COVID", "NORMAL", "VIRAL_PNEUMONIA", "BACTERIAL_PNEUMONIA")
  assert lay.counts()["COVID"] == 2


def test_symlink_loops_do_not_hang(tmp_path):
  root = later_release(tmp_path)
  os.symlink(root / "COVID", root / "COVID" / "images" / "loop")
  os.symlink(tmp_path, root / "Normal" / "up")
  lay = layout.discover(tmp_path)
  assert lay.counts()["COVID"] == 2 and lay.counts()["NORMAL"] == 2


def test_symlinked_class_folder_is_followed(tmp_path):
  first_release(tmp_path / "store")
  (tmp_path / "db").mkdir()
  for folder in ("COVID", "NORMAL"):
    os.symlink(tmp_path / "store" / folder, tmp_path / "db" / folder)
  lay = layout.discover(tmp_path / "db")
  assert lay.counts()["COVID"] == 2 and lay.counts()["NORMAL"] == 2


def test_two_copies_at_the_same_depth_are_refused(tmp_path):
  first_release(tmp_path / "a")
  first_release(tmp_path / "b")
  with pytest.raises(DataError, match="several copies"):
    layout.discover(tmp_path)


def test_fingerprint_changes_with_the_files(tmp_path):
  root = first_release(tmp_path / "db")
  before = layout.discover(root).fingerprint
  assert layout.discover(root).fingerprint == before
  _png(root / "COVID" / "COVID (9).png")
  assert layout.discover(root).fingerprint != before
