"""pix2pix U-Net generator (Isola et al. 2017), layer for layer as the reference
junyanz/pytorch-CycleGAN-and-pix2pix `UnetGenerator` (`unet_256` at 256 px), so that parameter
counts and behaviour match the paper's code.

Reference details kept on purpose: bias-free convs when BatchNorm follows (bias only with instance
norm, and on the outermost up conv), no norm on the outermost down conv nor on the innermost down
conv, dropout 0.5 after the norm of the `num_downs - 5` intermediate decoder levels (3 at 256 px),
N(0, 0.02) init. Instance norm is the reference's `InstanceNorm2d(affine=False)`: no parameters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from cxr_jax.models.layers import channel_aligned_conv

from cxr_jax.errors import ConfigError

MIN_LEVELS = 5  # the reference's fixed outer 4 levels + the innermost one
NORMS = ("batch", "instance")

# pix2pix init_weights('normal', 0.02).
conv_init = nnx.initializers.normal(0.02)


def bn_scale_init(key, shape, dtype=jnp.float32):
  """BatchNorm scale ~ N(1, 0.02) as pix2pix `init_weights`."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def make_norm(kind: str, features: int, *, rngs: nnx.Rngs, dtype, param_dtype):
  """BatchNorm (PyTorch momentum 0.1, eps 1e-5) or parameter-free instance norm."""
  if kind == "batch":
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, scale_init=bn_scale_init,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  return nnx.GroupNorm(features, num_groups=None, group_size=1, epsilon=1e-5, use_bias=False,
                       use_scale=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def apply_norm(norm, x, train: bool):
  if isinstance(norm, nnx.BatchNorm):
    return norm(x, use_running_average=not train)
  return norm(x)


def num_levels(image_size: int) -> int:
  """256 -> 8 (unet_256), 128 -> 7, 64 -> 6: the bottleneck is 1x1 as in the reference."""
  k = int(round(math.log2(image_size))) if image_size > 0 else 0
  if image_size <= 0 or 2**k != image_size or k < MIN_LEVELS:
    raise ConfigError(f"image size {image_size} is not supported by the U-Net generator: it must "
                      f"be a power of two >= {2**MIN_LEVELS} (e.g. 64, 128, 256)")
  return k


def reference_keys(levels: int, norm: str = "batch") -> dict[str, str]:
  """Our parameter / batch-statistic paths ('levels.2.down.kernel') -> the reference's
  `UnetGenerator` state-dict keys ('model.model.1.model.3.model.1.weight') of the same network.

  The reference nests one `UnetSkipConnectionBlock` per level, each a `.model` Sequential:
  outermost [down, sub, ReLU, up, Tanh]; intermediate [LeakyReLU, down, norm, sub, ReLU, up,
  norm, (Dropout)]; innermost [LeakyReLU, down, ReLU, up, norm]. Level 1 is the outermost's
  item 1, every deeper level its parent's item 3. Dropout has no parameters, so the keys do not
  depend on it. Layouts: see `resnet_generator.py` (4-D kernels transposed, norm
  scale/bias/mean/var -> weight/bias/running_mean/running_var).
  """
  use_bias = norm == "instance"
  keys: dict[str, str] = {}

  def layer(ours: str, ref: str, *, conv: bool, bias: bool = False) -> None:
    if conv:
      keys[f"{ours}.kernel"] = f"{ref}.weight"
      if bias:
        keys[f"{ours}.bias"] = f"{ref}.bias"
    elif norm == "batch":
      for a, b in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                   ("var", "running_var")):
        keys[f"{ours}.{a}"] = f"{ref}.{b}"

  prefix = "model.model"
  for i in range(levels):
    ours = f"levels.{i}"
    if i == 0:
      layer(f"{ours}.down", f"{prefix}.0", conv=True, bias=use_bias)
      layer(f"{ours}.up", f"{prefix}.3", conv=True, bias=True)
      prefix = f"{prefix}.1.model"
    elif i == levels - 1:
      layer(f"{ours}.down", f"{prefix}.1", conv=True, bias=use_bias)
      layer(f"{ours}.up", f"{prefix}.3", conv=True, bias=use_bias)
      layer(f"{ours}.up_norm", f"{prefix}.4", conv=False)
    else:
      layer(f"{ours}.down", f"{prefix}.1", conv=True, bias=use_bias)
      layer(f"{ours}.down_norm", f"{prefix}.2", conv=False)
      layer(f"{ours}.up", f"{prefix}.5", conv=True, bias=use_bias)
      layer(f"{ours}.up_norm", f"{prefix}.6", conv=False)
      prefix = f"{prefix}.3.model"
  return keys


