"""CycleGAN ResNet generator (Johnson et al. 2016, as used by Zhu et al. 2017), layer for layer as
the reference junyanz/pytorch-CycleGAN-and-pix2pix `ResnetGenerator` (`resnet_9blocks`), so that
parameter counts, behaviour and (through `reference_keys`) its state dicts match the paper's code.

    reflect-pad 3, 7x7 conv (ngf), norm, ReLU
    2 x [3x3 conv stride 2 padding 1 (x2 channels), norm, ReLU]
    n_blocks x [x + (reflect-pad 1, 3x3 conv, norm, ReLU, [dropout 0.5], reflect-pad 1, 3x3 conv,
                norm)]
    2 x [3x3 transposed conv stride 2 (PyTorch padding 1, output_padding 1: exactly 2x), norm, ReLU]
    reflect-pad 3, 7x7 conv (out_channels, always with bias), tanh

Reference details kept on purpose: convs have a bias only with instance norm (BatchNorm's shift
makes it redundant), except the last conv which always has one; instance norm is
`InstanceNorm2d(affine=False)`: no parameters (`make_norm` of `unet.py`); N(0, 0.02) init.

Reference state-dict keys (`model.<i>` indices of its `nn.Sequential`; see `reference_keys`):

| ours                                     | reference (n = n_blocks, k = 10 + n)          |
|------------------------------------------|-----------------------------------------------|
| conv_in.{kernel,bias}                    | model.1.{weight,bias}                         |
| norm_in                                  | model.2                                       |
| downs.{j}, down_norms.{j} (j = 0, 1)     | model.{4 + 3j}, model.{5 + 3j}                |
| blocks.{i}.conv1, .norm1                 | model.{10 + i}.conv_block.1, .conv_block.2    |
| blocks.{i}.conv2, .norm2                 | model.{10 + i}.conv_block.5, .6 (6, 7 with dropout) |
| ups.{j}, up_norms.{j} (j = 0, 1)         | model.{k + 3j}, model.{k + 1 + 3j}            |
| conv_out.{kernel,bias}                   | model.{k + 7}.{weight,bias}                   |

A norm's parameters (batch norm only) map as scale -> weight, bias -> bias, mean -> running_mean,
var -> running_var (the reference's `num_batches_tracked` has no counterpart). Every 4-D kernel,
plain or transposed, is the reference weight transposed: `ours = torch.transpose(2, 3, 1, 0)`,
`torch = ours.transpose(3, 2, 0, 1)` (conv: HWIO <-> OIHW; transposed conv: our (kh, kw, out, in)
is the kernel of the forward conv it transposes, torch's is (in, out, kh, kw)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cxr_jax.errors import ConfigError
from cxr_jax.models.layers import channel_aligned_conv
from cxr_jax.models.unet import NORMS, apply_norm, conv_init, make_norm

N_DOWNSAMPLING = 2  # fixed in the reference
_PAD1 = ((1, 1), (1, 1))
# PyTorch ConvTranspose2d(k=3, s=2, padding=1, output_padding=1) as lax.conv_transpose padding of
# the stride-dilated input: (k - 1 - p, k - 1 - p + output_padding).
_UP_PAD = ((1, 2), (1, 2))


def reflect_pad(x: jax.Array, p: int) -> jax.Array:
  """`nn.ReflectionPad2d(p)` on NHWC: mirrors without repeating the edge pixel."""
  return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")


def check_image_size(image_size: int, key: str = "data.image_size") -> int:
  """The two stride-2 stages must divide the image exactly (else the output is not the input's
  size) and leave at least 2x2 pixels for the blocks' reflection padding."""
  if not isinstance(image_size, int) or image_size < 8 or image_size % 4:
    raise ConfigError(f"config.{key}: {image_size!r} is not supported by the ResNet generator: "
                      "it must be a multiple of 4 and >= 8 (e.g. 64, 128, 256)")
  return image_size


