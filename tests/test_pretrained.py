"""ImageNet weight import: logits parity with Keras 3 (JAX backend) on a legacy-layout .h5, the
torchvision key mapping through .safetensors, the gray-input folding, and the user errors.

ResNet-50s are built abstractly (`nnx.eval_shape`) and filled by `apply_pretrained`, which sets
every variable: no 15 s random init on a small CPU.
"""

from __future__ import annotations

import dataclasses
import os

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
    CAFFE, TORCHVISION, apply_pretrained, load_imagenet_resnet50, normalize)
from cxr_jax.models.resnet import ResNet  # noqa: E402  pylint: disable=wrong-import-position

# Keras 3.15 on numpy 2 warns about its own __array__ on every weight it converts.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = 64  # smallest input keras.applications.ResNet50 accepts is 32; 64 px -> 2x2 features


_ABSTRACT: dict = {}


def abstract_resnet50(**kwargs) -> ResNet:
  """A fresh ResNet-50 whose variables are shapes only (tracing one costs ~1.5 s: memoised)."""
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


# ------------------------------------------------------------------------- Keras reference


def write_keras2_h5(model, path) -> None:
  """The Keras 2 `save_weights` layout of resnet50_weights_tf_dim_ordering_tf_kernels.h5: root
  attrs layer_names/backend/keras_version, one group per layer whose attr weight_names lists
  '<layer>/<weight>:0' (trainable first, then moving statistics) naming its datasets."""
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
    f.attrs["backend"] = b"tensorflow"
    f.attrs["keras_version"] = b"2.2.4"
    for layer in model.layers:
      group = f.create_group(layer.name)
      weights = layer.trainable_weights + layer.non_trainable_weights
      names = [f"{layer.name}/{w.name}:0" for w in weights]
      group.attrs["weight_names"] = [n.encode() for n in names]
      for n, w in zip(names, weights):
        group.create_dataset(n, data=np.asarray(w.numpy()))


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
  model = abstract_resnet50(num_classes=3, variant="v1")
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


def torchvision_state_dict(model: ResNet, num_classes: int, seed: int = 0) -> dict:
  """A torchvision resnet50 state dict with random values, keyed by walking our v1.5 model
  (conv1, bn1, layerX.Y.convZ / bnZ / downsample.0/1, fc), torch layouts (OIHW, (out, in))."""
  rng = np.random.default_rng(seed)
  sd = {}

  def conv_bn(conv_key, bn_key, unit):
    o, i, kh, kw = (unit.conv.kernel.shape[3], unit.conv.kernel.shape[2],
                    *unit.conv.kernel.shape[:2])
    sd[conv_key] = rng.normal(0, (2.0 / (i * kh * kw))**0.5, (o, i, kh, kw)).astype(np.float32)
    sd[f"{bn_key}.weight"] = rng.uniform(0.5, 1.5, o).astype(np.float32)
    sd[f"{bn_key}.bias"] = rng.normal(0, 0.2, o).astype(np.float32)
    sd[f"{bn_key}.running_mean"] = rng.normal(0, 0.2, o).astype(np.float32)
    sd[f"{bn_key}.running_var"] = rng.uniform(0.5, 2.0, o).astype(np.float32)
    sd[f"{bn_key}.num_batches_tracked"] = np.array(7, np.int64)

  conv_bn("conv1.weight", "bn1", model.stem)
  for s, stage in enumerate(model.stages):
    for b, block in enumerate(stage):
      for z, unit in ((1, block.c1), (2, block.c2), (3, block.c3)):
        conv_bn(f"layer{s + 1}.{b}.conv{z}.weight", f"layer{s + 1}.{b}.bn{z}", unit)
      if block.proj is not None:
        conv_bn(f"layer{s + 1}.{b}.downsample.0.weight", f"layer{s + 1}.{b}.downsample.1",
                block.proj)
  sd["fc.weight"] = rng.normal(0, 0.02, (num_classes, 2048)).astype(np.float32)
  sd["fc.bias"] = rng.normal(0, 0.02, num_classes).astype(np.float32)
  return sd


@pytest.fixture(scope="module")
def torch_file(tmp_path_factory):
  sd = torchvision_state_dict(abstract_resnet50(num_classes=1000), 1000)
  path = tmp_path_factory.mktemp("tv") / "resnet50.safetensors"
  save_file(sd, str(path))
  return path, sd


