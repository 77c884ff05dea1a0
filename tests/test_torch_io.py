"""Weights in and out in the PyTorch world's formats (`cxr_jax.models.torch_io`).

Parity with the reference generators is checked against stored torch outputs (always) and,
where torch is installed, against a live torch forward pass of `tests/data/
make_reference_generators.py`'s definitions of the reference's networks.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from cxr_jax.errors import UserError
from cxr_jax.models import pretrained, torch_io, unet
from cxr_jax.models.resnet import ResNet
from cxr_jax.models.resnet_generator import ResnetGenerator
from cxr_jax.models.unet import UNet

DATA = pathlib.Path(__file__).resolve().parent / "data"
ATOL = 5e-5


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def _params(module) -> dict[str, np.ndarray]:
  return {k: np.asarray(v.get_value()) for k, v in torch_io._variables(module, ".")}


def _randomize(module, seed: int):
  """Random values for every variable (batch statistics too), so that round trips test them."""
  rng = np.random.default_rng(seed)
  for key, var in torch_io._variables(module, "."):
    shape = var.shape
    value = (rng.uniform(0.5, 1.5, shape) if key.endswith(".var")
             else 0.1 * rng.standard_normal(shape))
    var.set_value(jnp.asarray(value, var.dtype))
  return module


# --------------------------------------------------------------------------- stored fixtures


@pytest.mark.parametrize("name,image_size,arch,channels,norm", [
    ("unet64_batch_1ch", 64, "unet", 1, "batch"),
    ("resnet2_instance_3ch", 32, "resnet", 3, "instance"),
])
def test_stored_reference_outputs(name, image_size, arch, channels, norm):
  module, info = torch_io.import_reference_generator(DATA / f"{name}.safetensors",
                                                      image_size=image_size)
  assert (info.architecture, info.in_channels, info.out_channels, info.norm) == (
      arch, channels, channels, norm)
  assert info.name == ("unet_64" if arch == "unet" else "resnet_2blocks")
  io = np.load(DATA / f"{name}_io.npz")
  y = module(jnp.asarray(_nhwc(io["x"])), train=False)
  np.testing.assert_allclose(np.asarray(y), _nhwc(io["y"]), atol=ATOL, rtol=0)
  assert np.abs(_nhwc(io["y"])).mean() > 0.05  # the fixture is not trivially flat


def test_data_parallel_prefix_and_old_instance_norm_stats(tmp_path):
  """`module.` of DataParallel is stripped; InstanceNorm running stats of old checkpoints are
  ignored (instance norm normalises with each image's statistics in eval mode too)."""
  sd = load_file(str(DATA / "resnet2_instance_3ch.safetensors"))
  old = {f"module.{k}": v for k, v in sd.items()}
  for norm_key in ("model.2", "model.10.conv_block.2", "model.19"):
    old[f"module.{norm_key}.running_mean"] = np.full(4, 7.0, np.float32)
    old[f"module.{norm_key}.running_var"] = np.full(4, 9.0, np.float32)
  save_file(old, str(tmp_path / "old.safetensors"))
  module, info = torch_io.import_reference_generator(tmp_path / "old.safetensors",
                                                      image_size=32, architecture="resnet",
                                                      channels=3, norm="instance")
  assert len(info.ignored) == 6 and info.norm == "instance"
  io = np.load(DATA / "resnet2_instance_3ch_io.npz")
  y = module(jnp.asarray(_nhwc(io["x"])), train=False)
  np.testing.assert_allclose(np.asarray(y), _nhwc(io["y"]), atol=ATOL, rtol=0)


def _write(tmp_path, sd, name="g.safetensors"):
  save_file(sd, str(tmp_path / name))
  return tmp_path / name


def test_import_errors_name_file_and_keys(tmp_path):
  sd = load_file(str(DATA / "unet64_batch_1ch.safetensors"))
  key = "model.model.1.model.3.model.1.weight"
  missing = {k: v for k, v in sd.items() if k != key}
  with pytest.raises(UserError, match=rf"g\.safetensors.*1 missing: '{re.escape(key)}'"):
    torch_io.import_reference_generator(_write(tmp_path, missing), image_size=64)
  extra = dict(sd, **{"model.model.9.weight": np.zeros(3, np.float32)})
  with pytest.raises(UserError, match=r"1 unexpected: 'model\.model\.9\.weight' \(3,\)"):
    torch_io.import_reference_generator(_write(tmp_path, extra), image_size=64)
  bad = dict(sd, **{key: np.zeros((8, 4, 3, 3), np.float32)})
  with pytest.raises(UserError, match=r"mis-shaped: .*\(8, 4, 3, 3\) \(expected \(8, 4, 4, 4\)\)"):
    torch_io.import_reference_generator(_write(tmp_path, bad), image_size=64)
  with pytest.raises(UserError, match="unet_64.*image size must be 64"):
    torch_io.import_reference_generator(DATA / "unet64_batch_1ch.safetensors", image_size=256)
  with pytest.raises(UserError, match="holds a unet generator, not the resnet"):
    torch_io.import_reference_generator(DATA / "unet64_batch_1ch.safetensors", image_size=64,
                                        architecture="resnet")
  with pytest.raises(UserError, match="batch norm.*not the instance norm"):
    torch_io.import_reference_generator(DATA / "unet64_batch_1ch.safetensors", image_size=64,
                                        norm="instance")
  with pytest.raises(UserError, match="reads 1 and writes 1 channels, not the 3"):
    torch_io.import_reference_generator(DATA / "unet64_batch_1ch.safetensors", image_size=64,
                                        channels=3)
  classifier = {"conv1.weight": np.zeros((8, 3, 7, 7), np.float32)}
  with pytest.raises(UserError, match="not a pytorch-CycleGAN-and-pix2pix generator"):
    torch_io.import_reference_generator(_write(tmp_path, classifier, "c.safetensors"),
                                        image_size=64)
  with pytest.raises(UserError, match="no such generator file"):
    torch_io.import_reference_generator(tmp_path / "absent.pth", image_size=64)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind,norm,channels,dropout", [
    ("unet", "batch", 1, True), ("unet", "instance", 3, False),
    ("resnet", "instance", 1, False), ("resnet", "batch", 3, True),
])
def test_generator_round_trip(tmp_path, kind, norm, channels, dropout):
  rngs = nnx.Rngs(1)
  if kind == "unet":
    ours = UNet(image_size=32, in_channels=channels, out_channels=channels, ngf=2, norm=norm,
                use_dropout=dropout, rngs=rngs)
  else:
    ours = ResnetGenerator(in_channels=channels, out_channels=channels, ngf=2, n_blocks=2,
                           norm=norm, use_dropout=dropout, rngs=rngs)
  _randomize(ours, 3)
  path = torch_io.export_reference_generator(ours, tmp_path / "netG.safetensors")
  back, info = torch_io.import_reference_generator(path, image_size=32, use_dropout=dropout)
  assert (info.norm, info.use_dropout, info.in_channels) == (norm, dropout, channels)
  a, b = _params(ours), _params(back)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, channels), minval=-1, maxval=1)
  np.testing.assert_array_equal(np.asarray(ours(x, train=False)),
                                np.asarray(back(x, train=False)))
  sd = load_file(str(path))
  first = "model.model.0.weight" if kind == "unet" else "model.1.weight"
  assert sd[first].shape[:2] == (2, channels)  # torch OIHW


