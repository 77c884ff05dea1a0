"""Network builders, shared by the trainers and by loading an export, so that both build the same
module from the same description (`arch`, a JSON-able dict recorded in every export's model.json).

Generators are looked up by `arch["name"]` in `GENERATORS`: a new generator architecture adds one
entry there, and synthesis loads it unchanged. A translator's `config.model` names its generator
(`generator_arch`), whose image-size check is the architecture's own (`check_generator_size`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp
from flax import nnx

from cxr_jax import configlib
from cxr_jax.errors import ConfigError
from cxr_jax.errors import UserError
from cxr_jax.models import pretrained as pretrained_lib
from cxr_jax.models.patch_mlp import PatchMLP
from cxr_jax.models.patchgan import PatchGAN
from cxr_jax.models.resnet import ResNet
from cxr_jax.models.resnet_generator import ResnetGenerator
from cxr_jax.models.resnet_generator import check_image_size
from cxr_jax.models.unet import MIN_LEVELS
from cxr_jax.models.unet import UNet

# Scratch classifiers see [0, 1] intensities standardised with these (a radiograph's statistics).
SCRATCH_MEAN, SCRATCH_STD = 0.5, 0.25
# The same standardisation as pretrained weights' input description (fine-tuning from a scratch
# export: `pretrained.normalize` with it computes what `InputSpec` without weights does).
SCRATCH = pretrained_lib.Preprocess("scratch", 1.0 / 255.0, (SCRATCH_MEAN,) * 3,
                                    (SCRATCH_STD,) * 3, bgr=False)


# (architecture, seed) -> its compiled initialisation, newest last: a process that builds the same
# network again (each row and seed of an experiment, a resumed run's export, the tests) reuses the
# program instead of tracing and compiling it again (0.3-2 s each on a CPU; each call still returns
# a new module with new arrays).
_INIT_PROGRAMS: collections.OrderedDict[Hashable, Callable[[], nnx.Module]] = (
    collections.OrderedDict())
_INIT_PROGRAMS_KEPT = 16


def init_module(make: Callable[[nnx.Rngs], nnx.Module], seed: int, *, arch_key: Hashable,
                abstract: bool = False) -> nnx.Module:
  """Builds a module with its whole initialisation compiled as one program.

  Built eagerly, every parameter shape compiles its own threefry sampler: tens of seconds for a
  ResNet-50 on a CPU. One `nnx.jit` and an `rbg` key make it a few seconds. The key only draws
  initial weights; training randomness uses the default (threefry) keys. `abstract=True` gives
  shapes only, for modules whose values are about to be restored. `arch_key`: a hashable
  description of everything `make` builds from (the module, its sizes, its dtype); the compiled
  initialisation of (`arch_key`, `seed`) is kept for the next build of the same network.
  """
  if abstract:
    return nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  key = (arch_key, int(seed))
  program = _INIT_PROGRAMS.pop(key, None)
  if program is None:
    program = nnx.jit(lambda: make(nnx.Rngs(jax.random.key(seed, impl="rbg"))))
  _INIT_PROGRAMS[key] = program  # the newest last
  while len(_INIT_PROGRAMS) > _INIT_PROGRAMS_KEPT:
    _INIT_PROGRAMS.popitem(last=False)
  return program()


def _unet(arch: dict, *, image_size: int, channels: int, dtype: Any,
          rngs: nnx.Rngs) -> nnx.Module:
  return UNet(image_size=image_size, in_channels=channels, out_channels=channels,
              ngf=arch["ngf"], norm=arch["norm"], use_dropout=arch["use_dropout"], rngs=rngs,
              dtype=dtype)


def _resnet(arch: dict, *, image_size: int, channels: int, dtype: Any,
            rngs: nnx.Rngs) -> nnx.Module:
  """The reference's ResNet generator (fully convolutional: `image_size` is not part of it)."""
  del image_size
  return ResnetGenerator(in_channels=channels, out_channels=channels, ngf=arch["ngf"],
                         n_blocks=arch["n_blocks"], norm=arch["norm"],
                         use_dropout=arch["use_dropout"], rngs=rngs, dtype=dtype)


# arch["name"] -> constructor(arch, *, image_size, channels, dtype, rngs).
GENERATORS: dict[str, Callable[..., nnx.Module]] = {"unet": _unet, "resnet": _resnet}


def generator_arch(model_cfg: Any) -> dict:
  """The `arch` of a translator's `config.model` (its `generator` and that generator's keys)."""
  name = model_cfg.get("generator")
  common = {"name": name, "ngf": model_cfg.ngf, "norm": model_cfg.norm,
            "use_dropout": model_cfg.use_dropout}
  if name == "unet":
    return common
  if name == "resnet":
    return dict(common, n_blocks=model_cfg.n_blocks)
  raise ConfigError(f"config.model.generator: unknown {name!r}; use one of {tuple(GENERATORS)}")