def encoder_channels(layer: int, *, in_channels: int, ngf: int) -> int:
  """Channels of the encoder tensor `layer` (`ResnetGenerator.encode`'s numbering)."""
  if layer == 0:
    return in_channels
  stage = min((layer - 1) // 3, N_DOWNSAMPLING)   # 0: first conv, 1 and 2: the stride-2 stages
  return ngf * 2**stage


def reference_keys(n_blocks: int = 9, norm: str = "instance",
                   use_dropout: bool = False) -> dict[str, str]:
  """Our parameter / batch-statistic paths ('blocks.3.conv1.kernel') -> the reference's
  state-dict keys ('model.13.conv_block.1.weight') of the same network."""
  use_bias = norm == "instance"
  keys: dict[str, str] = {}

  def conv(ours: str, ref: str, bias: bool) -> None:
    keys[f"{ours}.kernel"] = f"{ref}.weight"
    if bias:
      keys[f"{ours}.bias"] = f"{ref}.bias"

  def norm_layer(ours: str, ref: str) -> None:
    if norm == "batch":
      for a, b in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                   ("var", "running_var")):
        keys[f"{ours}.{a}"] = f"{ref}.{b}"

  conv("conv_in", "model.1", use_bias)
  norm_layer("norm_in", "model.2")
  for j in range(N_DOWNSAMPLING):
    conv(f"downs.{j}", f"model.{4 + 3 * j}", use_bias)
    norm_layer(f"down_norms.{j}", f"model.{5 + 3 * j}")
  second = 6 if use_dropout else 5
  for i in range(n_blocks):
    ref = f"model.{10 + i}.conv_block"
    conv(f"blocks.{i}.conv1", f"{ref}.1", use_bias)
    norm_layer(f"blocks.{i}.norm1", f"{ref}.2")
    conv(f"blocks.{i}.conv2", f"{ref}.{second}", use_bias)
    norm_layer(f"blocks.{i}.norm2", f"{ref}.{second + 1}")
  k = 10 + n_blocks
  for j in range(N_DOWNSAMPLING):
    conv(f"ups.{j}", f"model.{k + 3 * j}", use_bias)
    norm_layer(f"up_norms.{j}", f"model.{k + 1 + 3 * j}")
  conv("conv_out", f"model.{k + 7}", True)
  return keys