def test_reference_keys_cover_the_unet():
  """Every variable of the U-Net has one reference key, and the keys are distinct."""
  for norm in ("batch", "instance"):
    module = UNet(image_size=64, ngf=2, norm=norm, rngs=nnx.Rngs(0))
    keys = unet.reference_keys(6, norm)
    assert set(keys) == set(_params(module))
    assert len(set(keys.values())) == len(keys)
  assert unet.reference_keys(8)["levels.7.up_norm.mean"] == (
      "model.model.1" + ".model.3" * 6 + ".model.4.running_mean")


def test_torchvision_resnet_export_reads_back(tmp_path):
  model = ResNet(num_classes=3, stage_sizes=(1, 1, 1, 1), width=8, rngs=nnx.Rngs(0))
  _randomize(model, 5)
  path = torch_io.export_torchvision_resnet(model, tmp_path / "classifier.safetensors")
  sd = load_file(str(path))
  assert sd["conv1.weight"].shape == (8, 3, 7, 7) and sd["fc.weight"].shape == (3, 256)
  assert "layer1.0.downsample.1.running_var" in sd and "bn1.running_mean" in sd
  weights = pretrained.load_imagenet_resnet50(path)
  assert weights.num_classes == 3 and weights.stage_sizes == (1, 1, 1, 1)
  back = pretrained.apply_pretrained(
      ResNet(num_classes=3, stage_sizes=(1, 1, 1, 1), width=8, rngs=nnx.Rngs(9)), weights,
      load_head=True)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  np.testing.assert_array_equal(np.asarray(model(x, train=False)),
                                np.asarray(back(x, train=False)))
  gray = ResNet(num_classes=2, in_channels=1, stage_sizes=(1,), width=4, rngs=nnx.Rngs(0))
  sd = load_file(str(torch_io.export_torchvision_resnet(gray, tmp_path / "g.safetensors")))
  np.testing.assert_array_equal(sd["conv1.weight"],
                                np.asarray(gray.stem.conv.kernel.get_value()).transpose(3, 2, 0, 1))
  assert sd["conv1.weight"].shape == (4, 1, 7, 7)
  with pytest.raises(UserError, match=r"classifier\.pth: exported weights are written as "):
    torch_io.export_torchvision_resnet(gray, tmp_path / "classifier.pth")
  with pytest.raises(UserError, match="variant 'v1.5'"):
    torch_io.export_torchvision_resnet(
        ResNet(num_classes=3, stage_sizes=(1,), width=4, variant="v1", rngs=nnx.Rngs(0)),
        tmp_path / "k.safetensors")


