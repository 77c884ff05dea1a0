"""ImageNet weight import: logits parity with Keras 3 (JAX backend) on a legacy-layout .h5, the
torchvision key mapping through .safetensors, architectures inferred from small random files,
the gray-input folding, and the user errors.

ResNets are built abstractly (`nnx.eval_shape`) and filled by `apply_pretrained`, which sets
every variable: no 15 s random init on a small CPU.

Other tests import the writers of small weight files from here:
`from test_pretrained import write_torchvision_safetensors, write_keras_h5`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is first imported

import h5py  # noqa: E402  pylint: disable=wrong-import-position
import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import pytest  # noqa: E402  pylint: disable=wrong-import-position
from flax import nnx  # noqa: E402  pylint: disable=wrong-import-position
from safetensors.numpy import save_file  # noqa: E402  pylint: disable=wrong-import-position

from cxr_jax.errors import (  # noqa: E402  pylint: disable=wrong-import-position
    ConfigError, UserError)
from cxr_jax.models import pretrained  # noqa: E402  pylint: disable=wrong-import-position
from cxr_jax.models.pretrained import (  # noqa: E402  pylint: disable=wrong-import-position
    CAFFE, TORCHVISION, apply_pretrained, load_imagenet_resnet, load_imagenet_resnet50,
    normalize, preprocess_from_json, preprocess_to_json)
from cxr_jax.models.resnet import (  # noqa: E402  pylint: disable=wrong-import-position
    RESNET50_STAGES, ResNet)

# Keras 3.15 on numpy 2 warns about its own __array__ on every weight it converts.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = 64  # smallest input keras.applications.ResNet50 accepts is 32; 64 px -> 2x2 features
TINY = dict(stage_sizes=(1, 1, 1, 1), width=8)  # the small files' default architecture


_ABSTRACT: dict = {}


def abstract_resnet(**kwargs) -> ResNet:
  """A fresh ResNet (default: ResNet-50) whose variables are shapes only (tracing a ResNet-50
  costs ~1.5 s: memoised)."""
  key = tuple(sorted(kwargs.items()))
  if key not in _ABSTRACT:
    _ABSTRACT[key] = nnx.split(nnx.eval_shape(lambda: ResNet(rngs=nnx.Rngs(0), **kwargs)))
  return nnx.merge(*_ABSTRACT[key], copy=True)


def n_params(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@nnx.jit
def features_and_logits(model, x):
  fmap = model.features(x, train=False)
  return fmap, model.head(fmap)


@nnx.jit
def stem(unit, x):
  return unit(x, train=False)


# ------------------------------------------------------------------------- small weight files
# Random weights of any bottleneck ResNet, written with names and shapes spelled out here
# (independently of the package's mapping), for the transfer-learning path without a 100 MB file.


def _bottleneck_convs(stage_sizes, width):
  """(stage, block, unit, k, cin, cout) of every conv, in keras.applications' `model.layers`
  order: the stem, then per block '1', '2', ('0': a stage's first block's projection), '3'."""
  yield -1, -1, "stem", 7, 3, width
  cin = width
  for s, n in enumerate(stage_sizes):
    w = width * 2**s
    for b in range(n):
      yield s, b, "1", 1, cin, w
      yield s, b, "2", 3, w, w
      if b == 0:
        yield s, b, "0", 1, cin, 4 * w
      yield s, b, "3", 1, w, 4 * w
      cin = 4 * w


def _random_conv_bn(rng, k, cin, cout):
  """He-normal HWIO kernel, conv bias, and BN scale, bias, mean, var with some spread."""
  f32 = functools.partial(np.asarray, dtype=np.float32)
  return (f32(rng.normal(0, (2.0 / (k * k * cin))**0.5, (k, k, cin, cout))),
          f32(rng.normal(0, 0.1, cout)), f32(rng.uniform(0.5, 1.5, cout)),
          f32(rng.normal(0, 0.2, cout)), f32(rng.normal(0, 0.2, cout)),
          f32(rng.uniform(0.5, 2.0, cout)))


def _random_head(rng, stage_sizes, width, num_classes):
  features = 4 * width * 2**(len(stage_sizes) - 1)
  return (rng.normal(0, 0.02, (features, num_classes)).astype(np.float32),
          rng.normal(0, 0.02, num_classes).astype(np.float32))


def torchvision_state_dict(*, stage_sizes=RESNET50_STAGES, width=64, num_classes=1000,
                           seed=0) -> dict:
  """A torchvision/timm ResNet state dict with random values: conv1, bn1, layerX.Y.convZ / bnZ /
  downsample.0/1, fc, in torch layouts (OIHW, (out, in)); `num_classes=0` leaves out fc."""
  rng = np.random.default_rng(seed)
  sd = {}
  for s, b, unit, k, cin, cout in _bottleneck_convs(stage_sizes, width):
    p = f"layer{s + 1}.{b}"
    conv, bn = {"stem": ("conv1", "bn1"), "0": (f"{p}.downsample.0", f"{p}.downsample.1")}.get(
        unit, (f"{p}.conv{unit}", f"{p}.bn{unit}"))
    kernel, _, scale, bias, mean, var = _random_conv_bn(rng, k, cin, cout)
    sd[f"{conv}.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
    sd.update({f"{bn}.weight": scale, f"{bn}.bias": bias, f"{bn}.running_mean": mean,
               f"{bn}.running_var": var, f"{bn}.num_batches_tracked": np.array(7, np.int64)})
  if num_classes:
    kernel, bias = _random_head(rng, stage_sizes, width, num_classes)
    sd["fc.weight"], sd["fc.bias"] = np.ascontiguousarray(kernel.T), bias
  return sd


def write_torchvision_safetensors(path, *, stage_sizes=(1, 1, 1, 1), width=8, num_classes=1000,
                                  seed=0) -> dict:
  """Writes a random torchvision-layout ResNet `.safetensors` (a few MB at most for the
  defaults); returns the state dict. `load_imagenet_resnet50` reads it as `variant='v1.5'`."""
  sd = torchvision_state_dict(stage_sizes=tuple(stage_sizes), width=width,
                              num_classes=num_classes, seed=seed)
  save_file(sd, str(path))
  return sd


def keras_layers(*, stage_sizes=(1, 1, 1, 1), width=8, num_classes=1000,
                 seed=0) -> dict[str, dict[str, np.ndarray]]:
  """Random keras.applications ResNet weights, {layer name: {weight name: array}} in
  `model.layers` order: 'conv2_block1_1_conv' {kernel, bias}, '..._bn' {gamma, beta,
  moving_mean, moving_variance}, 'predictions' (left out for `num_classes=0`)."""
  rng = np.random.default_rng(seed)
  layers = {}
  for s, b, unit, k, cin, cout in _bottleneck_convs(stage_sizes, width):
    name = "conv1" if unit == "stem" else f"conv{s + 2}_block{b + 1}_{unit}"
    kernel, conv_bias, gamma, beta, mean, var = _random_conv_bn(rng, k, cin, cout)
    layers[f"{name}_conv"] = {"kernel": kernel, "bias": conv_bias}
    layers[f"{name}_bn"] = {"gamma": gamma, "beta": beta, "moving_mean": mean,
                            "moving_variance": var}
  if num_classes:
    kernel, bias = _random_head(rng, stage_sizes, width, num_classes)
    layers["predictions"] = {"kernel": kernel, "bias": bias}
  return layers


def _old_keras_name(layer: str) -> str:
  """keras-applications<=1.0.4 names: conv1, bn_conv1, res2a_branch2a, bn2a_branch1, fc1000."""
  fixed = {"conv1_conv": "conv1", "conv1_bn": "bn_conv1", "predictions": "fc1000"}
  if layer in fixed:
    return fixed[layer]
  stage, block, unit, kind = re.fullmatch(r"conv(\d)_block(\d+)_(\d)_(conv|bn)", layer).groups()
  branch = {"0": "1", "1": "2a", "2": "2b", "3": "2c"}[unit]
  return f"{'res' if kind == 'conv' else 'bn'}{stage}{chr(96 + int(block))}_branch{branch}"


def _write_keras2_layout(path, layers: dict[str, list[tuple[str, np.ndarray]]]) -> None:
  """The Keras 2 `save_weights` layout of resnet50_weights_tf_dim_ordering_tf_kernels.h5: root
  attrs layer_names/backend/keras_version, one group per layer whose attr weight_names lists
  '<layer>/<weight>:0' (trainable first, then moving statistics) naming its datasets."""
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [name.encode() for name in layers]
    f.attrs["backend"] = b"tensorflow"
    f.attrs["keras_version"] = b"2.2.4"
    for layer, weights in layers.items():
      group = f.create_group(layer)
      names = [f"{layer}/{w}:0" for w, _ in weights]
      group.attrs["weight_names"] = [n.encode() for n in names]
      for n, (_, value) in zip(names, weights):
        group.create_dataset(n, data=value)


def write_keras_h5(path, *, stage_sizes=(1, 1, 1, 1), width=8, num_classes=1000, seed=0,
                   layout="keras2") -> dict[str, dict[str, np.ndarray]]:
  """Writes random keras.applications-style ResNet weights; returns `keras_layers(...)`.

  layout: 'keras2' (resnet50_weights_tf_dim_ordering_tf_kernels.h5), 'keras1' (the same with
  the old res2a_branch2a names), 'keras3' (a `.weights.h5`: layers/conv2d_<i>/vars/<j> numbered
  in `model.layers` order, with the layer names recent Keras 3 keep in attrs) or
  'keras3-unnamed' (without those attrs, as older Keras 3 wrote). Read as `variant='v1'`.
  """
  layers = keras_layers(stage_sizes=tuple(stage_sizes), width=width, num_classes=num_classes,
                        seed=seed)
  if layout in ("keras2", "keras1"):
    rename = _old_keras_name if layout == "keras1" else (lambda n: n)
    _write_keras2_layout(path, {rename(n): list(w.items()) for n, w in layers.items()})
  elif layout in ("keras3", "keras3-unnamed"):
    with h5py.File(path, "w") as f:
      counts: dict[str, int] = {}
      for name, weights in layers.items():
        cls = ("dense" if name == "predictions" else
               "batch_normalization" if name.endswith("_bn") else "conv2d")
        i = counts[cls] = counts.get(cls, -1) + 1
        group = f.create_group(f"layers/{cls}{f'_{i}' if i else ''}/vars")
        if layout == "keras3":
          group.attrs["name"] = name
        for j, value in enumerate(weights.values()):
          group.create_dataset(str(j), data=value)
      f.create_group("layers/input_layer/vars")  # weightless layers have empty groups
  else:
    raise ValueError(f"write_keras_h5: unknown layout {layout!r}")
  return layers


# ------------------------------------------------------------------------- Keras reference


def write_keras2_h5(model, path) -> None:
  """A Keras model's weights in the Keras 2 layout of the official ResNet50 file."""
  _write_keras2_layout(path, {
      layer.name: [(w.name, np.asarray(w.numpy()))
                   for w in layer.trainable_weights + layer.non_trainable_weights]
      for layer in model.layers})