class ResnetBlock(nnx.Module):
  """x + (pad, conv, norm, ReLU, [dropout], pad, conv, norm)(x): same channels, same size."""

  def __init__(self, dim: int, *, norm: str, use_dropout: bool, rngs: nnx.Rngs, dtype,
               param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    use_bias = norm == "instance"
    self.conv1 = nnx.Conv(dim, dim, (3, 3), padding="VALID", use_bias=use_bias,
                          kernel_init=conv_init, **kw)
    self.norm1 = make_norm(norm, dim, **kw)
    self.dropout = nnx.Dropout(0.5) if use_dropout else None
    self.conv2 = nnx.Conv(dim, dim, (3, 3), padding="VALID", use_bias=use_bias,
                          kernel_init=conv_init, **kw)
    self.norm2 = make_norm(norm, dim, **kw)

  def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    h = nnx.relu(apply_norm(self.norm1, self.conv1(reflect_pad(x, 1)), train))
    if self.dropout is not None:
      h = self.dropout(h, deterministic=not train, rngs=rngs)
    return x + apply_norm(self.norm2, self.conv2(reflect_pad(h, 1)), train)


class ResnetGenerator(nnx.Module):
  """Generator: [N, H, W, in_channels] in [-1, 1] -> [N, H, W, out_channels] in [-1, 1] (tanh),
  for any H, W that are multiples of 4 and >= 8 (fully convolutional).

  `train=True` uses batch statistics (batch norm) and dropout (needs `rngs` with a 'dropout'
  stream when `use_dropout`); instance norm behaves the same in both modes. The reference's
  CycleGAN default has no dropout.
  """

  def __init__(self, *, in_channels: int = 1, out_channels: int = 1, ngf: int = 64,
               n_blocks: int = 9, norm: str = "instance", use_dropout: bool = False,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    if norm not in NORMS:
      raise ConfigError(f"generator norm must be one of {NORMS}, got {norm!r}")
    if ngf < 1 or in_channels < 1 or out_channels < 1 or n_blocks < 0:
      raise ConfigError(f"ResNet generator: ngf, in_channels and out_channels must be >= 1 and "
                        f"n_blocks >= 0, got {ngf}, {in_channels}, {out_channels}, {n_blocks}")
    self.in_channels, self.out_channels = in_channels, out_channels
    self.n_blocks, self.norm_kind, self.use_dropout = n_blocks, norm, use_dropout
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    use_bias = norm == "instance"
    self.conv_in = nnx.Conv(in_channels, ngf, (7, 7), padding="VALID", use_bias=use_bias,
                            kernel_init=conv_init, conv_general_dilated=channel_aligned_conv,
                            **kw)
    self.norm_in = make_norm(norm, ngf, **kw)
    downs, down_norms = [], []
    for j in range(N_DOWNSAMPLING):
      cin = ngf * 2**j
      downs.append(nnx.Conv(cin, 2 * cin, (3, 3), strides=2, padding=_PAD1, use_bias=use_bias,
                            kernel_init=conv_init, **kw))
      down_norms.append(make_norm(norm, 2 * cin, **kw))
    self.downs, self.down_norms = nnx.List(downs), nnx.List(down_norms)
    dim = ngf * 2**N_DOWNSAMPLING
    self.blocks = nnx.List([ResnetBlock(dim, norm=norm, use_dropout=use_dropout, **kw)
                            for _ in range(n_blocks)])
    ups, up_norms = [], []
    for j in range(N_DOWNSAMPLING):
      cin = ngf * 2**(N_DOWNSAMPLING - j)
      ups.append(nnx.ConvTranspose(cin, cin // 2, (3, 3), strides=2, padding=_UP_PAD,
                                   transpose_kernel=True, use_bias=use_bias,
                                   kernel_init=conv_init, **kw))
      up_norms.append(make_norm(norm, cin // 2, **kw))
    self.ups, self.up_norms = nnx.List(ups), nnx.List(up_norms)
    self.conv_out = nnx.Conv(ngf, out_channels, (7, 7), padding="VALID", use_bias=True,
                             kernel_init=conv_init, **kw)

  @property
  def num_encoder_points(self) -> int:
    """How many intermediate tensors `encode` can return (indices 0 .. this - 1)."""
    return 1 + 3 + 3 * N_DOWNSAMPLING + self.n_blocks

  def _encoder(self, x, *, train: bool, rngs: nnx.Rngs | None):
    """Yields the encoder's intermediate tensors in the order of the reference's `nn.Sequential`
    (without anti-aliasing): 0 the reflection-padded input, 1 / 2 / 3 the first conv / its norm /
    ReLU, 4-6 and 7-9 the two stride-2 stages (conv / norm / ReLU), 10 + i residual block i."""
    h = reflect_pad(jnp.asarray(x, self.dtype), 3)
    yield h
    for conv, norm in ((self.conv_in, self.norm_in), *zip(self.downs, self.down_norms)):
      h = conv(h)
      yield h
      h = apply_norm(norm, h, train)
      yield h
      h = nnx.relu(h)
      yield h
    for block in self.blocks:
      h = block(h, train=train, rngs=rngs)
      yield h

  def encode(self, x, *, layers: tuple[int, ...], train: bool,
             rngs: nnx.Rngs | None = None) -> list[jax.Array]:
    """The encoder's tensors at `layers` (indices as `_encoder` numbers them), in that order, as
    float32 [N, h, w, C]: what CUT's PatchNCE compares. Runs the encoder only as far as needed."""
    bad = [i for i in layers if not 0 <= i < self.num_encoder_points]
    if bad:
      raise ConfigError(f"encoder layers {bad} do not exist: this ResNet generator has layers "
                        f"0-{self.num_encoder_points - 1} (10 + i is residual block i)")
    found = {}
    for i, h in enumerate(self._encoder(x, train=train, rngs=rngs)):
      if i in layers:
        found[i] = h.astype(jnp.float32)
      if len(found) == len(set(layers)):
        break
    return [found[i] for i in layers]

  def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    h_in, w_in = x.shape[1:3]
    if h_in % 4 or w_in % 4 or h_in < 8 or w_in < 8 or x.shape[-1] != self.in_channels:
      raise ValueError(f"ResNet generator ({self.in_channels} channels) got input {x.shape}: "
                       "height and width must be multiples of 4 and >= 8")
    if train and self.use_dropout and self.n_blocks and rngs is None:
      raise ValueError("ResnetGenerator(train=True) with dropout needs rngs with a 'dropout' "
                       "stream")
    for h in self._encoder(x, train=train, rngs=rngs):
      pass
    for conv, norm in zip(self.ups, self.up_norms):
      h = nnx.relu(apply_norm(norm, conv(h), train))
    h = self.conv_out(reflect_pad(h, 3))
    return jnp.tanh(h).astype(jnp.float32)
