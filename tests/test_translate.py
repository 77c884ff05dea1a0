"""The `translate` task (a folder through a generator of ours or of the PyTorch reference) and the
`export` task (ours -> safetensors with the reference's / torchvision's key names)."""

from __future__ import annotations

import csv
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from cxr_jax import configlib, tasks
from cxr_jax.data import images as images_lib
from cxr_jax.data.images import pixel_hash
from cxr_jax.errors import ConfigError, DataError, UserError
from cxr_jax.models import build, pretrained, torch_io
from cxr_jax.models.resnet import ResNet
from cxr_jax.pipeline import export_task, translate
from cxr_jax.training import export, pixels
from cxr_jax.training.functional import Functional
from cxr_jax.utils import grid

from conftest import REPO_ROOT

DATA = pathlib.Path(__file__).resolve().parent / "data"
SIZE = 64  # a U-Net of 6 levels: the smallest with a dropout level (seeds matter)


def _config(**overrides):
  config = configlib.load_config_file(REPO_ROOT / "configs/translate.py", "smoke")
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def our_generator(tmp_path_factory):
  """A tiny U-Net export (dropout on, 'instance' inference: the seed matters)."""
  arch = {"name": "unet", "ngf": 4, "norm": "batch", "use_dropout": True}
  module = build.build_generator(arch, image_size=SIZE, channels=1, compute_dtype="float32",
                                 seed=3)
  net, params, stats = Functional.split(module)
  meta = {"kind": "generator", "translator": "pix2pix", "arch": arch, "image_size": SIZE,
          "channels": 1, "compute_dtype": "float32", "inference": "instance",
          "source_class": "NORMAL", "target_class": "COVID", "step": 7}
  directory = tmp_path_factory.mktemp("gen") / "generator"
  export.save(directory, params, stats, meta)
  return directory, net, params, stats


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
  """Nested PNGs, a JPEG, two inputs that would meet in one output name, one broken file."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  (root / "sub" / "deeper").mkdir(parents=True)
  for name in ("a.png", "sub/b.png", "sub/deeper/c.png"):
    grid.save_png(root / name, rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
  Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(root / "a.jpg")
  (root / "sub" / "broken.png").write_bytes(b"not a png at all")
  return root


def _manifest(workdir):
  with open(workdir / translate.MANIFEST, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _read_png(path):
  return np.asarray(Image.open(path))


def test_folder_through_our_generator(our_generator, images_dir, tmp_path):
  directory, net, params, stats = our_generator
  out = tasks.get("translate")(_config(generator=str(directory), input=str(images_dir), seed=5),
                               tmp_path)
  assert (out["count"], out["skipped"]) == (4, 1)
  rows = _manifest(tmp_path)
  assert [r["input_file"] for r in rows] == ["a.jpg", "a.png", "sub/b.png", "sub/deeper/c.png"]
  # a.jpg and a.png would both be a.png: both keep their suffix; the others mirror their paths.
  assert [r["output_file"] for r in rows] == ["a.jpg.png", "a.png.png", "sub/b.png",
                                              "sub/deeper/c.png"]
  assert {r["seed"] for r in rows} == {"5"} and {r["generator"] for r in rows} == {
      str(directory.absolute())}
  # Keys follow the sorted listing, unreadable files included: a skip shifts no one's noise.
  listing = {"a.jpg": 0, "a.png": 1, "sub/b.png": 2, "sub/deeper/c.png": 4}
  for row in rows:
    i = listing[row["input_file"]]
    src = images_lib.decode(images_dir / row["input_file"], SIZE).pixels
    got = _read_png(tmp_path / "translated" / row["output_file"])
    assert got.shape == (SIZE, SIZE) and got.dtype == np.uint8 and got.std() > 1
    assert row["output_sha256"] == pixel_hash(got)
    assert row["source_sha256"] == pixel_hash(src)
    if row["input_file"] != "a.jpg":  # the JPEG is resampled and checked by its hash only
      # Image i: pix2pix test mode, its own batch statistics, dropout keyed by (seed, i).
      key = jax.random.fold_in(jax.random.key(5), i)
      y, _ = net.apply(params, stats, pixels.to_signed(jnp.asarray(src)[None, ..., None]),
                       train=True, rngs=nnx.Rngs(dropout=key))
      np.testing.assert_array_equal(got, np.asarray(pixels.to_uint8(y))[0, ..., 0])


def test_deterministic_per_seed(our_generator, images_dir, tmp_path):
  directory = str(our_generator[0])
  hashes = {}
  for name, seed in (("a", 1), ("b", 1), ("c", 2)):
    tasks.get("translate")(_config(generator=directory, input=str(images_dir), seed=seed,
                                   batch_size=4 if name == "a" else 8), tmp_path / name)
    hashes[name] = [r["output_sha256"] for r in _manifest(tmp_path / name)]
  assert hashes["a"] == hashes["b"]  # same seed, another batch size: the same images
  assert hashes["a"] != hashes["c"]  # dropout noise is the seed's


def test_one_file_and_eval_override(our_generator, images_dir, tmp_path):
  directory, net, params, stats = our_generator
  tasks.get("translate")(_config(generator=str(directory), input=str(images_dir / "sub/b.png"),
                                 inference="eval"), tmp_path)
  (row,) = _manifest(tmp_path)
  assert (row["input_file"], row["output_file"]) == ("b.png", "b.png")
  src = _read_png(images_dir / "sub/b.png")
  y, _ = net.apply(params, stats, pixels.to_signed(jnp.asarray(src)[None, ..., None]), train=False)
  np.testing.assert_array_equal(_read_png(tmp_path / "translated/b.png"),
                                np.asarray(pixels.to_uint8(y))[0, ..., 0])


@pytest.mark.parametrize("name,size,channels", [("unet64_batch_1ch", 64, 1),
                                                ("resnet2_instance_3ch", 32, 3)])
def test_reference_generator_file(name, size, channels, images_dir, tmp_path):
  """A reference file is imported (parity with torch: tests/test_torch_io.py) and run through
  Exported; a 3-channel generator reads the gray image on every channel and writes RGB."""
  path = DATA / f"{name}.safetensors"
  tasks.get("translate")(_config(generator=str(path), input=str(images_dir / "sub"),
                                 image_size=size, inference="eval"), tmp_path)
  rows = _manifest(tmp_path)
  assert [r["input_file"] for r in rows] == ["b.png", "deeper/c.png"]
  module, _ = torch_io.import_reference_generator(path, image_size=size)
  for row in rows:
    src = images_lib.decode(images_dir / "sub" / row["input_file"], size).pixels
    x = np.repeat(src[None, ..., None], channels, axis=-1)
    want = np.asarray(pixels.to_uint8(module(pixels.to_signed(jnp.asarray(x)), train=False)))[0]
    got = _read_png(tmp_path / "translated" / row["output_file"])
    assert got.shape == ((size, size) if channels == 1 else (size, size, 3))
    np.testing.assert_array_equal(got, want if channels == 3 else want[..., 0])
    assert row["source_sha256"] == pixel_hash(src)
    assert row["output_sha256"] == pixel_hash(got)


def test_errors(our_generator, images_dir, tmp_path):
  directory = str(our_generator[0])
  run = tasks.get("translate")
  with pytest.raises(DataError, match="no such file or folder"):
    run(_config(generator=directory, input=str(tmp_path / "nowhere")), tmp_path / "w1")
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="no image files"):
    run(_config(generator=directory, input=str(tmp_path / "empty")), tmp_path / "w2")
  with pytest.raises(UserError, match="no such generator"):
    run(_config(generator=str(tmp_path / "g.pth"), input=str(images_dir)), tmp_path / "w3")
  (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
  with pytest.raises(UserError, match="bad.safetensors: cannot read it"):
    run(_config(generator=str(tmp_path / "bad.safetensors"), input=str(images_dir)),
        tmp_path / "w4")
  with pytest.raises(UserError, match="no model.json"):
    run(_config(generator=str(tmp_path / "empty"), input=str(images_dir)), tmp_path / "w5")
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(UserError, match="not a generator"):
    run(_config(generator=str(tmp_path / "notes.txt"), input=str(images_dir)), tmp_path / "w6")
  with pytest.raises(UserError, match="image_size 64, config.image_size is 128"):
    run(_config(generator=directory, input=str(images_dir), image_size=128), tmp_path / "w7")
  with pytest.raises(ConfigError, match="the image size must be 64, got 128"):
    run(_config(generator=str(DATA / "unet64_batch_1ch.safetensors"), input=str(images_dir),
                image_size=128), tmp_path / "w8")
  with pytest.raises(UserError, match="reads 3 and writes 3 channels, not the 1"):
    run(_config(generator=str(DATA / "resnet2_instance_3ch.safetensors"), input=str(images_dir),
                image_size=SIZE, channels=1), tmp_path / "w9")
  with pytest.raises(ConfigError, match="config.inference"):
    run(_config(generator=directory, input=str(images_dir), inference="sometimes"),
        tmp_path / "w10")
  broken = tmp_path / "only_broken"
  broken.mkdir()
  (broken / "x.png").write_bytes(b"nope")
  with pytest.raises(DataError, match="none of the images could be read"):
    run(_config(generator=directory, input=str(broken)), tmp_path / "w11")


# ------------------------------------------------------------------------------ export task


def test_export_generator_round_trip(our_generator, images_dir, tmp_path):
  """Export, then the reference importer: the same translations as our export gives."""
  directory = our_generator[0]
  info = export_task.export_task(_export_config(directory), tmp_path)
  path = tmp_path / "generator.safetensors"
  assert info["kind"] == "generator" and info["file"] == path.name
  assert json.loads((tmp_path / "generator.json").read_text())["sha256"] == info["sha256"]
  module, ref = torch_io.import_reference_generator(path, image_size=SIZE)
  assert (ref.name, ref.ngf, ref.norm, ref.in_channels) == ("unet_64", 4, "batch", 1)
  images = np.random.default_rng(4).integers(0, 256, (6, SIZE, SIZE, 1)).astype(np.uint8)
  ours = export.load_generator(directory)
  imported = translate.reference_exported(path, image_size=SIZE, inference="instance")
  np.testing.assert_array_equal(imported.translate(images, seed=2, batch_size=4),
                                ours.translate(images, seed=2, batch_size=4))
  want, _ = our_generator[1].apply(our_generator[2], our_generator[3],
                                   pixels.to_signed(jnp.asarray(images)), train=False)
  np.testing.assert_allclose(np.asarray(module(pixels.to_signed(jnp.asarray(images)), train=False)),
                             np.asarray(want), atol=1e-5)


def test_export_classifier_round_trip(tmp_path):
  arch = {"variant": "v1.5", "stage_sizes": [1, 1, 1, 1], "width": 8, "in_channels": 3}
  model = build.build_resnet(arch, num_classes=3, compute_dtype="float32", seed=1)
  net, params, stats = Functional.split(model)
  meta = {"kind": "classifier", "class_names": ["COVID", "NORMAL", "VIRAL_PNEUMONIA"],
          "arch": arch, "input": build.InputSpec(SIZE, 3).to_json(), "image_size": SIZE,
          "compute_dtype": "float32"}
  export.save(tmp_path / "classifier", params, stats, meta)
  info = export_task.export_task(_export_config(tmp_path / "classifier", "resnet"),
                                 tmp_path / "out")
  assert info["class_names"] == meta["class_names"] and info["file"] == "resnet.safetensors"
  weights = pretrained.load_imagenet_resnet50(tmp_path / "out" / "resnet.safetensors")
  back = pretrained.apply_pretrained(
      ResNet(num_classes=3, stage_sizes=(1, 1, 1, 1), width=8, rngs=nnx.Rngs(9)), weights,
      load_head=True)
  x = jax.random.normal(jax.random.key(1), (2, SIZE, SIZE, 3))
  np.testing.assert_allclose(np.asarray(back(x, train=False)),
                             np.asarray(net.merge(params, stats)(x, train=False)), atol=1e-5)


def test_export_errors(our_generator, tmp_path):
  with pytest.raises(ConfigError, match="model_dir"):
    export_task.export_task(_export_config(""), tmp_path)
  with pytest.raises(UserError, match="no model.json"):
    export_task.export_task(_export_config(tmp_path), tmp_path)
  with pytest.raises(ConfigError, match="output_name"):
    export_task.export_task(_export_config(our_generator[0], "a/b"), tmp_path)


def _export_config(model_dir, name=""):
  config = configlib.load_config_file(REPO_ROOT / "configs/export.py")
  config.model_dir = str(model_dir)
  config.output_name = name
  return config
