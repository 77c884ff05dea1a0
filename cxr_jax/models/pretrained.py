"""ImageNet ResNet-50 weights from files on the user's disk (nothing is ever downloaded).

Supported files, and the `ResNet` variant their architecture needs:
- torchvision / timm state dicts: `.safetensors` (read with numpy, no torch needed), or `.pth` /
  `.pt` through `torch.load(weights_only=True)` when torch is installed -> `variant='v1.5'`.
- Keras application weights `resnet50_weights_tf_dim_ordering_tf_kernels[_notop].h5` (legacy
  Keras 2 HDF5 layout, also the older `res2a_branch2a` naming), a Keras 3 `.weights.h5` /
  `.keras` of `keras.applications.ResNet50` -> `variant='v1'`. Read with h5py: nothing is
  unpickled.

Grayscale radiographs: `apply_pretrained(..., in_channels=1)` folds the 3-channel first conv into
a 1-channel one instead of replicating the image (3x cheaper stem, same result), and `normalize`
gives the matching single-channel input; see `Preprocess.gray_mean` for the exact equivalence.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import re
import zipfile
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cxr_jax.errors import ConfigError, UserError
from cxr_jax.models.resnet import EXPANSION, RESNET50_STAGES, ResNet

_WIDTH = 64


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Input normalisation a weight family was trained with, in the model's channel order.

  A pixel p in [0, 255] of model channel c becomes (p * scale - mean[c]) / std[c]; `bgr` says
  the model's channels are B, G, R (Caffe/Keras) rather than R, G, B.
  """
  name: str
  scale: float
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  bgr: bool

  @property
  def gray_std(self) -> float:
    """Harmonic mean of the stds: the 1-channel kernel is sum_c W_c * gray_std / std_c."""
    return len(self.std) / sum(1.0 / s for s in self.std)

  @property
  def gray_mean(self) -> float:
    """Mean for the gray input: (p * scale - gray_mean) / gray_std.

    Replicating a gray image to 3 channels gives first-conv outputs
    sum_c W_c * (p * scale - mean_c) / std_c = W_gray * gray_input + b, with
    W_gray = sum_c W_c * gray_std / std_c and the constant b = sum_c W_c * (gray_mean - mean_c)
    / std_c folded into the BatchNorm mean (or conv bias). This holds exactly wherever the 7x7
    window lies inside the image; in the 3-pixel zero-padded border the 3-channel path pads each
    channel at a different grey level, which no single-channel input can reproduce. This choice
    of gray_mean (sum_c (gray_mean - mean_c) / std_c = 0) makes the border exact too for filters
    that weigh R, G, B equally, so only the colour-opponent part of a filter differs there.
    """
    inv = [1.0 / s for s in self.std]
    return sum(m * i for m, i in zip(self.mean, inv)) / sum(inv)


TORCHVISION = Preprocess("torchvision", 1.0 / 255.0, (0.485, 0.456, 0.406),
                         (0.229, 0.224, 0.225), bgr=False)
# keras.applications.resnet.preprocess_input (mode 'caffe'): RGB -> BGR, minus the BGR means.
CAFFE = Preprocess("caffe", 1.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0), bgr=True)


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
  """A validated ImageNet ResNet-50, converted to this package's layout (HWIO kernels).

  `params` maps our module paths ('stem/conv/kernel', 'stages/0/0/c1/bn/mean', 'fc/kernel', ...)
  to float32 arrays for 3-channel input; `num_classes` is the ImageNet head's (0 if the file has
  no head, e.g. Keras `_notop`).
  """
  path: str
  family: str  # 'torchvision' (also timm) or 'keras'
  variant: str  # the ResNet variant these weights need: 'v1.5' or 'v1'
  preprocess: Preprocess
  params: Mapping[str, np.ndarray]
  num_classes: int


# --------------------------------------------------------------------------- expected layout


def _spec(variant: str) -> dict[str, tuple[int, ...]]:
  """Backbone parameter shapes of an ImageNet ResNet-50 in our layout, in forward order."""
  spec: dict[str, tuple[int, ...]] = {}

  def conv_bn(prefix: str, k: int, cin: int, cout: int):
    spec[f"{prefix}/conv/kernel"] = (k, k, cin, cout)
    if variant == "v1":
      spec[f"{prefix}/conv/bias"] = (cout,)
    for n in ("scale", "bias", "mean", "var"):
      spec[f"{prefix}/bn/{n}"] = (cout,)

  conv_bn("stem", 7, 3, _WIDTH)
  cin = _WIDTH
  for s, n in enumerate(RESNET50_STAGES):
    w = _WIDTH * 2**s
    for b in range(n):
      p = f"stages/{s}/{b}"
      conv_bn(f"{p}/c1", 1, cin, w)
      conv_bn(f"{p}/c2", 3, w, w)
      conv_bn(f"{p}/c3", 1, w, w * EXPANSION)
      if b == 0:
        conv_bn(f"{p}/proj", 1, cin, w * EXPANSION)
      cin = w * EXPANSION
  return spec