# --------------------------------------------------------------------------- live torch


def _reference_module():
  spec = importlib.util.spec_from_file_location("make_reference_generators",
                                                DATA / "make_reference_generators.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("kind,norm,channels,dropout", [
    ("unet", "batch", 1, True), ("unet", "instance", 3, False),
    ("resnet", "instance", 1, False), ("resnet", "batch", 3, True),
])
def test_parity_with_torch_forward(tmp_path, kind, norm, channels, dropout):
  torch = pytest.importorskip("torch")
  ref = _reference_module()
  if kind == "unet":
    net = ref.UnetGenerator(channels, channels, 6, ngf=4, norm=norm, use_dropout=dropout)
    size = 64
  else:
    net = ref.ResnetGenerator(channels, channels, ngf=4, norm=norm, use_dropout=dropout,
                              n_blocks=2)
    size = 32
  ref.randomize(net, seed=7)
  torch.save(net.state_dict(), tmp_path / "latest_net_G.pth")
  module, info = torch_io.import_reference_generator(tmp_path / "latest_net_G.pth",
                                                      image_size=size, use_dropout=dropout)
  assert (info.architecture, info.norm, info.ngf) == (kind, norm, 4)
  x = np.random.default_rng(0).uniform(-1, 1, (2, channels, size, size)).astype(np.float32)
  y = module(jnp.asarray(_nhwc(x)), train=False)
  np.testing.assert_allclose(np.asarray(y), _nhwc(ref.forward(net, x)), atol=ATOL, rtol=0)
  # and back: the reference loads our export strictly and computes the same
  from safetensors.torch import load_file as torch_load  # pylint: disable=import-outside-toplevel
  path = torch_io.export_reference_generator(module, tmp_path / "ours.safetensors")
  net2 = (ref.UnetGenerator(channels, channels, 6, ngf=4, norm=norm, use_dropout=dropout)
          if kind == "unet" else ref.ResnetGenerator(channels, channels, ngf=4, norm=norm,
                                                     use_dropout=dropout, n_blocks=2))
  net2.load_state_dict(torch_load(str(path)), strict=True)
  np.testing.assert_allclose(ref.forward(net2, x), ref.forward(net, x), atol=1e-6, rtol=0)
