"""Hostile inputs (issue "Reliability"): a corpus of bad files, folders, configs, weights and
checkpoints, all built here in tmp_path. Every kind must end in a documented conversion (with the
right pixels) or a `UserError` whose message names the file, folder or config key: never a
traceback, never data silently lost or mislabelled.

Each case is a small function that builds one kind of bad input and checks the outcome through the
entry point a run uses: `images.decode` for one file and `dataset.load_splits` for a database (its
skip warning, split manifest and images), the trainers' `validate`, `load_imagenet_resnet50`, the
workdir guard, `Checkpointer` and the exported-model loaders.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import struct
import zipfile
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image
from safetensors.numpy import save_file

from cxr_jax import configlib
from cxr_jax import workdir as workdir_lib
from cxr_jax.data import dataset
from cxr_jax.data import images
from cxr_jax.data import splits
from cxr_jax.errors import ConfigError, DataError, UserError
from cxr_jax.models.pretrained import load_imagenet_resnet50
from cxr_jax.models import build
from cxr_jax.training import checkpoint
from cxr_jax.training import classifier
from cxr_jax.training import export
from cxr_jax.training import functional
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training import pix2pix
from cxr_jax.training import translator
from cxr_jax.training.fit import NetState

from conftest import REPO_ROOT
from test_data_images import _bytes
from test_pretrained import _basic_block_state_dict, write_torchvision_safetensors

S = 32  # the smallest config.data.image_size: files of this size are decoded without resampling
CLASS_FOLDERS = ("COVID", "NORMAL", "Viral Pneumonia")
PER_CLASS = 3


# ------------------------------------------------------------------------------------ helpers


def noise(seed: int, size: int = S) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (size, size), np.uint8)


def database(parent: pathlib.Path, name: str = "db") -> pathlib.Path:
  """A first-release database of distinct random images (equal images would be dropped as
  ambiguous), into which a case puts its bad input."""
  root = parent / name
  for k, folder in enumerate(CLASS_FOLDERS):
    (root / folder).mkdir(parents=True)
    for i in range(PER_CLASS):
      Image.fromarray(noise(10 * k + i)).save(root / folder / f"{folder} ({i + 1}).png")
  return root


@dataclasses.dataclass
class Loaded:
  sets: dict[str, dataset.ImageSet]
  manifest: dict[str, splits.ManifestRow]
  warnings: list[str]

  def pixels(self, file: str) -> np.ndarray:
    for s in self.sets.values():
      if file in s.files:
        return s.images[s.files.index(file), ..., 0]
    raise AssertionError(f"{file} is in no split")

  def counts(self) -> dict[str, int]:
    return {c: sum(s.counts()[c] for s in self.sets.values())
            for c in self.sets["train"].class_names}

  def files(self) -> set[str]:
    return {f for s in self.sets.values() for f in s.files}


def load(root: pathlib.Path, tmp_path: pathlib.Path, caplog) -> Loaded:
  """`load_splits` as every task calls it; returns the splits, manifest rows and warnings."""
  work = tmp_path / "work"
  cfg = configlib.data_config(data_dir=str(root), cache_dir=str(tmp_path / "cache"),
                              image_size=S)
  with caplog.at_level(logging.INFO):
    sets = dataset.load_splits(cfg, work)
  rows = {r.file: r for r in splits.read_manifest(work / splits.MANIFEST)}
  return Loaded(sets, rows, [r.getMessage() for r in caplog.records
                             if r.levelno >= logging.WARNING])


def refused(fn: Callable[[], object], error: type[UserError], *needles: str) -> str:
  """Runs fn, which must raise `error` with every needle (file, key, reason) in its message."""
  with pytest.raises(error) as info:
    fn()
  msg = str(info.value)
  for needle in needles:
    assert needle in msg, f"{needle!r} not in {msg!r}"
  return msg


def decode_refused(path: pathlib.Path, reason: str) -> None:
  """decode names the file and the reason, and no PIL exception is chained to it."""
  with pytest.raises(images.ImageError) as info:
    images.decode(path, S)
  assert str(path) in str(info.value) and reason in info.value.reason, str(info.value)
  assert info.value.__cause__ is None
  assert info.value.__context__ is None or info.value.__suppress_context__


def skipped(loaded: Loaded, file: str, reason: str) -> None:
  """The dataset left the file out, said so in its one skip warning and in the manifest."""
  assert file not in loaded.files()
  assert loaded.manifest[file].split == splits.SKIPPED and reason in loaded.manifest[file].note
  assert any(m.startswith("Skipped") and f"{file} (" in m and reason in m
             for m in loaded.warnings), loaded.warnings


def bad_file(tmp_path, caplog, name: str, data: bytes, reason: str) -> None:
  """A file that cannot be a radiograph, in a class folder: refused by decode, skipped by the
  dataset with a warning naming it, and the rest of the database still loads."""
  root = database(tmp_path)
  (root / name).write_bytes(data)
  decode_refused(root / name, reason)
  loaded = load(root, tmp_path, caplog)
  skipped(loaded, name, reason)
  assert loaded.counts() == {"COVID": PER_CLASS, "NORMAL": PER_CLASS,
                             "VIRAL_PNEUMONIA": PER_CLASS}


def converted(tmp_path, caplog, name: str, data: bytes, expected: np.ndarray, note: str,
              tol: int = 0) -> None:
  """A documented conversion: decode gives `expected` (within `tol`, for JPEG) and says what it
  did; the dataset holds the same pixels and the manifest notes the conversion."""
  root = database(tmp_path)
  (root / name).write_bytes(data)
  out = images.decode(root / name, S)
  assert out.pixels.shape == (S, S) and out.pixels.dtype == np.uint8
  err = np.abs(out.pixels.astype(int) - expected.astype(int)).max()
  assert err <= tol, f"max error {err} > {tol}"
  assert any(note in n for n in out.notes), out.notes
  loaded = load(root, tmp_path, caplog)
  np.testing.assert_array_equal(loaded.pixels(name), out.pixels)
  assert "converted: " in loaded.manifest[name].note and note in loaded.manifest[name].note


def png_header_only(width: int, height: int) -> bytes:
  """A valid 8-bit gray PNG signature, IHDR, empty IDAT and IEND: a few dozen bytes that claim
  any size (a decompression bomb that costs nothing to build)."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
          + chunk(b"IEND", b""))