_HEAD = ("fc/kernel", "fc/bias")
_NUM_FEATURES = _WIDTH * 8 * EXPANSION


def _torch_name(key: str) -> str:
  """Our path -> torchvision/timm state-dict key."""
  parts = key.split("/")
  if parts[0] == "fc":
    return f"fc.{'weight' if parts[1] == 'kernel' else 'bias'}"
  leaf = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
          "var": "running_var"}[parts[-1]]
  if parts[0] == "stem":
    return f"{'conv1' if parts[1] == 'conv' else 'bn1'}.{leaf}"
  s, b, unit, kind = int(parts[1]), parts[2], parts[3], parts[4]
  if unit == "proj":
    return f"layer{s + 1}.{b}.downsample.{0 if kind == 'conv' else 1}.{leaf}"
  return f"layer{s + 1}.{b}.{'conv' if kind == 'conv' else 'bn'}{unit[1]}.{leaf}"


def _keras_name(key: str) -> str:
  """Our path -> '<keras layer>/<weight>' of keras.applications.ResNet50."""
  parts = key.split("/")
  if parts[0] == "fc":
    return f"predictions/{parts[1]}"
  leaf = {"kernel": "kernel", "bias": "bias", "scale": "gamma", "mean": "moving_mean",
          "var": "moving_variance"}[parts[-1]]
  if parts[-2] == "bn" and parts[-1] == "bias":
    leaf = "beta"
  if parts[0] == "stem":
    return f"conv1_{parts[1]}/{leaf}"
  s, b, unit, kind = int(parts[1]), int(parts[2]), parts[3], parts[4]
  idx = "0" if unit == "proj" else unit[1]
  return f"conv{s + 2}_block{b + 1}_{idx}_{kind}/{leaf}"


def _to_ours(key: str, arr: np.ndarray, family: str) -> np.ndarray:
  """Source layout -> ours: torch conv OIHW -> HWIO, torch Linear (out, in) -> (in, out)."""
  if family == "torchvision":
    if arr.ndim == 4:
      return arr.transpose(2, 3, 1, 0)
    if key == "fc/kernel":
      return arr.T
  return arr


def _source_shape(key: str, shape: tuple[int, ...], family: str) -> tuple[int, ...]:
  if family == "torchvision" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


