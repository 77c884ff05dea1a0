"""Weights that travel to and from the PyTorch world, in its own file formats.

- `import_reference_generator`: a generator state dict written by the PyTorch reference
  junyanz/pytorch-CycleGAN-and-pix2pix (`latest_net_G.pth` through `torch.load(weights_only=True)`
  when torch is installed, or a `.safetensors` of it): `unet_*` or `resnet_*blocks`, any channels,
  batch or instance norm, all inferred from its keys and shapes -> our `UNet` / `ResnetGenerator`.
- `export_reference_generator`: ours -> `.safetensors` with the reference's key names and layouts
  (the reference's `netG.load_state_dict` reads it after `safetensors.torch.load_file`).
- `export_torchvision_resnet`: our ResNet classifier -> `.safetensors` with torchvision's ResNet
  key names (`conv1.weight`, `layer1.0.bn1.running_mean`, `fc.weight`, ...), which
  `pretrained.load_imagenet_resnet50` also reads back.

Key maps: `unet.reference_keys`, `resnet_generator.reference_keys`, `pretrained._torch_name`.
Layouts: every 4-D kernel (conv or transposed conv) is the torch weight transposed (2, 3, 1, 0);
a torch `Linear` weight is our dense kernel transposed.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cxr_jax.errors import ConfigError, UserError
from cxr_jax.models import pretrained, resnet_generator, unet
from cxr_jax.models.resnet import ResNet
from cxr_jax.models.resnet_generator import ResnetGenerator
from cxr_jax.models.unet import UNet

ARCHITECTURES = ("unet", "resnet")
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_RUNNING = (".running_mean", ".running_var")
_BLOCK = re.compile(r"model\.(\d+)\.conv_block\.")


@dataclasses.dataclass(frozen=True)
class ReferenceGenerator:
  """What `import_reference_generator` found in a file (for logs and manifests)."""
  path: str
  architecture: str  # 'unet' or 'resnet'
  name: str  # the reference's --netG: 'unet_256', 'resnet_9blocks', ...
  in_channels: int
  out_channels: int
  ngf: int
  norm: str  # 'batch' or 'instance'
  use_dropout: bool
  levels: int  # U-Net levels (the reference's num_downs); 0 for a ResNet
  n_blocks: int  # ResNet blocks; 0 for a U-Net
  image_size: int
  ignored: tuple[str, ...]  # tensors without a counterpart (num_batches_tracked, stale stats)


def to_torch_layout(arr: np.ndarray) -> np.ndarray:
  """Our 4-D kernel (HWIO, or a transposed conv's (kh, kw, out, in)) -> torch's weight."""
  return np.ascontiguousarray(arr.transpose(3, 2, 0, 1)) if arr.ndim == 4 else arr


def from_torch_layout(arr: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(arr.transpose(2, 3, 1, 0)) if arr.ndim == 4 else arr


def _variables(module: nnx.Module, sep: str) -> Iterator[tuple[str, nnx.Variable]]:
  for path, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Variable):
      yield sep.join(str(k) for k in path), node


# --------------------------------------------------------------------------- reading


def _read(p: pathlib.Path) -> dict[str, np.ndarray]:
  """The file's tensors, float32, with the reference's keys ('model.' first, no 'module.')."""
  name = p.name.lower()
  if name.endswith(".safetensors"):
    reader = pretrained._read_safetensors  # pylint: disable=protected-access
  elif name.endswith((".pth", ".pt", ".bin")):
    reader = pretrained._read_torch  # pylint: disable=protected-access
  else:
    raise UserError(f"{p}: unsupported generator file type; give the reference's "
                    f"latest_net_G.pth (needs torch) or a .safetensors of its state dict")
  try:
    raw = reader(p)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{p}: cannot read it as a PyTorch state dict ({type(e).__name__}: "
                    f"{e})") from None
  if not raw:
    raise UserError(f"{p}: holds no tensors")
  # Every reference generator key starts with 'model.', which `_strip_prefix` removes together
  # with DataParallel's 'module.': put it back.
  stripped = pretrained._strip_prefix(raw)  # pylint: disable=protected-access
  if all(k.startswith(("model.", "module.model.")) for k in raw):
    stripped = {f"model.{k}": v for k, v in stripped.items()}
  return {k: np.asarray(v, np.float32) for k, v in stripped.items()}


def _unet_levels(sd: Mapping[str, np.ndarray]) -> int:
  """Nesting depth of the reference's UnetSkipConnectionBlocks."""
  prefix, n = "model.model", 0
  while any(k.startswith(prefix + ".") for k in sd):
    n += 1
    prefix += ".1.model" if n == 1 else ".3.model"
  return n


def _not_a_generator(p: pathlib.Path, sd: Mapping[str, np.ndarray], why: str) -> UserError:
  return UserError(f"{p}: not a pytorch-CycleGAN-and-pix2pix generator state dict: {why} "
                   f"(found {len(sd)} tensors, e.g. {sorted(sd)[:3]})")


def _conv_weight(p: pathlib.Path, sd: Mapping[str, np.ndarray], key: str) -> np.ndarray:
  w = sd.get(key)
  if w is None or w.ndim != 4:
    raise _not_a_generator(p, sd, f"no 4-D conv weight {key!r}")
  return w


def import_reference_generator(
    path: str | pathlib.Path, *, architecture: str | None = None, image_size: int,
    channels: int | None = None, norm: str | None = None,
    use_dropout: bool | None = None) -> tuple[UNet | ResnetGenerator, ReferenceGenerator]:
  """Reads a reference generator's state dict into a new `UNet` or `ResnetGenerator`.

  Architecture, levels / blocks, ngf, in/out channels, norm and (ResNet) dropout are inferred
  from the tensors; the optional arguments only check the inference (and `use_dropout` sets a
  U-Net's dropout, which has no tensors: the reference's pix2pix default, on, when not given).
  `image_size` is the size the model will translate: a U-Net of n levels needs 2**n.
  """
  p = pathlib.Path(path).expanduser()
  if not p.is_file():
    raise UserError(f"{p}: no such generator file")
  if architecture is not None and architecture not in ARCHITECTURES:
    raise ConfigError(f"generator architecture must be one of {ARCHITECTURES}, got "
                      f"{architecture!r}")
  sd = _read(p)
  ignored = [k for k in sd if k.endswith(_IGNORED_SUFFIXES)]
  if "model.model.0.weight" in sd:
    arch, first_norm = "unet", "model.model.1.model.2"
  elif "model.1.weight" in sd:
    arch, first_norm = "resnet", "model.2"
  else:
    raise _not_a_generator(p, sd, "neither a U-Net ('model.model.0.weight') nor a ResNet "
                           "generator ('model.1.weight')")
  if architecture is not None and architecture != arch:
    raise UserError(f"{p}: holds a {arch} generator, not the {architecture} that was asked")
  found_norm = "batch" if f"{first_norm}.weight" in sd else "instance"
  if norm is not None and norm != found_norm:
    raise UserError(f"{p}: its norm layers are {found_norm} norm ({first_norm!r} "
                    f"{'has' if found_norm == 'batch' else 'has no'} affine weight), not the "
                    f"{norm} norm that was asked")
  if found_norm == "instance":  # checkpoints of torch < 0.4 kept InstanceNorm running stats
    ignored += [k for k in sd if k.endswith(_RUNNING)]
  sd = {k: v for k, v in sd.items() if k not in ignored}

  if arch == "unet":
    levels = _unet_levels(sd)
    down = _conv_weight(p, sd, "model.model.0.weight")
    up = _conv_weight(p, sd, "model.model.3.weight")
    ngf, cin, cout = int(down.shape[0]), int(down.shape[1]), int(up.shape[1])
    if levels < unet.MIN_LEVELS:
      raise _not_a_generator(p, sd, f"a U-Net of {levels} levels, the reference's has >= "
                             f"{unet.MIN_LEVELS}")
    if image_size != 2**levels:
      raise ConfigError(f"{p} holds a unet_{2**levels} ({levels} levels, a 1x1 bottleneck at "
                        f"{2**levels} px): the image size must be {2**levels}, got {image_size}")
    dropout = True if use_dropout is None else bool(use_dropout)
    n_blocks = 0
    name = f"unet_{2**levels}"
    mapping = unet.reference_keys(levels, found_norm)
  else:
    blocks = sorted({int(m[1]) for k in sd if (m := _BLOCK.match(k))})
    n_blocks, levels = len(blocks), 0
    if blocks != list(range(10, 10 + n_blocks)):
      raise _not_a_generator(p, sd, f"ResNet blocks at model.{blocks} are not model.10, 11, ...")
    first = _conv_weight(p, sd, "model.1.weight")
    last = _conv_weight(p, sd, f"model.{17 + n_blocks}.weight")
    ngf, cin, cout = int(first.shape[0]), int(first.shape[1]), int(last.shape[0])
    found_dropout = bool(n_blocks) and sd.get("model.10.conv_block.6.weight",
                                              np.zeros(())).ndim == 4
    if use_dropout is not None and n_blocks and bool(use_dropout) != found_dropout:
      raise UserError(f"{p}: its ResNet blocks are {'with' if found_dropout else 'without'} "
                      f"dropout (the second conv is conv_block.{6 if found_dropout else 5}), "
                      f"use_dropout={use_dropout} was asked")
    dropout = found_dropout
    resnet_generator.check_image_size(image_size, key="image_size")
    name = f"resnet_{n_blocks}blocks"
    mapping = resnet_generator.reference_keys(n_blocks, found_norm, dropout)
  if channels is not None and (cin, cout) != (channels, channels):
    raise UserError(f"{p}: the generator reads {cin} and writes {cout} channels, not the "
                    f"{channels} that were asked")

  if arch == "unet":
    module = UNet(image_size=image_size, in_channels=cin, out_channels=cout, ngf=ngf,
                  norm=found_norm, use_dropout=dropout, rngs=nnx.Rngs(0))
  else:
    module = ResnetGenerator(in_channels=cin, out_channels=cout, ngf=ngf, n_blocks=n_blocks,
                             norm=found_norm, use_dropout=dropout, rngs=nnx.Rngs(0))
  info = ReferenceGenerator(path=str(p), architecture=arch, name=name, in_channels=cin,
                            out_channels=cout, ngf=ngf, norm=found_norm, use_dropout=dropout,
                            levels=levels, n_blocks=n_blocks, image_size=image_size,
                            ignored=tuple(sorted(ignored)))
  _fill(p, module, mapping, sd,
        f"{name} (ngf={ngf}, {cin}->{cout} channels, {found_norm} norm)")
  return module, info


def _fill(p: pathlib.Path, module: nnx.Module, mapping: Mapping[str, str],
          sd: Mapping[str, np.ndarray], desc: str) -> None:
  """Sets every variable of `module` from `sd`, or says which tensors do not fit."""
  variables = dict(_variables(module, "."))
  if set(variables) != set(mapping):  # our module and our key map disagree: a bug, not the file
    raise RuntimeError(f"reference key map out of date: {sorted(set(variables) ^ set(mapping))}")
  missing = [ref for ref in mapping.values() if ref not in sd]
  unexpected = sorted(set(sd) - set(mapping.values()))
  misshaped = []
  for ours, ref in mapping.items():
    want = to_torch_layout(np.empty(variables[ours].shape, np.uint8)).shape
    if ref in sd and tuple(sd[ref].shape) != tuple(want):
      misshaped.append(f"{ref!r} {tuple(sd[ref].shape)} (expected {tuple(want)})")
  problems = []
  for what, items in (("missing", [repr(k) for k in missing]),
                      ("unexpected", [f"{k!r} {tuple(sd[k].shape)}" for k in unexpected]),
                      ("mis-shaped", misshaped)):
    if items:
      problems.append(f"{len(items)} {what}: {', '.join(items[:3])}"
                      f"{', ...' if len(items) > 3 else ''}")
  if problems:
    raise UserError(f"{p}: does not match the {desc} its tensors describe: "
                    f"{'; '.join(problems)}")
  for ours, ref in mapping.items():
    var = variables[ours]
    var.set_value(jnp.asarray(from_torch_layout(sd[ref]), dtype=var.dtype))


# --------------------------------------------------------------------------- writing


def _save(tensors: Mapping[str, np.ndarray], path: str | pathlib.Path,
          metadata: Mapping[str, str]) -> pathlib.Path:
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  p = pathlib.Path(path).expanduser()
  if p.suffix != ".safetensors":
    raise UserError(f"{p}: exported weights are written as .safetensors; name the file so")
  p.parent.mkdir(parents=True, exist_ok=True)
  # Contiguous copies: safetensors.numpy writes a transposed view's buffer as is, not its values.
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(p),
            metadata={"format": "pt", **metadata})
  return p


