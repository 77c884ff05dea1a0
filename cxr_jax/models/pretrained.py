"""ImageNet (or any other) ResNet weights from files on the user's disk (nothing is ever
downloaded).

Any bottleneck ResNet of the ResNet-50/101/152 family is read; its architecture (blocks per
stage, base width) is inferred from the file and recorded on `PretrainedWeights`, so the
classifier builds the matching `ResNet` and tests can use tiny random weight files.

Supported files, and the `ResNet` variant their architecture needs:
- torchvision / timm state dicts: `.safetensors` (read with numpy, no torch needed), or `.pth` /
  `.pt` through `torch.load(weights_only=True)` when torch is installed -> `variant='v1.5'`.
- Keras application weights `resnet50_weights_tf_dim_ordering_tf_kernels[_notop].h5` (legacy
  Keras 2 HDF5 layout, also the older `res2a_branch2a` naming), a Keras 3 `.weights.h5` /
  `.keras` of `keras.applications.ResNet50/101/152` -> `variant='v1'`. Read with h5py: nothing
  is unpickled.

Files with a 1-channel first conv (a chest-X-ray ResNet, or this project's own classifier
exported to `.safetensors`) are read as well; they are taken to expect the gray form of their
family's normalisation (`Preprocess.gray_mean`, `gray_std`).

Grayscale radiographs: `apply_pretrained(..., in_channels=1)` folds the 3-channel first conv into
a 1-channel one instead of replicating the image (3x cheaper stem, same result), and `normalize`
gives the matching single-channel input; see `Preprocess.gray_mean` for the exact equivalence.
The other way, a 1-channel first conv becomes a 3-channel one by replicating its kernel / 3: a
gray image replicated to R, G, B then gives exactly the 1-channel network's response.
(`cxr_jax.training.export.classifier_weights` reads this project's classifier exports as
`PretrainedWeights` too.)
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
from cxr_jax.models.resnet import EXPANSION, ResNet


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


def preprocess_to_json(p: Preprocess) -> dict:
  """A JSON-serialisable dict (an exported classifier stores its input normalisation)."""
  return {"name": p.name, "scale": float(p.scale), "mean": [float(m) for m in p.mean],
          "std": [float(x) for x in p.std], "bgr": bool(p.bgr)}


def preprocess_from_json(d: Mapping) -> Preprocess:
  """Inverse of `preprocess_to_json` (lists back to tuples, so the result compares equal)."""
  fields = {f.name for f in dataclasses.fields(Preprocess)}
  try:
    if not isinstance(d, Mapping) or set(d) != fields:
      raise ValueError(f"needs exactly the keys {sorted(fields)}")
    mean, std = tuple(float(m) for m in d["mean"]), tuple(float(x) for x in d["std"])
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
      raise ValueError("needs 3 means and 3 positive stds")
    if not isinstance(d["bgr"], bool):
      raise ValueError("bgr must be true or false")
    return Preprocess(str(d["name"]), float(d["scale"]), mean, std, d["bgr"])
  except (TypeError, ValueError) as e:
    raise UserError(f"invalid input normalisation description {d!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
  """A validated bottleneck ResNet, converted to this package's layout (HWIO kernels).

  `params` maps our module paths ('stem/conv/kernel', 'stages/0/0/c1/bn/mean', 'fc/kernel', ...)
  to float32 arrays for `in_channels`-channel input; `num_classes` is the head's (0 if the file
  has no head, e.g. Keras `_notop`), `class_names` its classes when the source names them (this
  project's exports). Build the model with `ResNet(stage_sizes=w.stage_sizes,
  width=w.width, variant=w.variant, ...)`: (3, 4, 6, 3) and 64 for a ResNet-50.
  """
  path: str
  family: str  # 'torchvision' (also timm), 'keras', or 'cxr-jax' (an export of ours)
  variant: str  # the ResNet variant these weights need: 'v1.5' or 'v1'
  preprocess: Preprocess
  params: Mapping[str, np.ndarray]
  num_classes: int
  stage_sizes: tuple[int, ...]  # bottleneck blocks per stage, inferred from the file
  width: int  # base width: the stem conv's output channels
  in_channels: int = 3  # the stem conv's input channels: 3 (ImageNet) or 1
  class_names: tuple[str, ...] | None = None

  @property
  def arch(self) -> str:
    return describe_arch(self.stage_sizes, self.width)


# --------------------------------------------------------------------------- expected layout


def describe_arch(stage_sizes: tuple[int, ...], width: int) -> str:
  """'ResNet-50 (stage_sizes=(3, 4, 6, 3), width=64)': the depth counts convs and the fc."""
  return (f"ResNet-{2 + 3 * sum(stage_sizes)} (stage_sizes={tuple(stage_sizes)}, "
          f"width={width})")


def _num_features(stage_sizes: tuple[int, ...], width: int) -> int:
  return width * 2**(len(stage_sizes) - 1) * EXPANSION


def _spec(variant: str, stage_sizes: tuple[int, ...], width: int,
          in_channels: int = 3) -> dict[str, tuple[int, ...]]:
  """Backbone parameter shapes of a bottleneck ResNet in our layout, in forward order."""
  spec: dict[str, tuple[int, ...]] = {}

  def conv_bn(prefix: str, k: int, cin: int, cout: int):
    spec[f"{prefix}/conv/kernel"] = (k, k, cin, cout)
    if variant == "v1":
      spec[f"{prefix}/conv/bias"] = (cout,)
    for n in ("scale", "bias", "mean", "var"):
      spec[f"{prefix}/bn/{n}"] = (cout,)

  conv_bn("stem", 7, in_channels, width)
  cin = width
  for s, n in enumerate(stage_sizes):
    w = width * 2**s
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
  """Our path -> '<keras layer>/<weight>' of keras.applications.ResNet50/101/152."""
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


_NOT_BOTTLENECK = "not a bottleneck ResNet (ResNet-50/101/152 family)"


def _keras3_conv_names(filename: str, kernels: list[tuple[int, ...]]) -> list[str]:
  """Keras layer names of the conv kernels of a `.weights.h5`, in `model.layers` order.

  Keras 3 numbers `conv2d_<i>` in topological order: the stem, then per block 1, 2, (0,) 3, the
  projection `0` only in a stage's first block. A block continues its stage when its first 1x1
  conv reads 4x the channels it writes (a stage's first block reads 1x or 2x)."""
  if not kernels or len(kernels[0]) != 4 or kernels[0][:3] != (7, 7, 3):
    raise UserError(f"{filename}: not a keras.applications ResNet: the first conv kernel has "
                    f"shape {kernels[0] if kernels else None}, not (7, 7, 3, width)")
  names, i, stage, block = ["conv1"], 1, -1, 0
  while i < len(kernels):
    k = kernels[i]
    if len(k) != 4 or k[:2] != (1, 1):
      raise UserError(f"{filename}: {_NOT_BOTTLENECK}: conv layer {i} (the first of a block) "
                      f"has kernel shape {k}, a bottleneck block starts with a 1x1 conv (a "
                      f"basic-block ResNet-18/34?)")
    if stage >= 0 and k[2] == EXPANSION * k[3]:
      block, order = block + 1, ("1", "2", "3")
    else:
      stage, block, order = stage + 1, 0, ("1", "2", "0", "3")
    names += [f"conv{stage + 2}_block{block + 1}_{j}" for j in order]
    i += len(order)
  if len(names) != len(kernels):
    raise UserError(f"{filename}: {len(kernels)} conv layers do not form whole bottleneck "
                    f"blocks: not a keras.applications ResNet-50/101/152")
  return names


def _read_keras3(root) -> dict[str, np.ndarray]:
  """Keras 3 `.weights.h5`: /layers/<class-name>[_<i>]/vars/<j>, named by class, not layer;
  recent Keras 3 (3.15 does) keep the layer's name in the `name` attribute of `vars`."""
  layers = root["layers"]
  filename = root.file.filename

  def numbered(prefix: str) -> list[str]:
    found = [k for k in layers.keys() if re.fullmatch(rf"{prefix}(_\d+)?", k)
             and "vars" in layers[k] and len(layers[k]["vars"])]
    return sorted(found, key=lambda k: int(k.rsplit("_", 1)[1]) if k[-1].isdigit()
                  and k != prefix else 0)

  convs, bns, dense = numbered("conv2d"), numbered("batch_normalization"), numbered("dense")
  names = [layers[g]["vars"].attrs.get("name") for g in convs + bns + dense]
  if all(isinstance(n, (str, bytes)) and n for n in names):
    groups = [(_keras_layer_alias(n.decode() if isinstance(n, bytes) else n), g)
              for n, g in zip(names, convs + bns + dense)]
  else:  # infer them from the order and the kernel shapes
    if len(bns) != len(convs):
      raise UserError(f"{filename}: {len(convs)} conv2d but {len(bns)} batch_normalization "
                      f"layers: not a keras.applications ResNet")
    conv_names = _keras3_conv_names(filename, [tuple(layers[g]["vars"]["0"].shape) if "0" in
                                               layers[g]["vars"] else () for g in convs])
    groups = ([(f"{n}_conv", g) for n, g in zip(conv_names, convs)]
              + [(f"{n}_bn", g) for n, g in zip(conv_names, bns)]
              + [("predictions" if i == 0 else g, g) for i, g in enumerate(dense)])
  out = {}
  for name, g in groups:  # a second dense layer keeps its own name: refused as unexpected
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


_FIRST_CONV = {"torchvision": re.compile(r"layer(\d+)\.(\d+)\.conv1\.weight"),
               "keras": re.compile(r"conv(\d+)_block(\d+)_1_conv/kernel")}
_STAGE_BASE = {"torchvision": (1, 0), "keras": (2, 1)}  # index of the first stage, first block


def _infer_arch(p: pathlib.Path, raw: Mapping[str, np.ndarray],
                family: str) -> tuple[tuple[int, ...], int, int]:
  """(stage_sizes, width, in_channels) from the names of the blocks' first convs and the stem's
  shape."""
  to_source = _torch_name if family == "torchvision" else _keras_name
  stem = to_source("stem/conv/kernel")
  if stem not in raw:
    raise UserError(f"{p}: not an ImageNet ResNet {family} file: {stem!r} is missing "
                    f"(found {len(raw)} tensors, e.g. {sorted(raw)[:3]})")
  shape = tuple(raw[stem].shape)
  if len(shape) != 4:
    raise UserError(f"{p}: not a ResNet: the stem conv {stem!r} has shape {shape}, not a 4-D "
                    f"7x7 kernel")
  width = int(shape[0] if family == "torchvision" else shape[3])
  in_channels = int(shape[1] if family == "torchvision" else shape[2])
  if in_channels not in (1, 3):
    raise UserError(f"{p}: the stem conv {stem!r} has shape {shape}: {in_channels} input "
                    f"channels, not 1 (gray) or 3 (RGB)")
  last: dict[int, int] = {}  # stage -> its last block index
  s0, b0 = _STAGE_BASE[family]
  for key in raw:
    m = _FIRST_CONV[family].fullmatch(key)
    if m and int(m[1]) >= s0 and int(m[2]) >= b0:
      s, b = int(m[1]) - s0, int(m[2]) - b0
      last[s] = max(last.get(s, 0), b)
  if not last:
    raise UserError(f"{p}: not a ResNet {family} file: no residual block (no "
                    f"{to_source('stages/0/0/c1/conv/kernel')!r}; found {len(raw)} tensors, "
                    f"e.g. {sorted(raw)[:3]})")
  # A stage without blocks becomes 1 block, reported missing by the strict check that follows.
  stage_sizes = tuple(last.get(s, 0) + 1 for s in range(max(last) + 1))
  c1, c3 = to_source("stages/0/0/c1/conv/kernel"), to_source("stages/0/0/c3/conv/kernel")
  if c1 in raw and raw[c1].ndim == 4:
    k = tuple(raw[c1].shape[2:] if family == "torchvision" else raw[c1].shape[:2])
    if k != (1, 1) or c3 not in raw:
      raise UserError(f"{p}: {_NOT_BOTTLENECK}: the first block's {c1!r} is a "
                      f"{k[0]}x{k[1]} conv{'' if c3 in raw else f' and it has no {c3!r}'} "
                      f"(a bottleneck block is 1x1 -> 3x3 -> 1x1): a basic-block ResNet-18/34? "
                      f"Those are not supported")
  return stage_sizes, width, in_channels


def load_imagenet_resnet50(path: str | pathlib.Path) -> PretrainedWeights:
  """Reads and validates ImageNet bottleneck-ResNet weights (ResNet-50/101/152, or a smaller one
  of the same family); the file type decides family and variant, the tensors the architecture.
  """
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
  stage_sizes, width, in_channels = _infer_arch(p, raw, family)
  arch = describe_arch(stage_sizes, width)
  to_source = _torch_name if family == "torchvision" else _keras_name
  params: dict[str, np.ndarray] = {}
  used = set()
  for key, shape in _spec(variant, stage_sizes, width, in_channels).items():
    src = to_source(key)
    if src not in raw:
      raise UserError(f"{p}: not an ImageNet {arch} {family} file (architecture inferred from "
                      f"its tensors): {src!r} is missing (found {len(raw)} tensors)")
    want = _source_shape(key, shape, family)
    if tuple(raw[src].shape) != want:
      raise UserError(f"{p}: {src!r} has shape {tuple(raw[src].shape)}, the {arch} inferred from "
                      f"the file expects {want}")
    params[key] = _to_ours(key, np.asarray(raw[src], np.float32), family)
    used.add(src)
  num_classes = 0
  head = [to_source(k) for k in _HEAD]
  if all(h in raw for h in head):
    kernel = _to_ours("fc/kernel", np.asarray(raw[head[0]], np.float32), family)
    bias = np.asarray(raw[head[1]], np.float32)
    features = _num_features(stage_sizes, width)
    if kernel.ndim != 2 or kernel.shape[0] != features or bias.shape != kernel.shape[1:]:
      raise UserError(f"{p}: head {head[0]!r} has shape {tuple(raw[head[0]].shape)} and "
                      f"{head[1]!r} {tuple(raw[head[1]].shape)}, incompatible with the "
                      f"{features} features of the {arch}")
    params["fc/kernel"], params["fc/bias"] = kernel, bias
    num_classes = kernel.shape[1]
    used.update(head)
  extra = sorted(set(raw) - used)
  if extra:
    raise UserError(f"{p}: not a plain {arch}: unexpected tensor {extra[0]!r} "
                    f"{tuple(raw[extra[0]].shape)} ({len(extra)} in all; an SE/ResNeXt/ResNet-D "
                    f"or another architecture?)")
  return PretrainedWeights(path=str(p), family=family, variant=variant,
                           preprocess=TORCHVISION if family == "torchvision" else CAFFE,
                           params=params, num_classes=num_classes,
                           stage_sizes=stage_sizes, width=width, in_channels=in_channels)


load_imagenet_resnet = load_imagenet_resnet50  # the name says ResNet-50, any depth is read


def _variables(model: nnx.Module) -> Iterator[tuple[str, nnx.Variable]]:
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable):
      yield "/".join(str(k) for k in path), node


def apply_pretrained(model: ResNet, weights: PretrainedWeights, *, in_channels: int | None = None,
                     load_head: bool = False) -> ResNet:
  """Copies the backbone (kernels, biases, BN scale/bias and running statistics) into `model`.

  The head is skipped unless `load_head` (the new head stays freshly initialised). The first conv
  is adapted to the model's input channels: 3 -> 1 folds it (see `Preprocess.gray_mean`), 1 -> 3
  replicates kernel / 3; feed the model `normalize(images, weights.preprocess, in_channels)`.
  Updates `model` in place and returns it.
  """
  in_channels = model.in_channels if in_channels is None else in_channels
  if in_channels != model.in_channels:
    raise ConfigError(f"in_channels={in_channels} but the model was built with "
                      f"in_channels={model.in_channels}")
  if model.variant != weights.variant:
    raise ConfigError(f"model.variant is {model.variant!r} but {weights.path} holds "
                      f"{weights.family} weights, which need variant={weights.variant!r}")
  if tuple(model.stage_sizes) != tuple(weights.stage_sizes) or model.width != weights.width:
    raise ConfigError(f"the model is a {describe_arch(model.stage_sizes, model.width)} but "
                      f"{weights.path} holds a {weights.arch}: build the ResNet with "
                      f"stage_sizes=weights.stage_sizes, width=weights.width")
  if load_head and weights.num_classes != model.num_classes:
    raise ConfigError(f"load_head: {weights.path} has a {weights.num_classes}-class head, the "
                      f"model {model.num_classes} classes")
  values = {k: v for k, v in weights.params.items() if load_head or k not in _HEAD}
  if in_channels not in (1, 3):
    raise ConfigError(f"pretrained ResNet weights need in_channels 1 or 3, got {in_channels}")
  if (weights.in_channels, in_channels) == (3, 1):
    values.update(_fold_gray_stem(values, weights.preprocess, weights.variant))
  elif (weights.in_channels, in_channels) == (1, 3):
    values["stem/conv/kernel"] = _replicate_gray_stem(values["stem/conv/kernel"])
  variables = dict(_variables(model))
  for key, value in values.items():
    var = variables.get(key)
    if var is None:
      raise ConfigError(f"the model has no parameter {key!r}: apply_pretrained needs a "
                        f"{weights.arch}")
    if tuple(var.shape) != value.shape:
      raise ConfigError(f"{key}: {weights.path} gives shape {value.shape}, the model has "
                        f"{tuple(var.shape)}: apply_pretrained needs a {weights.arch}")
    var.set_value(jnp.asarray(value, dtype=var.dtype))
  missing = [k for k in variables if k not in values and k not in _HEAD]
  if missing:
    raise ConfigError(f"the model's {missing[0]!r} has no pretrained value: apply_pretrained "
                      f"needs a {weights.arch}")
  return model


def _fold_gray_stem(values: Mapping[str, np.ndarray], pp: Preprocess,
                    variant: str) -> dict[str, np.ndarray]:
  """3-channel stem -> 1-channel stem equal to feeding the gray image replicated to R, G, B."""
  w = np.asarray(values["stem/conv/kernel"], np.float64)  # (7, 7, 3, width)
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


def _replicate_gray_stem(kernel: np.ndarray) -> np.ndarray:
  """1-channel stem -> 3-channel stem whose response to a gray image replicated to R, G, B (each
  channel normalised with its own mean and std) is the 1-channel stem's on the gray input
  `(p * scale - gray_mean) / gray_std`: exact, border included, since sum_c (x - mean_c) / std_c
  / 3 = (x - gray_mean) / gray_std for every pixel value x, padding zeros included."""
  return np.repeat(np.asarray(kernel, np.float32) / 3.0, 3, axis=2)


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
