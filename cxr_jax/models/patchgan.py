"""70x70 PatchGAN discriminator, layer for layer as pix2pix `NLayerDiscriminator` (ndf 64,
n_layers 3): each output logit judges one 70x70 patch of the (condition, image) pair.

Reference details kept: 4x4 convs with padding 1, the first conv has a bias and no norm, the
normed convs are bias-free with BatchNorm (bias only with instance norm), LeakyReLU 0.2, a final
1-channel stride-1 conv giving logits (no sigmoid: the loss applies it). 256 px in -> 30x30 out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cxr_jax.models.layers import channel_aligned_conv

from cxr_jax.errors import ConfigError
from cxr_jax.models.unet import NORMS, apply_norm, conv_init, make_norm

_PAD1 = ((1, 1), (1, 1))


class PatchGAN(nnx.Module):
  """Input: channel concatenation of condition and real/fake image (2 channels for gray pairs)."""

  def __init__(self, *, in_channels: int = 2, ndf: int = 64, n_layers: int = 3,
               norm: str = "batch", rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    if norm not in NORMS:
      raise ConfigError(f"discriminator norm must be one of {NORMS}, got {norm!r}")
    if n_layers < 1 or ndf < 1 or in_channels < 1:
      raise ConfigError(f"PatchGAN: in_channels, ndf and n_layers must be >= 1, got "
                        f"{in_channels}, {ndf}, {n_layers}")
    self.dtype = dtype
    use_bias = norm == "instance"
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    convs = [nnx.Conv(in_channels, ndf, (4, 4), strides=2, padding=_PAD1, kernel_init=conv_init,
                      conv_general_dilated=channel_aligned_conv, **kw)]
    norms = []
    mult = 1
    for n in range(1, n_layers + 1):
      prev, mult = mult, min(2**n, 8)
      stride = 2 if n < n_layers else 1  # the last normed conv keeps the resolution
      convs.append(nnx.Conv(ndf * prev, ndf * mult, (4, 4), strides=stride, padding=_PAD1,
                            use_bias=use_bias, kernel_init=conv_init, **kw))
      norms.append(make_norm(norm, ndf * mult, **kw))
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.out = nnx.Conv(ndf * mult, 1, (4, 4), strides=1, padding=_PAD1, kernel_init=conv_init,
                        **kw)

  def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [N, h, w, 1], float32."""
    del rngs  # no dropout; uniform call signature
    h = nnx.leaky_relu(self.convs[0](jnp.asarray(x, self.dtype)), 0.2)
    for i, norm in enumerate(self.norms):
      h = nnx.leaky_relu(apply_norm(norm, self.convs[i + 1](h), train), 0.2)
    return self.out(h).astype(jnp.float32)