def check_generator_size(arch: dict, image_size: Any) -> None:
  """Refuses an image size the generator cannot translate, naming `config.data.image_size`."""
  if arch["name"] == "resnet":
    check_image_size(image_size)
  elif not (isinstance(image_size, int) and image_size >= 2**MIN_LEVELS
            and image_size & (image_size - 1) == 0):
    raise ConfigError(f"config.data.image_size: the U-Net halves the image down to 1x1, so it "
                      f"must be a power of two >= {2**MIN_LEVELS} (e.g. 64, 128, 256), got "
                      f"{image_size!r}")


def build_generator(arch: dict, *, image_size: int, channels: int, compute_dtype: str,
                    seed: int, abstract: bool = False) -> nnx.Module:
  """The image-to-image generator `arch` describes (`arch["name"]` in GENERATORS)."""
  make = GENERATORS.get(arch.get("name", ""))
  if make is None:
    raise UserError(f"unknown generator architecture {arch.get('name')!r}; known: "
                    f"{', '.join(GENERATORS)}")
  dtype = configlib.compute_dtype(compute_dtype)
  return init_module(lambda rngs: make(arch, image_size=image_size, channels=channels,
                                       dtype=dtype, rngs=rngs), seed, abstract=abstract,
                     arch_key=("generator", _hashable(arch), image_size, channels, str(dtype)))


def build_patchgan(*, in_channels: int, ndf: int, n_layers: int, norm: str, compute_dtype: str,
                   seed: int, abstract: bool = False) -> nnx.Module:
  """The PatchGAN discriminator (pix2pix's on (source, image) pairs, CycleGAN's on images)."""
  dtype = configlib.compute_dtype(compute_dtype)
  return init_module(lambda rngs: PatchGAN(in_channels=in_channels, ndf=ndf, n_layers=n_layers,
                                           norm=norm, rngs=rngs, dtype=dtype), seed,
                     abstract=abstract,
                     arch_key=("patchgan", in_channels, ndf, n_layers, norm, str(dtype)))


def build_patch_mlp(*, channels: tuple[int, ...], dim: int, compute_dtype: str, seed: int,
                    abstract: bool = False) -> nnx.Module:
  """CUT's patch projection head: one MLP per encoder layer of `channels` channels."""
  dtype = configlib.compute_dtype(compute_dtype)
  return init_module(lambda rngs: PatchMLP(channels, dim=dim, rngs=rngs, dtype=dtype), seed,
                     abstract=abstract, arch_key=("patch_mlp", tuple(channels), dim, str(dtype)))


def build_resnet(arch: dict, *, num_classes: int, compute_dtype: str, seed: int,
                 abstract: bool = False) -> nnx.Module:
  """The ResNet classifier of `arch` (variant, stage_sizes, width, in_channels)."""
  dtype = configlib.compute_dtype(compute_dtype)
  return init_module(
      lambda rngs: ResNet(num_classes=num_classes, in_channels=arch["in_channels"],
                          stage_sizes=tuple(arch["stage_sizes"]), width=arch["width"],
                          variant=arch["variant"], rngs=rngs, dtype=dtype), seed,
      abstract=abstract, arch_key=("resnet", _hashable(arch), num_classes, str(dtype)))


def _hashable(value: Any) -> Hashable:
  """A JSON-like value (an `arch` dict, its lists) as nested tuples, for `init_module`'s key."""
  if isinstance(value, dict):
    return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  return value


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """How [0, 1] radiographs become classifier input: the size, and the normalisation the weights
  expect (ImageNet weights) or the scratch standardisation."""
  image_size: int
  in_channels: int
  weights_preprocess: Any = None  # pretrained_lib.Preprocess, or None for scratch
  # Central fraction of the stored image blacked out before anything else (config.data.hide_center:
  # the lungs-hidden control), so training and inference hide the same pixels; 0: none.
  hide_center: float = 0.0

  def __call__(self, x01: jax.Array) -> jax.Array:
    """float [B, S, S, 1] in [0, 1] -> normalised network input."""
    if self.weights_preprocess is None:
      x = (x01 - SCRATCH_MEAN) / SCRATCH_STD
      return jnp.repeat(x, self.in_channels, axis=-1) if x.shape[-1] == 1 else x
    return pretrained_lib.normalize(x01, self.weights_preprocess, self.in_channels)

  def to_json(self) -> dict:
    pre = self.weights_preprocess
    return {"image_size": self.image_size, "in_channels": self.in_channels,
            "weights_preprocess": None if pre is None else pretrained_lib.preprocess_to_json(pre),
            "hide_center": self.hide_center}

  @classmethod
  def from_json(cls, d: dict) -> "InputSpec":
    pre = d.get("weights_preprocess")
    return cls(d["image_size"], d["in_channels"],
               pretrained_lib.preprocess_from_json(pre) if pre else None,
               float(d.get("hide_center", 0.0)))
