"""CUT's patch projection head (the reference's `PatchSampleF` with `use_mlp`, taesungp/
contrastive-unpaired-translation): per encoder layer, the features at the given patch positions
go through their own two-layer MLP (Linear, ReLU, Linear) and are L2-normalised.

The reference builds its MLPs at the first forward pass, from the feature shapes; here the channel
counts are given (`resnet_generator.encoder_channels`), so the head is an ordinary module. Its
linear layers start as the reference's CUT default: Xavier-normal with gain 0.02, zero bias.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

NORM_EPS = 1e-7   # the reference's Normalize: x / (|x|_2 + 1e-7)


def xavier_normal(gain: float):
  """torch.nn.init.xavier_normal_(gain): normal with std gain * sqrt(2 / (fan_in + fan_out))."""
  return nnx.initializers.variance_scaling(gain**2, "fan_avg", "normal")


class PatchMLP(nnx.Module):
  """[N, H, W, C_l] feature maps and [P_l] flat patch positions per layer l -> [N, P_l, dim]
  unit-norm embeddings (float32)."""

  def __init__(self, channels: Sequence[int], *, dim: int = 256, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, init_gain: float = 0.02):
    kw = dict(kernel_init=xavier_normal(init_gain), bias_init=nnx.initializers.zeros_init(),
              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dim = dim
    self.hidden = nnx.List([nnx.Linear(c, dim, **kw) for c in channels])
    self.out = nnx.List([nnx.Linear(dim, dim, **kw) for _ in channels])

  def __call__(self, feats: Sequence[jax.Array], patch_ids: Sequence[jax.Array], *,
               train: bool = True, rngs: nnx.Rngs | None = None) -> list[jax.Array]:
    del train, rngs   # no normalisation or dropout: both modes are the same
    if not len(feats) == len(patch_ids) == len(self.hidden):
      raise ValueError(f"PatchMLP of {len(self.hidden)} layers got {len(feats)} feature maps "
                       f"and {len(patch_ids)} patch id sets")
    out = []
    for feat, ids, hidden, last in zip(feats, patch_ids, self.hidden, self.out):
      n, h, w, c = feat.shape
      x = jnp.take(feat.reshape(n, h * w, c), ids, axis=1)
      x = last(nnx.relu(hidden(x))).astype(jnp.float32)
      out.append(x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + NORM_EPS))
    return out