def smoke_config(name: str, **overrides):
  config = configlib.load_config_file(REPO_ROOT / "configs" / f"{name}.py", "smoke")
  config.update(overrides)
  return config


def _zeros(tree):
  """numpy zeros (a typed key for keys) for an abstract pytree: real arrays without compiling one
  op per shape."""
  return jax.tree.map(lambda s: jax.random.key(0) if jax.dtypes.issubdtype(
      s.dtype, jax.dtypes.prng_key) else np.zeros(s.shape, s.dtype), tree)


def pix2pix_state(config) -> pix2pix.State:
  """A pix2pix training state of the smoke config's networks (zeros: only the structure and
  shapes matter to the checks), built from abstract modules in well under a second."""
  gen, disc = pix2pix.build_networks(config, S, 1, abstract=True)
  _, gp, gs = functional.Functional.split(gen)
  _, dp, ds = functional.Functional.split(disc)
  tx = optax.adam(1e-3)
  return _zeros(jax.eval_shape(lambda gp, gs, dp, ds: pix2pix.State(
      step=jnp.zeros((), jnp.int32), rng=jax.random.key(0), g=NetState.create(gp, gs, tx),
      d=NetState.create(dp, ds, tx)), gp, gs, dp, ds))


def classifier_state(config) -> classifier.State:
  arch = {"variant": config.model.variant, "stage_sizes": config.model.stage_sizes,
          "width": config.model.width, "in_channels": config.model.in_channels}
  net = build.build_resnet(arch, num_classes=3, compute_dtype="float32", seed=0, abstract=True)
  _, params, stats = functional.Functional.split(net)
  tx = optax.sgd(0.1, momentum=0.9)
  return _zeros(jax.eval_shape(lambda p, s: classifier.State(
      step=jnp.zeros((), jnp.int32), rng=jax.random.key(0), net=NetState.create(p, s, tx)),
      params, stats))