def up_conv(cin: int, cout: int, *, use_bias: bool, rngs: nnx.Rngs, dtype,
            param_dtype) -> nnx.ConvTranspose:
  """PyTorch ConvTranspose2d(cin, cout, k=4, s=2, p=1): exactly doubles H and W.

  Same maths as torch: lax.conv_transpose with the kernel transposed (torch weight
  (in, out, kh, kw) is our kernel transposed (2, 3, 1, 0)) and k - 1 - p = 2 padding.
  """
  return nnx.ConvTranspose(cin, cout, (4, 4), strides=2, padding=((2, 2), (2, 2)),
                           transpose_kernel=True, use_bias=use_bias, kernel_init=conv_init,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class _Level(nnx.Module):
  """One encoder/decoder level: a 4x4 s2 down conv and the matching 4x4 s2 transposed conv."""

  def __init__(self, outer: int, inner: int, cin: int, *, outermost: bool, innermost: bool,
               dropout: bool, norm: str, rngs: nnx.Rngs, dtype, param_dtype):
    use_bias = norm == "instance"
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.down = nnx.Conv(cin, inner, (4, 4), strides=2, padding=((1, 1), (1, 1)),
                         use_bias=use_bias, kernel_init=conv_init,
                         conv_general_dilated=channel_aligned_conv, **kw)
    self.down_norm = (None if outermost or innermost else make_norm(norm, inner, **kw))
    self.up = up_conv(inner if innermost else 2 * inner, outer, use_bias=use_bias or outermost,
                      **kw)
    self.up_norm = None if outermost else make_norm(norm, outer, **kw)
    self.dropout = nnx.Dropout(0.5) if dropout else None


class UNet(nnx.Module):
  """Generator: [N, S, S, in_channels] in [-1, 1] -> [N, S, S, out_channels] in [-1, 1] (tanh).

  `levels[0]` is the outermost level. `train=True` uses batch statistics and dropout (needs
  `rngs` with a 'dropout' stream); pix2pix itself also generates in train mode at test time
  unless `--eval` is given, which callers may want to reproduce.
  """

  def __init__(self, *, image_size: int = 256, in_channels: int = 1, out_channels: int = 1,
               ngf: int = 64, norm: str = "batch", use_dropout: bool = True, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    if norm not in NORMS:
      raise ConfigError(f"generator norm must be one of {NORMS}, got {norm!r}")
    if ngf < 1 or in_channels < 1 or out_channels < 1:
      raise ConfigError(f"U-Net: ngf, in_channels and out_channels must be >= 1, got "
                        f"{ngf}, {in_channels}, {out_channels}")
    n = num_levels(image_size)
    self.image_size = image_size
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.dtype = dtype
    # (outer, inner) channels per level, outermost first: the reference's fixed ngf, 2, 4, 8 ramp
    # and then ngf*8 everywhere down to the 1x1 bottleneck.
    mult = [1, 2, 4, 8] + [8] * (n - 4)
    levels = []
    for i in range(n):
      outer = out_channels if i == 0 else ngf * mult[i - 1]
      cin = in_channels if i == 0 else ngf * mult[i - 1]
      levels.append(_Level(outer, ngf * mult[i], cin, outermost=i == 0, innermost=i == n - 1,
                           dropout=use_dropout and 4 <= i < n - 1, norm=norm, rngs=rngs,
                           dtype=dtype, param_dtype=param_dtype))
    self.levels = nnx.List(levels)

  def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    if x.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"U-Net built for {self.image_size} px got input {x.shape}")
    if train and rngs is None and any(lvl.dropout is not None for lvl in self.levels):
      raise ValueError("UNet(train=True) needs rngs with a 'dropout' stream")
    h = jnp.asarray(x, self.dtype)
    skips = []
    for i, lvl in enumerate(self.levels):
      if i > 0:
        skips.append(h)
        h = nnx.leaky_relu(h, 0.2)
      h = lvl.down(h)
      if lvl.down_norm is not None:
        h = apply_norm(lvl.down_norm, h, train)
    for i in range(len(self.levels) - 1, -1, -1):
      lvl = self.levels[i]
      h = lvl.up(nnx.relu(h))
      if i == 0:
        break
      h = apply_norm(lvl.up_norm, h, train)
      if lvl.dropout is not None:
        h = lvl.dropout(h, deterministic=not train, rngs=rngs)
      h = jnp.concatenate([skips[i - 1], h], axis=-1)
    return jnp.tanh(h).astype(jnp.float32)