@pytest.fixture(scope="module")
def keras_ref(tmp_path_factory):
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "jax":
    pytest.skip("keras was imported with another backend")
  with pytest.MonkeyPatch.context() as mp:
    # All weights are overwritten below: skip Keras' per-shape random init (slow CPU compiles).
    mp.setattr(keras.initializers.GlorotUniform, "__call__",
               lambda self, shape, dtype=None: keras.ops.zeros(shape, dtype=dtype))
    model = keras.applications.ResNet50(weights=None, classes=3, input_shape=(SIZE, SIZE, 3))
  rng = np.random.default_rng(0)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      c = layer.gamma.shape[0]
      layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c), rng.normal(0, 0.2, c),
                         rng.uniform(0.5, 2.0, c)])
    elif layer.weights:
      k = layer.weights[0].shape
      layer.set_weights([rng.normal(0, (2.0 / np.prod(k[:-1]))**0.5, k),
                         rng.normal(0, 0.1, k[-1:])])
  x = rng.uniform(-2.0, 2.0, (2, SIZE, SIZE, 3)).astype(np.float32)
  probe = keras.Model(model.inputs, [model.get_layer("conv5_block3_out").output,
                                     model.get_layer("avg_pool").output,
                                     model.get_layer("predictions").output])
  fmap, pooled, _ = probe.predict(x, verbose=0)  # one jitted call
  kernel, bias = model.get_layer("predictions").get_weights()
  logits = pooled.astype(np.float64) @ kernel + bias  # before the softmax
  tmp = tmp_path_factory.mktemp("keras")
  legacy = tmp / "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
  write_keras2_h5(model, legacy)
  keras3 = tmp / "resnet50.weights.h5"
  model.save_weights(keras3)
  return dict(keras=keras, model=model, x=x, fmap=fmap, pooled=pooled, logits=logits,
              legacy=legacy, keras3=keras3)