# ------------------------------------------------------------------------------ bad image files


def truncated_png(tmp_path, caplog):
  good = _bytes(Image.fromarray(noise(99)))
  bad_file(tmp_path, caplog, "COVID/cut.png", good[:len(good) // 2], "truncated")


def corrupt_png(tmp_path, caplog):
  """A flipped byte inside the compressed pixels (a bad copy, a flaky disk)."""
  data = bytearray(_bytes(Image.fromarray(noise(99))))
  data[data.find(b"IDAT") + 20] ^= 0xFF
  bad_file(tmp_path, caplog, "COVID/flipped.png", bytes(data), "corrupt")


def zero_byte_file(tmp_path, caplog):
  bad_file(tmp_path, caplog, "NORMAL/empty.png", b"", "empty file (0 bytes)")


def not_an_image(tmp_path, caplog):
  """A text file and an HTML error page saved with image suffixes."""
  bad_file(tmp_path, caplog, "COVID/notes.png", b"these are my notes\n", "not an image")
  bad_file(tmp_path / "2", caplog, "NORMAL/login.jpg",
           b"<!DOCTYPE html><html>403 Forbidden</html>", "not an image")


def one_pixel_image(tmp_path, caplog):
  bad_file(tmp_path, caplog, "COVID/pixel.png", _bytes(Image.new("L", (1, 1), 7)), "too small")


def decompression_bomb(tmp_path, caplog):
  """PNG headers claiming 10^10 px (past twice Pillow's limit: its error) and 10^8 px (past the
  limit: its warning, which decode turns into an error): tiny files, refused before any pixel
  is allocated, in the dataset's worker threads too."""
  huge, big = png_header_only(100_000, 100_000), png_header_only(10_000, 10_000)
  assert len(huge) < 100 and 10_000**2 > Image.MAX_IMAGE_PIXELS
  root = database(tmp_path)
  (root / "COVID/huge.png").write_bytes(huge)
  (root / "NORMAL/big.png").write_bytes(big)
  for name in ("COVID/huge.png", "NORMAL/big.png"):
    decode_refused(root / name, "decompression bomb")
  loaded = load(root, tmp_path, caplog)
  for name in ("COVID/huge.png", "NORMAL/big.png"):
    skipped(loaded, name, "decompression bomb")


def unreadable_file(tmp_path, caplog):
  root = database(tmp_path)
  path = root / "COVID" / "locked.png"
  Image.fromarray(noise(99)).save(path)
  path.chmod(0)
  if os.access(path, os.R_OK):
    pytest.skip("running as root (or with CAP_DAC_OVERRIDE): a mode-000 file is still readable")
  decode_refused(path, "cannot read")
  skipped(load(root, tmp_path, caplog), "COVID/locked.png", "cannot read")


# ---------------------------------------------------------------------- documented conversions


def png_16bit(tmp_path, caplog):
  """16-bit data are scaled by the container's range (65535 -> 255), not clipped to 255."""
  a = np.zeros((S, S), np.uint16)
  a[:, S // 2:] = 65535
  a[0, 0] = 257 * 100
  expected = np.zeros((S, S), np.uint8)
  expected[:, S // 2:] = 255
  expected[0, 0] = 100
  converted(tmp_path, caplog, "COVID/deep.png", _bytes(Image.fromarray(a)), expected, "16-bit")


def rgba_png(tmp_path, caplog):
  """Transparent pixels are composited on black, opaque ones converted by luma."""
  a = np.zeros((S, S, 4), np.uint8)
  a[..., :3] = (200, 100, 50)
  a[:, S // 2:, 3] = 255
  expected = np.zeros((S, S), np.uint8)
  expected[:, S // 2:] = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
  converted(tmp_path, caplog, "NORMAL/alpha.png", _bytes(Image.fromarray(a, "RGBA")), expected,
            "alpha composited on black")


def palette_png(tmp_path, caplog):
  """Palette with a transparent entry: luma of the colours, transparent entry on black."""
  im = Image.new("P", (S, S), 1)
  im.putpalette([255, 255, 255, 0, 255, 0] + [0] * 762)
  im.paste(0, (0, 0, S // 2, S))
  expected = np.full((S, S), round(0.587 * 255), np.uint8)
  expected[:, :S // 2] = 0
  converted(tmp_path, caplog, "COVID/palette.png", _bytes(im, transparency=0), expected,
            "P with transparency -> grayscale")


def cmyk_jpeg(tmp_path, caplog):
  im = Image.new("CMYK", (S, S), (0, 0, 0, 128))
  converted(tmp_path, caplog, "COVID/print.jpg", _bytes(im, "JPEG", quality=95),
            np.full((S, S), 127, np.uint8), "CMYK -> grayscale", tol=3)


def exif_rotated_jpeg(tmp_path, caplog):
  """Orientation 6 (display rotated 90 degrees clockwise): the stored top-left quadrant shows
  top-right."""
  a = np.zeros((S, S), np.uint8)
  a[:S // 2, :S // 2] = 255
  im = Image.fromarray(a)
  exif = im.getexif()
  exif[0x0112] = 6
  expected = np.zeros((S, S), np.uint8)
  expected[:S // 2, S // 2:] = 255
  converted(tmp_path, caplog, "NORMAL/phone.jpg",
            _bytes(im, "JPEG", quality=95, exif=exif.tobytes()), expected, "EXIF orientation",
            tol=40)  # JPEG ringing at the quadrant edges; a wrong rotation is off by 255


def exif_invalid_orientation(tmp_path, caplog):
  """Orientation 9 does not exist: the pixels stay as stored, and the note does not claim a
  rotation was applied."""
  a = noise(5)
  im = Image.fromarray(a)
  exif = im.getexif()
  exif[0x0112] = 9
  out = images.decode(_bytes(im, "PNG", exif=exif.tobytes()), S, name="x.png")
  np.testing.assert_array_equal(out.pixels, a)
  assert out.notes == ("invalid EXIF orientation 9 ignored",)


# ------------------------------------------------------------------------------------ file names


def non_utf8_file_names(tmp_path, caplog):
  """Latin-1 names (a copy unzipped with a legacy code page) are read, listed with the bad bytes
  escaped; a broken one is skipped under that escaped name."""
  root = database(tmp_path)
  Image.fromarray(noise(99)).save(root / "COVID" / os.fsdecode(b"radiographie \xe9t\xe9.png"))
  good = _bytes(Image.fromarray(noise(98)))
  (root / "NORMAL" / os.fsdecode(b"\xff\xfe.png")).write_bytes(good[:len(good) // 2])
  loaded = load(root, tmp_path, caplog)
  np.testing.assert_array_equal(loaded.pixels(r"COVID/radiographie \xe9t\xe9.png"), noise(99))
  skipped(loaded, r"NORMAL/\xff\xfe.png", "truncated")
  assert any("not valid UTF-8" in m and r"\xe9t\xe9" in m for m in loaded.warnings)


def non_utf8_zip_member(tmp_path, caplog):
  """A Kaggle-style zip whose member name is flagged UTF-8 but holds Latin-1 bytes."""
  png = _bytes(Image.fromarray(noise(1)))
  archive = tmp_path / "archive.zip"
  with zipfile.ZipFile(archive, "w") as zf:
    for k, folder in enumerate(CLASS_FOLDERS):
      zf.writestr(f"db/{folder}/{k}.png", _bytes(Image.fromarray(noise(k))))
    zf.writestr("db/COVID/caf\u00e9.png", png)  # zipfile sets the UTF-8 flag for this name
  data = archive.read_bytes()
  assert data.count("\u00e9".encode()) == 2  # local header and central directory
  archive.write_bytes(data.replace("\u00e9".encode(), b"\xe9\xe9"))
  refused(lambda: load(archive, tmp_path, caplog), DataError, str(archive), r"caf\xe9\xe9.png",
          "marked UTF-8")


def non_utf8_database_folder(tmp_path, caplog):
  """The database folder itself has a Latin-1 name (say, a French 'Téléchargements')."""
  root = database(tmp_path, os.fsdecode(b"t\xe9l\xe9chargements"))
  assert sum(load(root, tmp_path, caplog).counts().values()) == 3 * PER_CLASS


def spaces_in_names(tmp_path, caplog):
  """Spaces anywhere: the data_dir, leading / trailing / doubled in file names, before the suffix;
  every file is read under its exact name and a broken one is named exactly."""
  root = database(tmp_path / "my  data", "COVID-19 Radiography Database ")
  names = ["COVID/ lead.png", "NORMAL/trail .png", "Viral Pneumonia/two  spaces.png"]
  for k, name in enumerate(names):
    Image.fromarray(noise(90 + k)).save(root / name)
  good = _bytes(Image.fromarray(noise(99)))
  (root / "COVID/ broken  copy .png").write_bytes(good[:len(good) // 2])
  loaded = load(root, tmp_path, caplog)
  for k, name in enumerate(names):
    np.testing.assert_array_equal(loaded.pixels(name), noise(90 + k))
  skipped(loaded, "COVID/ broken  copy .png", "truncated")


# ------------------------------------------------------------------------------ folders, links


def symlink_loop(tmp_path, caplog):
  """Links back up the tree (to the class folder, to the folder above the database, which holds a
  stray picture), a file link to itself and a dangling one: the scan ends, counts each image
  once, takes nothing from outside the database and names each skipped link."""
  root = database(tmp_path)
  (tmp_path / "holidays").mkdir()
  Image.fromarray(noise(77)).save(tmp_path / "holidays" / "beach.png")
  os.symlink(root / "COVID", root / "COVID" / "loop")
  os.symlink(tmp_path, root / "NORMAL" / "up")
  os.symlink("self.png", root / "Viral Pneumonia" / "self.png")
  os.symlink("gone.png", root / "COVID" / "dangling.png")
  loaded = load(root, tmp_path, caplog)
  assert loaded.counts() == {"COVID": PER_CLASS, "NORMAL": PER_CLASS,
                             "VIRAL_PNEUMONIA": PER_CLASS}
  assert not any("beach" in f or "loop" in f for f in loaded.files())
  for link in ("COVID/loop", "NORMAL/up", "Viral Pneumonia/self.png", "COVID/dangling.png"):
    assert any(str(root / link) in m for m in loaded.warnings), (link, loaded.warnings)


def symlink_into_other_class(tmp_path, caplog):
  """A link inside COVID/ to the NORMAL folder would relabel every normal image as COVID."""
  root = database(tmp_path)
  os.symlink(root / "NORMAL", root / "COVID" / "more")
  loaded = load(root, tmp_path, caplog)
  assert loaded.counts() == {"COVID": PER_CLASS, "NORMAL": PER_CLASS,
                             "VIRAL_PNEUMONIA": PER_CLASS}
  assert any(str(root / "COVID" / "more") in m and "NORMAL" in m for m in loaded.warnings)


def empty_class_folder(tmp_path, caplog):
  root = database(tmp_path)
  for p in (root / "Viral Pneumonia").iterdir():
    p.unlink()
  refused(lambda: load(root, tmp_path, caplog), DataError, str(root),
          "no images of class VIRAL_PNEUMONIA", "'Viral Pneumonia'", "config.data.classes")


def unknown_class_folder(tmp_path, caplog):
  """A class folder config.data.classes does not list is a class of its own, left out of the run
  with a note naming the folder."""
  root = database(tmp_path)
  (root / "Bacterial Pneumonia").mkdir()
  Image.fromarray(noise(99)).save(root / "Bacterial Pneumonia" / "b.png")
  loaded = load(root, tmp_path, caplog)
  assert not any(f.startswith("Bacterial") for f in {*loaded.files(), *loaded.manifest})
  assert any("'Bacterial Pneumonia' (1 images)" in r.getMessage() and "not used" in
             r.getMessage() for r in caplog.records)
  assert sum(loaded.counts().values()) == 3 * PER_CLASS


def same_image_in_two_classes(tmp_path, caplog):
  """Equal pixels under two labels: both copies are dropped (no trustworthy label), each manifest
  row names the other copy, the warning names both."""
  root = database(tmp_path)
  Image.fromarray(noise(99)).save(root / "COVID" / "dup.png")
  Image.fromarray(noise(99)).save(root / "NORMAL" / "dup.jpg.png")
  loaded = load(root, tmp_path, caplog)
  a, b = "COVID/dup.png", "NORMAL/dup.jpg.png"
  assert a not in loaded.files() and b not in loaded.files()
  for this, other in ((a, b), (b, a)):
    row = loaded.manifest[this]
    assert row.split == splits.DROPPED and "ambiguous" in row.note and other in row.note
  assert any(m.startswith("Dropped 2 image(s)") and a in m and b in m for m in loaded.warnings)


# -------------------------------------------------------------------------------- config values


def negative_batch_size(tmp_path, caplog):
  del tmp_path, caplog
  refused(lambda: pix2pix.Pix2Pix.check_config(smoke_config("pix2pix", batch_size=-1)), ConfigError,
          "config.batch_size", "-1")
  refused(lambda: classifier.validate(smoke_config("classifier", batch_size=-4)), ConfigError,
          "config.batch_size", "-4")
  refused(lambda: classifier.validate(smoke_config("classifier", eval_batch_size=0)),
          ConfigError, "config.eval_batch_size")


def image_size_unet_cannot_halve(tmp_path, caplog):
  """48 px is a valid data size but the U-Net halves it down to 1x1: refused by pix2pix only."""
  del tmp_path, caplog
  config = smoke_config("pix2pix")
  config.data.image_size = 48
  dataset.check_config(config.data)
  refused(lambda: pix2pix.Pix2Pix.check_config(config), ConfigError, "config.data.image_size", "48",
          "power of two")


def image_size_below_minimum(tmp_path, caplog):
  del tmp_path, caplog
  refused(lambda: dataset.check_config(configlib.data_config(image_size=16)), ConfigError,
          "config.data.image_size", "16")
  refused(lambda: dataset.check_config(configlib.data_config(image_size=-256)), ConfigError,
          "config.data.image_size", "-256")


def split_fractions_out_of_range(tmp_path, caplog):
  del tmp_path, caplog
  for bad in ((0.8, 0.3, -0.1), (0.7, 0.1), (0.7, 0.2, 0.2)):
    refused(lambda: dataset.check_config(configlib.data_config(split_fractions=bad)),
            ConfigError, "config.data.split_fractions")


# ---------------------------------------------------------------------- weights and checkpoints


def weights_resnet18(tmp_path, caplog):
  del caplog
  path = tmp_path / "resnet18.safetensors"
  save_file(_basic_block_state_dict(), str(path))
  refused(lambda: load_imagenet_resnet50(path), UserError, str(path), "not a bottleneck ResNet")


def weights_random_tensors(tmp_path, caplog):
  """A ViT-like file: nothing of a ResNet in it."""
  del caplog
  path = tmp_path / "vit_tiny.safetensors"
  rng = np.random.default_rng(0)
  save_file({"patch_embed.proj.weight": rng.normal(size=(8, 3, 4, 4)).astype(np.float32),
             "blocks.0.attn.qkv.weight": rng.normal(size=(24, 8)).astype(np.float32)}, str(path))
  refused(lambda: load_imagenet_resnet50(path), UserError, str(path), "'conv1.weight' is missing")


def weights_truncated(tmp_path, caplog):
  """A download cut short: the safetensors header promises more bytes than the file holds."""
  del caplog
  path = tmp_path / "resnet50.safetensors"
  write_torchvision_safetensors(path)
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  refused(lambda: load_imagenet_resnet50(path), UserError, str(path), "cannot read it")


def pix2pix_workdir_for_classifier(tmp_path, caplog):
  """The classifier pointed at a pix2pix run directory: the workdir guard refuses it, naming the
  folder and differing keys, before anything is loaded or overwritten."""
  del caplog
  run = tmp_path / "runs" / "pix2pix"
  workdir_lib.prepare(run, smoke_config("pix2pix"))
  (run / "checkpoints").mkdir()
  saved = (run / workdir_lib.CONFIG_FILE).read_text()
  refused(lambda: workdir_lib.prepare(run, smoke_config("classifier")), UserError, str(run),
          "different config", "batch_size (4 -> 8)")
  assert (run / workdir_lib.CONFIG_FILE).read_text() == saved


def pix2pix_checkpoint_into_classifier(tmp_path, caplog):
  """A pix2pix checkpoint restored by a classifier run (a new process, as on resume): refused
  naming the directory, and the checkpoint is left where it is."""
  del caplog
  directory = tmp_path / "run" / "checkpoints"
  ckpt = checkpoint.Checkpointer(directory)
  ckpt.save(4, pix2pix_state(smoke_config("pix2pix")))
  ckpt.wait()
  ckpt.close()
  ckpt = checkpoint.Checkpointer(directory, best_metric="macro_f1")
  try:
    refused(lambda: ckpt.restore_latest(classifier_state(smoke_config("classifier"))), UserError,
            str(directory), "another model")
  finally:
    ckpt.close()
  assert (directory / "4").is_dir() and not (directory / "4.unreadable").exists()


def generator_export_as_classifier(tmp_path, caplog):
  """A real generator export (it loads as one) given where a classifier export is expected, and a
  checkpoint folder given as an export."""
  del caplog
  config = smoke_config("pix2pix")
  model = pix2pix.Pix2Pix(config, image_size=S, steps_per_epoch=1, mesh=mesh_lib.make_mesh(1))
  model.export(tmp_path / "pix2pix", pix2pix_state(config), 4)
  directory = tmp_path / "pix2pix" / translator.GENERATOR_DIR
  assert export.load_generator(directory).meta["kind"] == "generator"
  refused(lambda: export.load_classifier(directory), UserError, str(directory),
          "'generator', not a classifier")
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  refused(lambda: export.load_classifier(tmp_path / "run" / "checkpoints"), UserError,
          str(tmp_path / "run" / "checkpoints"), "no model.json")


# ------------------------------------------------------------------------------------ the corpus


CORPUS = [
    truncated_png, corrupt_png, zero_byte_file, not_an_image, one_pixel_image,
    decompression_bomb, unreadable_file,
    png_16bit, rgba_png, palette_png, cmyk_jpeg, exif_rotated_jpeg, exif_invalid_orientation,
    non_utf8_file_names, non_utf8_zip_member,
    non_utf8_database_folder,
    spaces_in_names,
    symlink_loop, symlink_into_other_class, empty_class_folder, unknown_class_folder,
    same_image_in_two_classes,
    negative_batch_size, image_size_unet_cannot_halve, image_size_below_minimum,
    split_fractions_out_of_range,
    weights_resnet18, weights_random_tensors, weights_truncated,
    pix2pix_workdir_for_classifier,
    pix2pix_checkpoint_into_classifier,
    generator_export_as_classifier,
]


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.__name__)
def test_hostile_input(case, tmp_path, caplog):
  case(tmp_path, caplog)