# --------------------------------------------------------------------------- readers


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return load_file(str(path))


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError(
        f"{path}: reading a .pth/.pt file needs PyTorch, which is not installed. Convert it once "
        f"where torch is available: python -c \"import torch, safetensors.torch as st; "
        f"sd = torch.load('{path.name}', map_location='cpu', weights_only=True); "
        f"st.save_file({{k: v.contiguous() for k, v in sd.items()}}, "
        f"'{path.stem}.safetensors')\" and pass the .safetensors file") from None
  obj = torch.load(str(path), map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
    for k in ("state_dict", "model", "model_state_dict", "module"):  # training checkpoints
      if isinstance(obj.get(k), Mapping):
        obj = obj[k]
        break
  if not isinstance(obj, Mapping):
    raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
  return {str(k): v.detach().to(torch.float32).numpy() for k, v in obj.items()
          if isinstance(v, torch.Tensor)}


def _h5_attr_list(group, name: str) -> list[str]:
  """A string-list attribute, also when Keras split it in chunks (name0, name1, ...)."""
  if name in group.attrs:
    values = list(group.attrs[name])
  else:
    values, i = [], 0
    while f"{name}{i}" in group.attrs:
      values += list(group.attrs[f"{name}{i}"])
      i += 1
  return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


_OLD_KERAS = re.compile(r"^(res|bn)(\d)([a-z])_branch(1|2a|2b|2c)$")
_KERAS_LEAVES = {"conv": ("kernel", "bias"),
                 "bn": ("gamma", "beta", "moving_mean", "moving_variance"),
                 "predictions": ("kernel", "bias")}


def _keras_layer_alias(name: str) -> str:
  """The keras-applications<=1.0.4 names (res2a_branch2a, bn_conv1, fc1000) -> today's."""
  m = _OLD_KERAS.match(name)
  if m:
    kind, stage, block, branch = m.groups()
    idx = {"1": 0, "2a": 1, "2b": 2, "2c": 3}[branch]
    return f"conv{stage}_block{ord(block) - 96}_{idx}_{'conv' if kind == 'res' else 'bn'}"
  return {"conv1": "conv1_conv", "bn_conv1": "conv1_bn", "fc1000": "predictions"}.get(name, name)


def _keras_kind(layer: str) -> str:
  if layer == "predictions":
    return "predictions"
  return "bn" if layer.endswith("_bn") else "conv"


def _read_keras_legacy(root) -> dict[str, np.ndarray]:
  """Keras 2 `save_weights` HDF5: /<layer>/ with attr weight_names -> datasets."""
  out = {}
  for layer in _h5_attr_list(root, "layer_names"):
    group = root[layer]
    names = _h5_attr_list(group, "weight_names")
    if not names:
      continue
    alias = _keras_layer_alias(layer)
    leaves = _KERAS_LEAVES[_keras_kind(alias)]
    for i, wname in enumerate(names):
      leaf = wname.split("/")[-1].split(":")[0]
      if leaf not in leaves:  # unusual weight names: Keras stores them in a fixed order
        leaf = leaves[i] if i < len(leaves) else leaf
      out[f"{alias}/{leaf}"] = np.asarray(group[wname][()])
  return out


def _keras3_layer_order() -> tuple[list[str], list[str]]:
  """Conv and BN layer names in `keras.applications.ResNet50().layers` order (the topological
  order Keras 3 numbers `conv2d_<i>` / `batch_normalization_<i>` by in `.weights.h5`)."""
  convs, bns = ["conv1_conv"], ["conv1_bn"]
  for s, n in enumerate(RESNET50_STAGES):
    for b in range(n):
      p = f"conv{s + 2}_block{b + 1}"
      order = ("1", "2", "0", "3") if b == 0 else ("1", "2", "3")
      convs += [f"{p}_{i}_conv" for i in order]
      bns += [f"{p}_{i}_bn" for i in order]
  return convs, bns


def _read_keras3(root) -> dict[str, np.ndarray]:
  """Keras 3 `.weights.h5`: /layers/<class-name>[_<i>]/vars/<j>, named by class, not layer."""
  layers = root["layers"]

  def numbered(prefix: str) -> list[str]:
    found = [k for k in layers.keys() if re.fullmatch(rf"{prefix}(_\d+)?", k)
             and "vars" in layers[k] and len(layers[k]["vars"])]
    return sorted(found, key=lambda k: int(k.rsplit("_", 1)[1]) if k[-1].isdigit()
                  and k != prefix else 0)

  convs, bns = _keras3_layer_order()
  out = {}
  for names, prefix in ((convs, "conv2d"), (bns, "batch_normalization"), (["predictions"],
                                                                           "dense")):
    groups = numbered(prefix)
    if prefix != "dense" and len(groups) != len(names):
      raise UserError(f"{root.file.filename}: {len(groups)} {prefix} layers, keras.applications "
                      f"ResNet50 has {len(names)}: not a ResNet-50")
    for name, g in zip(names, groups):
      leaves = _KERAS_LEAVES[_keras_kind(name)]
      vars_ = layers[g]["vars"]
      for j, leaf in enumerate(leaves):
        if str(j) in vars_:
          out[f"{name}/{leaf}"] = np.asarray(vars_[str(j)][()])
  return out


def _read_keras(path: pathlib.Path) -> dict[str, np.ndarray]:
  import h5py  # pylint: disable=import-outside-toplevel
  if zipfile.is_zipfile(path):  # a Keras 3 `.keras` archive holds model.weights.h5
    with zipfile.ZipFile(path) as z:
      if "model.weights.h5" not in z.namelist():
        raise UserError(f"{path}: a zip without model.weights.h5, not a .keras model file")
      source = io.BytesIO(z.read("model.weights.h5"))
  else:
    source = str(path)
  with h5py.File(source, "r") as f:
    root = f["model_weights"] if "model_weights" in f else f  # a full `model.save()` file
    if "layer_names" in root.attrs or "layer_names0" in root.attrs:
      return _read_keras_legacy(root)
    if "layers" in root:
      return _read_keras3(root)
  raise UserError(f"{path}: an HDF5 file without Keras weights (no layer_names attribute and no "
                  f"layers/ group)")


def _strip_prefix(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drop the wrappers' prefixes (DataParallel 'module.', 'model.') common to all keys."""
  for prefix in ("module.", "model.", "backbone."):
    if sd and all(k.startswith(prefix) for k in sd):
      sd = {k[len(prefix):]: v for k, v in sd.items()}
  return sd


# --------------------------------------------------------------------------- public API


def load_imagenet_resnet50(path: str | pathlib.Path) -> PretrainedWeights:
  """Reads and validates ImageNet ResNet-50 weights; the file type decides family and variant."""
  p = pathlib.Path(path).expanduser()
  if not p.is_file():
    raise UserError(f"{p}: no such file. ImageNet weights are read from your disk, never "
                    f"downloaded: give a torchvision/timm resnet50 .safetensors/.pth or the Keras "
                    f"resnet50_weights_tf_dim_ordering_tf_kernels.h5")
  name = p.name.lower()
  if name.endswith(".safetensors"):
    family, reader = "torchvision", _read_safetensors
  elif name.endswith((".pth", ".pt", ".bin")):
    family, reader = "torchvision", _read_torch
  elif name.endswith((".h5", ".hdf5", ".keras")):
    family, reader = "keras", _read_keras
  else:
    raise UserError(f"{p}: unsupported weight file type; use .safetensors, .pth/.pt (torchvision "
                    f"or timm resnet50) or .h5 (Keras applications ResNet50)")
  try:
    raw = reader(p)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{p}: cannot read it as a {family} weight file ({type(e).__name__}: "
                    f"{e})") from None

  variant = "v1.5" if family == "torchvision" else "v1"
  if family == "torchvision":
    raw = {k: v for k, v in _strip_prefix(raw).items() if not k.endswith("num_batches_tracked")}
  to_source = _torch_name if family == "torchvision" else _keras_name
  params: dict[str, np.ndarray] = {}
  used = set()
  for key, shape in _spec(variant).items():
    src = to_source(key)
    if src not in raw:
      raise UserError(f"{p}: not an ImageNet ResNet-50 {family} file: {src!r} is missing "
                      f"(found {len(raw)} tensors, e.g. {sorted(raw)[:3]})")
    want = _source_shape(key, shape, family)
    if tuple(raw[src].shape) != want:
      raise UserError(f"{p}: not a ResNet-50: {src!r} has shape {tuple(raw[src].shape)}, "
                      f"ResNet-50 expects {want}")
    params[key] = _to_ours(key, np.asarray(raw[src], np.float32), family)
    used.add(src)
  num_classes = 0
  head = [to_source(k) for k in _HEAD]
  if all(h in raw for h in head):
    kernel = _to_ours("fc/kernel", np.asarray(raw[head[0]], np.float32), family)
    bias = np.asarray(raw[head[1]], np.float32)
    if kernel.ndim != 2 or kernel.shape[0] != _NUM_FEATURES or bias.shape != kernel.shape[1:]:
      raise UserError(f"{p}: head {head[0]!r} has shape {tuple(raw[head[0]].shape)}, "
                      f"incompatible with ResNet-50's {_NUM_FEATURES} features")
    params["fc/kernel"], params["fc/bias"] = kernel, bias
    num_classes = kernel.shape[1]
    used.update(head)
  extra = sorted(set(raw) - used)
  if extra:
    raise UserError(f"{p}: not a ResNet-50: unexpected tensor {extra[0]!r} "
                    f"{tuple(raw[extra[0]].shape)} ({len(extra)} in all; ResNet-101/152 or "
                    f"another architecture?)")
  return PretrainedWeights(path=str(p), family=family, variant=variant,
                           preprocess=TORCHVISION if family == "torchvision" else CAFFE,
                           params=params, num_classes=num_classes)


def _variables(model: nnx.Module) -> Iterator[tuple[str, nnx.Variable]]:
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable):
      yield "/".join(str(k) for k in path), node


def apply_pretrained(model: ResNet, weights: PretrainedWeights, *, in_channels: int | None = None,
                     load_head: bool = False) -> ResNet:
  """Copies the backbone (kernels, biases, BN scale/bias and running statistics) into `model`.

  The ImageNet head is skipped unless `load_head` (the new head stays freshly initialised). For
  `in_channels=1` the first conv is folded to one input channel (see `Preprocess.gray_mean`):
  feed it `normalize(images, weights.preprocess, 1)`. Updates `model` in place and returns it.
  """
  in_channels = model.in_channels if in_channels is None else in_channels
  if in_channels != model.in_channels:
    raise ConfigError(f"in_channels={in_channels} but the model was built with "
                      f"in_channels={model.in_channels}")
  if model.variant != weights.variant:
    raise ConfigError(f"model.variant is {model.variant!r} but {weights.path} holds "
                      f"{weights.family} weights, which need variant={weights.variant!r}")
  if load_head and weights.num_classes != model.num_classes:
    raise ConfigError(f"load_head: {weights.path} has a {weights.num_classes}-class head, the "
                      f"model {model.num_classes} classes")
  values = {k: v for k, v in weights.params.items() if load_head or k not in _HEAD}
  if in_channels == 1:
    values.update(_fold_gray_stem(values, weights.preprocess, weights.variant))
  elif in_channels != 3:
    raise ConfigError(f"ImageNet weights need in_channels 1 or 3, got {in_channels}")
  variables = dict(_variables(model))
  for key, value in values.items():
    var = variables.get(key)
    if var is None:
      raise ConfigError(f"the model has no parameter {key!r}: apply_pretrained needs a "
                        f"ResNet-50 (stage_sizes={RESNET50_STAGES}, width={_WIDTH})")
    if tuple(var.shape) != value.shape:
      raise ConfigError(f"{key}: {weights.path} gives shape {value.shape}, the model has "
                        f"{tuple(var.shape)}: apply_pretrained needs a ResNet-50 "
                        f"(stage_sizes={RESNET50_STAGES}, width={_WIDTH})")
    var.set_value(jnp.asarray(value, dtype=var.dtype))
  missing = [k for k in variables if k not in values and k not in _HEAD]
  if missing:
    raise ConfigError(f"the model's {missing[0]!r} has no pretrained value: apply_pretrained "
                      f"needs a ResNet-50")
  return model


def _fold_gray_stem(values: Mapping[str, np.ndarray], pp: Preprocess,
                    variant: str) -> dict[str, np.ndarray]:
  """3-channel stem -> 1-channel stem equal to feeding the gray image replicated to R, G, B."""
  w = np.asarray(values["stem/conv/kernel"], np.float64)  # (7, 7, 3, 64)
  std = np.asarray(pp.std, np.float64)
  mean = np.asarray(pp.mean, np.float64)
  kernel = (w * (pp.gray_std / std)[None, None, :, None]).sum(axis=2, keepdims=True)
  offset = (w * ((pp.gray_mean - mean) / std)[None, None, :, None]).sum(axis=(0, 1, 2))
  out = {"stem/conv/kernel": kernel.astype(np.float32)}
  if variant == "v1":  # the conv has a bias: the constant goes there
    out["stem/conv/bias"] = (values["stem/conv/bias"] + offset).astype(np.float32)
  else:  # bias-free conv followed by BN: shift the running mean (batch statistics cancel it)
    out["stem/bn/mean"] = (values["stem/bn/mean"] - offset).astype(np.float32)
  return out


def normalize(images, preprocess: Preprocess, in_channels: int) -> jax.Array:
  """uint8 [0, 255] or float [0, 1] images [..., H, W, 1 or 3] (RGB) -> float32 model input.

  3 channels: gray is replicated, RGB is reordered to BGR for Caffe weights, then per-channel
  mean/std. 1 channel: `(p * scale - gray_mean) / gray_std`, matching the folded stem.
  """
  x = jnp.asarray(images)
  pixels = x.astype(jnp.float32) * (1.0 if jnp.issubdtype(x.dtype, jnp.integer) else 255.0)
  c = x.shape[-1]
  if c not in (1, 3):
    raise ValueError(f"normalize: images need 1 or 3 channels, got shape {x.shape}")
  if in_channels == 1:
    if c != 1:
      raise ValueError(f"normalize: in_channels=1 needs gray images, got shape {x.shape}")
    return (pixels * preprocess.scale - preprocess.gray_mean) / preprocess.gray_std
  if in_channels != 3:
    raise ValueError(f"normalize: in_channels must be 1 or 3, got {in_channels}")
  if c == 1:
    pixels = jnp.broadcast_to(pixels, x.shape[:-1] + (3,))
  elif preprocess.bgr:
    pixels = pixels[..., ::-1]
  mean = jnp.asarray(preprocess.mean, jnp.float32)
  std = jnp.asarray(preprocess.std, jnp.float32)
  return (pixels * preprocess.scale - mean) / std