def test_keras_v1_parity(keras_ref):
  w = load_imagenet_resnet50(keras_ref["legacy"])
  assert (w.family, w.variant, w.preprocess, w.num_classes) == ("keras", "v1", CAFFE, 3)
  assert (w.stage_sizes, w.width) == (RESNET50_STAGES, 64)
  model = abstract_resnet(num_classes=3, variant="v1")
  assert n_params(model) == 25_583_592 - 2048 * 1000 - 1000 + 2048 * 3 + 3  # Keras' count
  apply_pretrained(model, w, load_head=True)
  fmap, logits = features_and_logits(model, jnp.asarray(keras_ref["x"]))
  ref = keras_ref["fmap"]
  assert fmap.shape == ref.shape == (2, 2, 2, 2048)
  np.testing.assert_allclose(fmap, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  np.testing.assert_allclose(jnp.mean(fmap, axis=(1, 2)), keras_ref["pooled"], rtol=1e-4,
                             atol=1e-4 * np.abs(keras_ref["pooled"]).max())
  want = keras_ref["logits"]
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_keras_formats_give_the_same_weights(keras_ref, tmp_path):
  legacy = load_imagenet_resnet50(keras_ref["legacy"]).params
  # Keras 3 `.weights.h5` names layers by class and creation order, not by layer name.
  new = load_imagenet_resnet50(keras_ref["keras3"]).params
  assert sorted(new) == sorted(legacy)
  for k in legacy:
    np.testing.assert_array_equal(new[k], legacy[k], err_msg=k)
  # Keras' own legacy writer (weight names without ':0'), as `model.save('x.h5')` would use.
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=import-outside-toplevel
  path = tmp_path / "own.h5"
  with h5py.File(path, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, keras_ref["model"])
  own = load_imagenet_resnet50(path).params
  for k in legacy:
    np.testing.assert_array_equal(own[k], legacy[k], err_msg=k)


def test_keras_caffe_normalisation(keras_ref):
  rgb = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  preprocess_input = keras_ref["keras"].applications.resnet.preprocess_input
  np.testing.assert_allclose(normalize(rgb, CAFFE, 3), preprocess_input(rgb.astype(np.float32)),
                             rtol=1e-6, atol=1e-4)


# ------------------------------------------------------------------------- torchvision layout


@pytest.fixture(scope="module")
def torch_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("tv") / "resnet50.safetensors"
  sd = write_torchvision_safetensors(path, stage_sizes=RESNET50_STAGES, width=64)
  return path, sd


def test_torchvision_safetensors_round_trip(torch_file):
  path, sd = torch_file
  w = load_imagenet_resnet50(path)
  assert (w.family, w.variant, w.preprocess, w.num_classes) == ("torchvision", "v1.5",
                                                                TORCHVISION, 1000)
  assert (w.stage_sizes, w.width) == (RESNET50_STAGES, 64)
  model = abstract_resnet(num_classes=3)
  head = model.fc.kernel.get_value()
  apply_pretrained(model, w)
  assert model.fc.kernel.get_value() is head  # the new head is left as initialised
  np.testing.assert_array_equal(model.stem.conv.kernel[...],
                                sd["conv1.weight"].transpose(2, 3, 1, 0))
  block = model.stages[2][0]
  np.testing.assert_array_equal(block.c2.conv.kernel[...],
                                sd["layer3.0.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(block.proj.bn.var[...], sd["layer3.0.downsample.1.running_var"])
  np.testing.assert_array_equal(model.stages[3][2].c3.bn.scale[...], sd["layer4.2.bn3.weight"])
  np.testing.assert_array_equal(model.stages[0][1].c1.bn.mean[...],
                                sd["layer1.1.bn1.running_mean"])
  np.testing.assert_array_equal(w.params["fc/kernel"], sd["fc.weight"].T)
  # Every tensor of the file was used exactly once: the ours -> torch map is a bijection.
  assert len(w.params) == len([k for k in sd if not k.endswith("num_batches_tracked")])


def torchvision_forward(sd, x_nchw, stage_sizes=RESNET50_STAGES):
  """torchvision.models.resnet50 (any bottleneck depth) in eval mode, transcribed with lax on its
  own state dict (NCHW, OIHW): an independent reference for v1.5 where torch is not installed."""
  def conv(x, w, stride, pad):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"))

  def bn(x, p):
    c = lambda n: sd[f"{p}.{n}"][None, :, None, None]  # noqa: E731
    return (x - c("running_mean")) / jnp.sqrt(c("running_var") + 1e-5) * c("weight") + c("bias")

  x = jax.nn.relu(bn(conv(x_nchw, sd["conv1.weight"], 2, 3), "bn1"))
  x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2),
                            ((0, 0), (0, 0), (1, 1), (1, 1)))
  for layer, blocks in enumerate(stage_sizes, start=1):
    for b in range(blocks):
      p, stride = f"layer{layer}.{b}", 2 if b == 0 and layer > 1 else 1
      out = jax.nn.relu(bn(conv(x, sd[f"{p}.conv1.weight"], 1, 0), f"{p}.bn1"))
      out = jax.nn.relu(bn(conv(out, sd[f"{p}.conv2.weight"], stride, 1), f"{p}.bn2"))
      out = bn(conv(out, sd[f"{p}.conv3.weight"], 1, 0), f"{p}.bn3")
      if b == 0:
        x = bn(conv(x, sd[f"{p}.downsample.0.weight"], stride, 0), f"{p}.downsample.1")
      x = jax.nn.relu(out + x)
  return x.mean(axis=(2, 3)) @ sd["fc.weight"].T + sd["fc.bias"]


def test_torchvision_v15_parity(torch_file):
  path, sd = torch_file
  x = np.random.default_rng(2).normal(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  tensors = {k: jnp.asarray(v) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  want = np.asarray(jax.jit(torchvision_forward)(tensors, jnp.asarray(x.transpose(0, 3, 1, 2))))
  model = abstract_resnet(num_classes=1000)
  apply_pretrained(model, load_imagenet_resnet50(path), load_head=True)
  _, logits = features_and_logits(model, jnp.asarray(x))
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_small_torchvision_file_parity(tmp_path):
  """Another depth and width, inferred from the file, against the same reference forward."""
  sizes, width = (1, 2, 1, 1), 4
  path = tmp_path / "tiny.safetensors"
  sd = write_torchvision_safetensors(path, stage_sizes=sizes, width=width, num_classes=5, seed=1)
  w = load_imagenet_resnet(path)
  assert (w.family, w.variant, w.stage_sizes, w.width, w.num_classes) == (
      "torchvision", "v1.5", sizes, width, 5)
  model = abstract_resnet(num_classes=5, stage_sizes=w.stage_sizes, width=w.width)
  apply_pretrained(model, w, load_head=True)
  x = np.random.default_rng(2).normal(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  tensors = {k: jnp.asarray(v) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  forward = jax.jit(functools.partial(torchvision_forward, stage_sizes=sizes))
  want = np.asarray(forward(tensors, jnp.asarray(x.transpose(0, 3, 1, 2))))
  _, logits = features_and_logits(model, jnp.asarray(x))
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_small_keras_files_in_every_layout(tmp_path):
  sizes, width = (2, 1, 3, 1), 4  # a stage's later blocks, also in the unnamed Keras 3 layout
  params = {}
  for layout in ("keras2", "keras1", "keras3", "keras3-unnamed"):
    path = tmp_path / f"{layout}.h5"
    layers = write_keras_h5(path, stage_sizes=sizes, width=width, num_classes=3, layout=layout)
    w = load_imagenet_resnet50(path)
    assert (w.family, w.variant, w.preprocess, w.stage_sizes, w.width, w.num_classes) == (
        "keras", "v1", CAFFE, sizes, width, 3), layout
    params[layout] = w.params
  ref = params["keras2"]
  assert len(ref) == sum(len(v) for v in layers.values())  # every tensor used exactly once
  for layout, got in params.items():
    assert sorted(got) == sorted(ref), layout
    for k in ref:
      np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{layout} {k}")
  np.testing.assert_array_equal(ref["stages/2/2/c2/conv/kernel"],
                                layers["conv4_block3_2_conv"]["kernel"])
  np.testing.assert_array_equal(ref["stages/0/1/c3/bn/bias"], layers["conv2_block2_3_bn"]["beta"])
  np.testing.assert_array_equal(ref["stages/1/0/proj/bn/var"],
                                layers["conv3_block1_0_bn"]["moving_variance"])
  np.testing.assert_array_equal(ref["fc/kernel"], layers["predictions"]["kernel"])
  model = abstract_resnet(num_classes=3, variant="v1", stage_sizes=sizes, width=width)
  apply_pretrained(model, w, load_head=True)
  np.testing.assert_array_equal(model.stages[2][2].c1.conv.bias[...],
                                layers["conv4_block3_1_conv"]["bias"])


def test_small_files_default_architecture(tmp_path):
  """What other tests and the smoke run use: ResNet-14, width 8, a 1000-class head."""
  for name, write in (("tiny.safetensors", write_torchvision_safetensors),
                      ("tiny.h5", write_keras_h5)):
    write(tmp_path / name)
    w = load_imagenet_resnet50(tmp_path / name)
    assert (w.stage_sizes, w.width, w.num_classes) == (TINY["stage_sizes"], TINY["width"], 1000)
    assert os.path.getsize(tmp_path / name) < 2_000_000
    model = abstract_resnet(num_classes=3, in_channels=1, variant=w.variant,
                            stage_sizes=w.stage_sizes, width=w.width)
    apply_pretrained(model, w, in_channels=1)
    assert model.stem.conv.kernel.shape == (7, 7, 1, TINY["width"])


def test_torchvision_parity_with_torch(torch_file):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  path, sd = torch_file
  ref = torchvision.models.resnet50(weights=None)
  ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
  ref.eval()
  x = np.random.default_rng(2).normal(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  model = abstract_resnet(num_classes=1000)
  apply_pretrained(model, load_imagenet_resnet50(path), load_head=True)
  _, logits = features_and_logits(model, jnp.asarray(x))
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ------------------------------------------------------------------------- gray input


def _stem_outputs(weights, gray_u8):
  rgb_model = abstract_resnet(num_classes=3, variant=weights.variant)
  gray_model = abstract_resnet(num_classes=3, variant=weights.variant, in_channels=1)
  apply_pretrained(rgb_model, weights)
  apply_pretrained(gray_model, weights, in_channels=1)
  replicated = normalize(np.repeat(gray_u8, 3, axis=-1), weights.preprocess, 3)
  np.testing.assert_allclose(replicated, normalize(gray_u8, weights.preprocess, 3), rtol=1e-6)
  want = stem(rgb_model.stem, replicated)
  got = stem(gray_model.stem, normalize(gray_u8, weights.preprocess, 1))
  return np.asarray(want), np.asarray(got)


@pytest.mark.parametrize("family", ["torchvision", "keras"])
def test_gray_input_equals_replicated_rgb(family, torch_file, keras_ref):
  weights = load_imagenet_resnet50(torch_file[0] if family == "torchvision"
                                   else keras_ref["legacy"])
  gray = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
  want, got = _stem_outputs(weights, gray)
  scale = np.abs(want).max()
  # Exact wherever the 7x7/s2 window is inside the image (outputs 2..14 of 16); the zero-padded
  # border differs only by the colour-opponent part of the filters (see Preprocess.gray_mean).
  np.testing.assert_allclose(got[:, 2:15, 2:15], want[:, 2:15, 2:15], rtol=1e-5,
                             atol=1e-5 * scale)
  # Achromatic first-layer filters (R, G, B weighed equally): exact everywhere.
  kernel = np.repeat(weights.params["stem/conv/kernel"].mean(axis=2, keepdims=True), 3, axis=2)
  flat = dataclasses.replace(weights, params={**weights.params, "stem/conv/kernel": kernel})
  want, got = _stem_outputs(flat, gray)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_normalize_conventions():
  u8 = np.random.default_rng(4).integers(0, 256, (1, 4, 4, 3), dtype=np.uint8)
  f01 = u8.astype(np.float32) / 255.0
  want = (f01 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(normalize(u8, TORCHVISION, 3), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(normalize(f01, TORCHVISION, 3), want, rtol=1e-5, atol=1e-5)
  assert normalize(u8[..., :1], CAFFE, 1).shape == (1, 4, 4, 1)
  with pytest.raises(ValueError, match="gray"):
    normalize(u8, TORCHVISION, 1)


def test_preprocess_json_round_trip():
  for p in (TORCHVISION, CAFFE):
    back = preprocess_from_json(json.loads(json.dumps(preprocess_to_json(p))))
    assert back == p and isinstance(back.mean, tuple) and isinstance(back.std, tuple)
    assert back.gray_mean == p.gray_mean
  bad = {**preprocess_to_json(CAFFE), "std": [1.0, 1.0]}
  for d in ({"name": "caffe"}, bad, None):
    with pytest.raises(UserError, match="invalid input normalisation"):
      preprocess_from_json(d)


# ------------------------------------------------------------------------- errors


def test_missing_and_unreadable_files(tmp_path):
  with pytest.raises(UserError, match="nope.safetensors: no such file"):
    load_imagenet_resnet50(tmp_path / "nope.safetensors")
  for name in ("junk.safetensors", "junk.h5"):
    (tmp_path / name).write_bytes(b"\x00not a weight file" * 10)
    with pytest.raises(UserError, match=f"{name}: cannot read"):
      load_imagenet_resnet50(tmp_path / name)
  (tmp_path / "w.npz").write_bytes(b"")
  with pytest.raises(UserError, match="w.npz: unsupported"):
    load_imagenet_resnet50(tmp_path / "w.npz")


def test_pth_needs_torch(tmp_path):
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    pytest.skip("torch is installed")
  except ImportError:
    pass
  (tmp_path / "r50.pth").write_bytes(b"x")
  with pytest.raises(UserError, match=r"r50.pth: .*needs PyTorch.*safetensors"):
    load_imagenet_resnet50(tmp_path / "r50.pth")


def _basic_block_state_dict(width: int = 8) -> dict:
  """A torchvision resnet18 layout (two 3x3 convs per block, no conv3), narrowed to `width`."""
  sd = {"conv1.weight": np.zeros((width, 3, 7, 7), np.float32)}
  bn = lambda p, c: {f"{p}.{n}": np.zeros(c, np.float32)  # noqa: E731
                     for n in ("weight", "bias", "running_mean", "running_var")}
  sd.update(bn("bn1", width))
  cin = width
  for s in range(4):
    c = width * 2**s
    for b in range(2):
      p = f"layer{s + 1}.{b}"
      sd[f"{p}.conv1.weight"] = np.zeros((c, cin if b == 0 else c, 3, 3), np.float32)
      sd[f"{p}.conv2.weight"] = np.zeros((c, c, 3, 3), np.float32)
      sd.update(bn(f"{p}.bn1", c))
      sd.update(bn(f"{p}.bn2", c))
      if b == 0 and s > 0:
        sd[f"{p}.downsample.0.weight"] = np.zeros((c, cin, 1, 1), np.float32)
        sd.update(bn(f"{p}.downsample.1", c))
    cin = c
  return sd


def test_other_architectures_are_refused(tmp_path):
  tiny = torchvision_state_dict(**TINY)
  cases = {
      "random.safetensors": ({"a": np.zeros(3, np.float32)}, r"'conv1.weight' is missing"),
      "resnet18.safetensors": (
          _basic_block_state_dict(),
          r"not a bottleneck ResNet \(ResNet-50/101/152 family\): the first block's "
          r"'layer1.0.conv1.weight' is a 3x3 conv and it has no 'layer1.0.conv3.weight'"),
      "wrong_shape.safetensors": (
          {**tiny, "layer3.0.conv2.weight": np.zeros((32, 32, 1, 1), np.float32)},
          r"'layer3.0.conv2.weight' has shape \(32, 32, 1, 1\), the ResNet-14 \(stage_sizes="
          r"\(1, 1, 1, 1\), width=8\) inferred from the file expects \(32, 32, 3, 3\)"),
      # One stray tensor of a 2nd block: the architecture is inferred, the rest is missing.
      "truncated.safetensors": (
          {**tiny, "layer3.1.conv1.weight": np.zeros((32, 128, 1, 1), np.float32)},
          r"ResNet-17 \(stage_sizes=\(1, 1, 2, 1\), width=8\).*'layer3.1.bn1.weight' is "
          r"missing"),
      "seresnet.safetensors": ({**tiny, "layer1.0.se.fc1.weight": np.zeros((2, 32, 1, 1))},
                               r"unexpected tensor 'layer1.0.se.fc1.weight'"),
      "no_blocks.safetensors": ({k: v for k, v in tiny.items() if k.startswith(("conv1", "bn1"))},
                                r"no residual block"),
      "head.safetensors": ({**tiny, "fc.weight": np.zeros((10, 64), np.float32)},
                           r"head 'fc.weight' has shape \(10, 64\).*256 features"),
  }
  for name, (state, message) in cases.items():
    save_file(state, str(tmp_path / name))
    with pytest.raises(UserError, match=f"{name}: .*{message}"):
      load_imagenet_resnet50(tmp_path / name)


def test_keras3_basic_blocks_are_refused(tmp_path):
  path = tmp_path / "resnet18.weights.h5"
  write_keras_h5(path, layout="keras3-unnamed")
  with h5py.File(path, "a") as f:  # the first block's 1x1 conv becomes a 3x3 one
    del f["layers/conv2d_1/vars/0"]
    f["layers/conv2d_1/vars/0"] = np.zeros((3, 3, 8, 8), np.float32)
  with pytest.raises(UserError, match=r"resnet18.weights.h5: not a bottleneck ResNet \(ResNet-"
                                      r"50/101/152 family\): conv layer 1"):
    load_imagenet_resnet50(path)


def test_apply_refuses_mismatched_models(torch_file, tmp_path):
  w = load_imagenet_resnet50(torch_file[0])
  with pytest.raises(ConfigError, match="variant='v1.5'"):
    apply_pretrained(abstract_resnet(num_classes=3, variant="v1"), w)
  tiny = abstract_resnet(num_classes=3, **TINY)
  with pytest.raises(ConfigError, match=r"the model is a ResNet-14 \(stage_sizes=\(1, 1, 1, 1\), "
                                        r"width=8\) but .*resnet50.safetensors holds a ResNet-50 "
                                        r"\(stage_sizes=\(3, 4, 6, 3\), width=64\)"):
    apply_pretrained(tiny, w)
  write_torchvision_safetensors(tmp_path / "tiny.safetensors")
  narrow = abstract_resnet(num_classes=3, stage_sizes=TINY["stage_sizes"], width=4)
  with pytest.raises(ConfigError, match=r"width=4\) but .*tiny.safetensors holds a ResNet-14 "
                                        r"\(stage_sizes=\(1, 1, 1, 1\), width=8\)"):
    apply_pretrained(narrow, load_imagenet_resnet50(tmp_path / "tiny.safetensors"))
  with pytest.raises(ConfigError, match="1000-class head"):
    apply_pretrained(abstract_resnet(num_classes=3), w, load_head=True)
  assert pretrained.TORCHVISION.gray_std == pytest.approx(0.22598, abs=1e-5)


# ------------------------------------------------------------------------- 1-channel files


def _gray_file(path, **kw) -> dict:
  """A torchvision-layout ResNet whose first conv reads one channel (a chest-X-ray ResNet)."""
  sd = torchvision_state_dict(**{**TINY, **kw})
  sd["conv1.weight"] = np.ascontiguousarray(sd["conv1.weight"].sum(axis=1, keepdims=True))
  save_file(sd, str(path))
  return sd


@pytest.mark.parametrize("preprocess", [TORCHVISION, CAFFE])
def test_one_channel_weights_replicated_to_three_give_the_same_response(tmp_path, preprocess):
  """Parity: the adapted 3-channel network on a gray image (replicated, each channel normalised
  its own way) equals the original 1-channel network on that image, border included."""
  _gray_file(tmp_path / "gray.safetensors", num_classes=5)
  w = load_imagenet_resnet(tmp_path / "gray.safetensors")
  assert (w.in_channels, w.num_classes, w.stage_sizes) == (1, 5, TINY["stage_sizes"])
  w = dataclasses.replace(w, preprocess=preprocess)
  gray = np.random.default_rng(5).integers(0, 256, (2, SIZE, SIZE, 1), dtype=np.uint8)
  one = apply_pretrained(abstract_resnet(num_classes=5, in_channels=1, **TINY), w,
                         load_head=True)
  three = apply_pretrained(abstract_resnet(num_classes=5, in_channels=3, **TINY), w,
                           load_head=True)
  assert three.stem.conv.kernel.shape == (7, 7, 3, TINY["width"])
  _, want = features_and_logits(one, normalize(gray, preprocess, 1))
  _, got = features_and_logits(three, normalize(gray, preprocess, 3))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # The original 1-channel network is the file's own: same weights back, nothing adapted.
  np.testing.assert_array_equal(one.stem.conv.kernel[...],
                                w.params["stem/conv/kernel"])


def test_three_channel_weights_summed_to_one_give_the_same_response(tmp_path):
  """Parity the other way, for the whole network: exact for first-layer filters that weigh R, G,
  B alike (elsewhere the zero padding of the 3-channel input is not gray, see
  `test_gray_input_equals_replicated_rgb`)."""
  write_torchvision_safetensors(tmp_path / "rgb.safetensors")
  w = load_imagenet_resnet(tmp_path / "rgb.safetensors")
  kernel = np.repeat(w.params["stem/conv/kernel"].mean(axis=2, keepdims=True), 3, axis=2)
  w = dataclasses.replace(w, params={**w.params, "stem/conv/kernel": kernel})
  gray = np.random.default_rng(6).integers(0, 256, (2, SIZE, SIZE, 1), dtype=np.uint8)
  three = apply_pretrained(abstract_resnet(num_classes=1000, **TINY), w, load_head=True)
  one = apply_pretrained(abstract_resnet(num_classes=1000, in_channels=1, **TINY), w,
                         load_head=True)
  _, want = features_and_logits(three, normalize(np.repeat(gray, 3, -1), TORCHVISION, 3))
  _, got = features_and_logits(one, normalize(gray, TORCHVISION, 1))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_stems_of_other_channel_counts_are_refused(tmp_path):
  sd = torchvision_state_dict(**TINY)
  sd["conv1.weight"] = np.ascontiguousarray(sd["conv1.weight"][:, :2])
  save_file(sd, str(tmp_path / "two.safetensors"))
  with pytest.raises(UserError, match=r"two.safetensors: the stem conv 'conv1.weight' has shape "
                                      r"\(8, 2, 7, 7\): 2 input channels, not 1 \(gray\) or 3"):
    load_imagenet_resnet(tmp_path / "two.safetensors")