def test_torchvision_safetensors_round_trip(torch_file):
  path, sd = torch_file
  w = load_imagenet_resnet50(path)
  assert (w.family, w.variant, w.preprocess, w.num_classes) == ("torchvision", "v1.5",
                                                                TORCHVISION, 1000)
  model = abstract_resnet50(num_classes=3)
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


def torchvision_forward(sd, x_nchw):
  """torchvision.models.resnet50 in eval mode, transcribed with lax on its own state dict (NCHW,
  OIHW): an independent reference for v1.5 where torch is not installed."""
  def conv(x, w, stride, pad):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"))

  def bn(x, p):
    c = lambda n: sd[f"{p}.{n}"][None, :, None, None]  # noqa: E731
    return (x - c("running_mean")) / jnp.sqrt(c("running_var") + 1e-5) * c("weight") + c("bias")

  x = jax.nn.relu(bn(conv(x_nchw, sd["conv1.weight"], 2, 3), "bn1"))
  x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2),
                            ((0, 0), (0, 0), (1, 1), (1, 1)))
  for layer, blocks in enumerate((3, 4, 6, 3), start=1):
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
  model = abstract_resnet50(num_classes=1000)
  apply_pretrained(model, load_imagenet_resnet50(path), load_head=True)
  _, logits = features_and_logits(model, jnp.asarray(x))
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


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
  model = abstract_resnet50(num_classes=1000)
  apply_pretrained(model, load_imagenet_resnet50(path), load_head=True)
  _, logits = features_and_logits(model, jnp.asarray(x))
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ------------------------------------------------------------------------- gray input


def _stem_outputs(weights, gray_u8):
  rgb_model = abstract_resnet50(num_classes=3, variant=weights.variant)
  gray_model = abstract_resnet50(num_classes=3, variant=weights.variant, in_channels=1)
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


def _resnet18_state_dict() -> dict:
  sd = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}
  bn = lambda p, c: {f"{p}.{n}": np.zeros(c, np.float32)  # noqa: E731
                     for n in ("weight", "bias", "running_mean", "running_var")}
  sd.update(bn("bn1", 64))
  cin = 64
  for s, c in enumerate((64, 128, 256, 512)):
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


def test_other_architectures_are_refused(tmp_path, torch_file):
  cases = {
      "random.safetensors": ({"a": np.zeros(3, np.float32)}, r"'conv1.weight' is missing"),
      "resnet18.safetensors": (_resnet18_state_dict(),
                               r"'layer1.0.conv1.weight' has shape \(64, 64, 3, 3\), ResNet-50 "
                               r"expects \(64, 64, 1, 1\)"),
  }
  sd = dict(torch_file[1])
  sd["layer3.2.conv2.weight"] = np.zeros((256, 256, 1, 1), np.float32)
  cases["wrong_shape.safetensors"] = (
      sd, r"'layer3.2.conv2.weight' has shape \(256, 256, 1, 1\), ResNet-50 expects "
          r"\(256, 256, 3, 3\)")
  sd = {**torch_file[1], "layer3.6.conv1.weight": np.zeros((256, 1024, 1, 1), np.float32)}
  cases["resnet101.safetensors"] = (sd, r"unexpected tensor 'layer3.6.conv1.weight'")
  for name, (state, message) in cases.items():
    save_file(state, str(tmp_path / name))
    with pytest.raises(UserError, match=f"{name}: .*{message}"):
      load_imagenet_resnet50(tmp_path / name)


def test_apply_refuses_mismatched_models(torch_file):
  w = load_imagenet_resnet50(torch_file[0])
  with pytest.raises(ConfigError, match="variant='v1.5'"):
    apply_pretrained(abstract_resnet50(num_classes=3, variant="v1"), w)
  tiny = nnx.eval_shape(lambda: ResNet(num_classes=3, stage_sizes=(1, 1, 1, 1), width=8,
                                       rngs=nnx.Rngs(0)))
  with pytest.raises(ConfigError, match=r"stem/conv/kernel.*\(7, 7, 3, 64\).*\(7, 7, 3, 8\)"):
    apply_pretrained(tiny, w)
  with pytest.raises(ConfigError, match="1000-class head"):
    apply_pretrained(abstract_resnet50(num_classes=3), w, load_head=True)
  assert pretrained.TORCHVISION.gray_std == pytest.approx(0.22598, abs=1e-5)
