"""ResNet-50 classifier (bottleneck blocks) in the two layouts ImageNet weights come in.

`variant='v1.5'` is torchvision/timm (stride in the 3x3 conv, bias-free convs, BN eps 1e-5);
`variant='v1'` is Keras `applications.ResNet50` (stride in the first 1x1 conv, convs with bias,
BN eps 1.001e-5). Keeping both exact lets `pretrained.py` load either family without retraining
the statistics. `features` / `head` are split so that Grad-CAM differentiates the head with
respect to the last feature map and FID pools the same map.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cxr_jax.errors import ConfigError

VARIANTS = ("v1.5", "v1")
RESNET50_STAGES = (3, 4, 6, 3)
EXPANSION = 4

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch nn.Linear default: U(+-1/sqrt(fan_in)) for the kernel and the bias.
_dense_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Explicit symmetric padding as PyTorch/Keras use it ('SAME' is asymmetric at stride 2)."""
  return ((k // 2, k // 2), (k // 2, k // 2))


class _ConvBN(nnx.Module):
  """Conv followed by BatchNorm, the unit every ResNet layer is made of."""

  def __init__(self, cin: int, cout: int, k: int, stride: int, *, v1: bool, momentum: float,
               eps: float, zero_scale: bool, rngs: nnx.Rngs, dtype, param_dtype):
    self.conv = nnx.Conv(cin, cout, (k, k), strides=stride, padding=_pad(k), use_bias=v1,
                         kernel_init=_conv_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.bn = nnx.BatchNorm(cout, momentum=momentum, epsilon=eps, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs,
                            scale_init=(nnx.initializers.zeros_init() if zero_scale
                                        else nnx.initializers.ones_init()))

  def __call__(self, x, train: bool):
    return self.bn(self.conv(x), use_running_average=not train)


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 -> 1x1 (x4) residual block; `proj` is the 1x1 projection shortcut."""

  def __init__(self, cin: int, width: int, stride: int, *, v1: bool, momentum: float, eps: float,
               zero_init_last_bn: bool, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(v1=v1, momentum=momentum, eps=eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    cout = width * EXPANSION
    # v1 (Keras, original paper) strides in the first 1x1 conv, v1.5 (torchvision) in the 3x3.
    self.c1 = _ConvBN(cin, width, 1, stride if v1 else 1, zero_scale=False, **kw)
    self.c2 = _ConvBN(width, width, 3, 1 if v1 else stride, zero_scale=False, **kw)
    self.c3 = _ConvBN(width, cout, 1, 1, zero_scale=zero_init_last_bn, **kw)
    self.proj = (_ConvBN(cin, cout, 1, stride, zero_scale=False, **kw)
                 if stride != 1 or cin != cout else None)

  def __call__(self, x, train: bool):
    y = nnx.relu(self.c1(x, train))
    y = nnx.relu(self.c2(y, train))
    y = self.c3(y, train)
    shortcut = self.proj(x, train) if self.proj is not None else x
    return nnx.relu(y + shortcut)


class ResNet(nnx.Module):
  """ResNet with bottleneck blocks; defaults give ResNet-50 (23.5 M params with a 3-class head).

  Tests use `stage_sizes=(1, 1, 1, 1), width=8`. Input: NHWC, already normalised (see
  `pretrained.normalize`).
  """

  def __init__(self, *, num_classes: int, in_channels: int = 3,
               stage_sizes: Sequence[int] = RESNET50_STAGES, width: int = 64,
               variant: str = "v1.5", zero_init_last_bn: bool = False,
               bn_momentum: float | None = None, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    if variant not in VARIANTS:
      raise ConfigError(f"model.variant must be one of {VARIANTS}, got {variant!r}")
    if in_channels < 1 or num_classes < 1 or width < 1 or not stage_sizes or min(stage_sizes) < 1:
      raise ConfigError(f"ResNet: invalid in_channels={in_channels}, num_classes={num_classes}, "
                        f"width={width} or stage_sizes={tuple(stage_sizes)}")
    v1 = variant == "v1"
    # PyTorch BN momentum 0.1 == flax 0.9; Keras BatchNormalization default momentum 0.99.
    momentum = bn_momentum if bn_momentum is not None else (0.99 if v1 else 0.9)
    eps = 1.001e-5 if v1 else 1e-5
    self.variant = variant
    self.in_channels = in_channels
    self.num_classes = num_classes
    self.stage_sizes = tuple(int(s) for s in stage_sizes)
    self.width = width
    self.dtype = dtype
    kw = dict(v1=v1, momentum=momentum, eps=eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.stem = _ConvBN(in_channels, width, 7, 2, zero_scale=False, **kw)
    stages = []
    cin = width
    for i, n in enumerate(self.stage_sizes):
      w = width * 2**i
      blocks = []
      for b in range(n):
        blocks.append(Bottleneck(cin, w, 2 if (b == 0 and i > 0) else 1,
                                 zero_init_last_bn=zero_init_last_bn, **kw))
        cin = w * EXPANSION
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.num_features = cin
    self.fc = nnx.Linear(cin, num_classes, kernel_init=_dense_init,
                         bias_init=_torch_linear_bias_init(cin), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

  def features(self, x, *, train: bool) -> jax.Array:
    """Output of the last stage, [N, H/32, W/32, 4*8*width], float32."""
    x = jnp.asarray(x, self.dtype)
    x = nnx.relu(self.stem(x, train))
    # Max-pool pads with -inf (torchvision); Keras pads with 0, equal after the ReLU.
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in self.stages:
      for block in stage:
        x = block(x, train)
    return x.astype(jnp.float32)

  def head(self, fmap: jax.Array) -> jax.Array:
    """Global average pool (in float32) + dense: logits [N, num_classes], float32."""
    pooled = jnp.mean(jnp.asarray(fmap, jnp.float32), axis=(1, 2))
    return self.fc(pooled).astype(jnp.float32)

  def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    del rngs  # no dropout in ResNet; the argument keeps the models' call signature uniform
    return self.head(self.features(x, train=train))


def _torch_linear_bias_init(fan_in: int):
  bound = 1.0 / fan_in**0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init