def reference_state_dict(module: UNet | ResnetGenerator) -> dict[str, np.ndarray]:
  """Our generator's parameters under the reference's keys and layouts (float32)."""
  if isinstance(module, UNet):
    norm = "batch" if isinstance(module.levels[1].down_norm, nnx.BatchNorm) else "instance"
    mapping = unet.reference_keys(len(module.levels), norm)
  elif isinstance(module, ResnetGenerator):
    mapping = resnet_generator.reference_keys(module.n_blocks, module.norm_kind,
                                              module.use_dropout)
  else:
    raise TypeError(f"not a UNet or ResnetGenerator: {type(module).__name__}")
  variables = dict(_variables(module, "."))
  return {mapping[k]: to_torch_layout(np.asarray(v.get_value(), np.float32))
          for k, v in variables.items()}


def export_reference_generator(module: UNet | ResnetGenerator,
                               path: str | pathlib.Path) -> pathlib.Path:
  """Writes our generator as the reference's state dict (`.safetensors`): build the reference
  with the `netG`, `ngf`, `norm`, channels recorded in the file's metadata and
  `netG.load_state_dict(safetensors.torch.load_file(path))`."""
  if isinstance(module, UNet):
    norm = "batch" if isinstance(module.levels[1].down_norm, nnx.BatchNorm) else "instance"
    meta = {"netG": f"unet_{2**len(module.levels)}", "norm": norm,
            "ngf": str(module.levels[0].down.out_features),
            "no_dropout": str(all(lvl.dropout is None for lvl in module.levels))}
  elif isinstance(module, ResnetGenerator):
    meta = {"netG": f"resnet_{module.n_blocks}blocks", "norm": module.norm_kind,
            "ngf": str(module.conv_in.out_features), "no_dropout": str(not module.use_dropout)}
  else:
    raise TypeError(f"not a UNet or ResnetGenerator: {type(module).__name__}")
  meta.update(input_nc=str(module.in_channels), output_nc=str(module.out_channels))
  return _save(reference_state_dict(module), path, meta)


def torchvision_state_dict(module: ResNet) -> dict[str, np.ndarray]:
  """Our ResNet classifier under torchvision's keys and layouts (float32)."""
  if module.variant != "v1.5":
    raise ConfigError(f"torchvision's ResNet is variant 'v1.5' (bias-free convs, stride in the "
                      f"3x3 conv); this classifier is {module.variant!r}")
  out = {}
  for key, var in _variables(module, "/"):
    arr = np.asarray(var.get_value(), np.float32)
    out[pretrained._torch_name(key)] = (  # pylint: disable=protected-access
        arr.T if key == "fc/kernel" else to_torch_layout(arr))
  return out


def export_torchvision_resnet(module: ResNet, path: str | pathlib.Path) -> pathlib.Path:
  """Writes our ResNet classifier with torchvision's key names (`torchvision.models.resnet50(
  num_classes=...)` with `conv1` for the recorded input channels loads it)."""
  meta = {"arch": pretrained.describe_arch(module.stage_sizes, module.width),
          "num_classes": str(module.num_classes), "in_channels": str(module.in_channels)}
  return _save(torchvision_state_dict(module), path, meta)
