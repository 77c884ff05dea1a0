"""CycleGAN pieces: the ResNet generator against a NumPy re-implementation of the reference's
PyTorch layers (read through `reference_keys`), exact parameter counts, the transposed conv's
PyTorch geometry, the losses by hand, the history pool's semantics (also jitted and sharded), and
the config."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cxr_jax import configlib
from cxr_jax.errors import ConfigError
from cxr_jax.models import build
from cxr_jax.models import resnet_generator as rg
from cxr_jax.models.resnet_generator import ResnetGenerator
from cxr_jax.training import cyclegan
from cxr_jax.training import export
from cxr_jax.training import fit
from cxr_jax.training import gan
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training import pixels
from cxr_jax.training import translator
from cxr_jax.training.functional import Functional

from conftest import REPO_ROOT, assert_resumed_equals_uninterrupted, train_interrupted_and_resumed
from conftest import assert_networks_moved, two_steps_on_each_mesh


def abstract(ctor):
  return nnx.eval_shape(lambda: ctor(rngs=nnx.Rngs(0)))


def n_params(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def filled(ctor, seed: int = 0):
  """An abstract model filled from NumPy with values far from the initialisers' (random biases,
  BN scales / statistics), so that a wrong mapping or a missing term shows in the output."""
  model = abstract(ctor)
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      name = path[-1]
      if name == "kernel":
        fan_in = int(np.prod(var.shape[:-1]))
        value = rng.normal(0.0, 1.5 / np.sqrt(fan_in), var.shape)
      elif name in ("scale", "var"):
        value = rng.uniform(0.5, 1.5, var.shape)
      else:
        value = rng.normal(0.0, 0.3, var.shape)
      var.set_value(jnp.asarray(value, jnp.float32))
  return model


def flat_state(model) -> dict[str, nnx.Variable]:
  """Our parameters and batch statistics by dotted path ('blocks.0.conv1.kernel')."""
  return {".".join(str(p) for p in path): var for path, var in nnx.iter_graph(model)
          if isinstance(var, (nnx.Param, nnx.BatchStat))}


def to_reference_state_dict(model, keys: dict[str, str]) -> dict[str, np.ndarray]:
  """As the module docstring says: 4-D kernels -> torch layout by transpose(3, 2, 0, 1)."""
  ours = flat_state(model)
  assert set(ours) == set(keys), set(ours) ^ set(keys)  # one to one, nothing left over
  arrays = {k: np.asarray(v[...]) for k, v in ours.items()}
  return {keys[k]: (v.transpose(3, 2, 0, 1) if v.ndim == 4 else v) for k, v in arrays.items()}


# --------------------------------------------- PyTorch layer semantics in NumPy (NCHW, OIHW)


def np_conv(x, w, b, stride=1, pad=0):
  """Conv2d with zero padding; w [O, I, kh, kw]."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  kh, kw = w.shape[2:]
  ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], ho, wo))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
  return out if b is None else out + b[None, :, None, None]


def np_conv_transpose(x, w, b, stride, pad, output_padding):
  """ConvTranspose2d by its definition: each input pixel scatters w[in, out] at stride s, then
  `pad` is cropped from each side and `output_padding` rows/columns extend the far side."""
  n, _, h, wd = x.shape
  k = w.shape[2]
  full = np.zeros((n, w.shape[1], (h - 1) * stride + k + output_padding,
                   (wd - 1) * stride + k + output_padding))
  for iy in range(h):
    for ix in range(wd):
      full[:, :, iy * stride:iy * stride + k, ix * stride:ix * stride + k] += np.einsum(
          "nc,cokl->nokl", x[:, :, iy, ix], w)
  ho = (h - 1) * stride - 2 * pad + k + output_padding
  wo = (wd - 1) * stride - 2 * pad + k + output_padding
  out = full[:, :, pad:pad + ho, pad:pad + wo]
  return out if b is None else out + b[None, :, None, None]


def np_reflect(x, p):
  return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), mode="reflect")


def np_norm(x, sd, key):
  """InstanceNorm2d(affine=False) when the key has no parameters, else BatchNorm2d in eval."""
  if f"{key}.weight" in sd:
    mean, var = sd[f"{key}.running_mean"], sd[f"{key}.running_var"]
    scale, shift = sd[f"{key}.weight"], sd[f"{key}.bias"]
    return ((x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
            * scale[None, :, None, None] + shift[None, :, None, None])
  mean = x.mean(axis=(2, 3), keepdims=True)
  var = x.var(axis=(2, 3), keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5)


def np_resnet_generator(x, sd, n_blocks):
  """The reference `ResnetGenerator` (no dropout), reading its own state-dict keys."""
  relu = lambda z: np.maximum(z, 0.0)  # noqa: E731

  def conv(h, key, **kw):
    return np_conv(h, sd[f"{key}.weight"], sd.get(f"{key}.bias"), **kw)

  h = relu(np_norm(conv(np_reflect(x, 3), "model.1"), sd, "model.2"))
  h = relu(np_norm(conv(h, "model.4", stride=2, pad=1), sd, "model.5"))
  h = relu(np_norm(conv(h, "model.7", stride=2, pad=1), sd, "model.8"))
  for i in range(n_blocks):
    key = f"model.{10 + i}.conv_block"
    r = relu(np_norm(conv(np_reflect(h, 1), f"{key}.1"), sd, f"{key}.2"))
    h = h + np_norm(conv(np_reflect(r, 1), f"{key}.5"), sd, f"{key}.6")
  k = 10 + n_blocks
  for j in range(2):
    key = f"model.{k + 3 * j}"
    h = np_conv_transpose(h, sd[f"{key}.weight"], sd.get(f"{key}.bias"), 2, 1, 1)
    h = relu(np_norm(h, sd, f"model.{k + 1 + 3 * j}"))
  return np.tanh(conv(np_reflect(h, 3), f"model.{k + 7}"))


# ------------------------------------------------------------------------- ResNet generator


def test_resnet_generator_parameter_counts_by_hand():
  def count(ngf, blocks, cin, cout, instance):
    b = 1 if instance else 0  # conv biases only with instance norm (the last conv always)
    bn = 0 if instance else 2  # BatchNorm scale + shift per channel
    n = 49 * cin * ngf + b * ngf + bn * ngf                         # 7x7 in
    n += 9 * ngf * 2 * ngf + (b + bn) * 2 * ngf                      # down 1
    n += 9 * 2 * ngf * 4 * ngf + (b + bn) * 4 * ngf                  # down 2
    n += blocks * 2 * (9 * 4 * ngf * 4 * ngf + (b + bn) * 4 * ngf)   # residual blocks
    n += 9 * 4 * ngf * 2 * ngf + (b + bn) * 2 * ngf                  # up 1
    n += 9 * 2 * ngf * ngf + (b + bn) * ngf                          # up 2
    return n + 49 * ngf * cout + cout                                # 7x7 out
  # The reference prints "Total number of parameters : 11.378 M" for resnet_9blocks 3 -> 3.
  assert count(64, 9, 3, 3, True) == 11_378_179
  assert n_params(abstract(lambda rngs: ResnetGenerator(in_channels=3, out_channels=3,
                                                        rngs=rngs))) == 11_378_179
  # 1 -> 1: two input and two output channels fewer on each 7x7 conv, two output biases fewer.
  assert count(64, 9, 1, 1, True) == 11_378_179 - 4 * 49 * 64 - 2 == 11_365_633
  assert n_params(abstract(lambda rngs: ResnetGenerator(rngs=rngs))) == count(64, 9, 1, 1, True)
  assert n_params(abstract(lambda rngs: ResnetGenerator(norm="batch", rngs=rngs))) == count(
      64, 9, 1, 1, False)
  assert n_params(abstract(lambda rngs: ResnetGenerator(ngf=16, n_blocks=2, rngs=rngs))) == count(
      16, 2, 1, 1, True)


def test_resnet_generator_shape_and_range_at_64_px():
  model = nnx.jit(lambda: ResnetGenerator(ngf=4, n_blocks=2,
                                          rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))))()
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 1)), jnp.float32)
  y = nnx.jit(lambda m, x: m(x, train=True))(model, x)
  assert y.shape == (2, 64, 64, 1) and y.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(y))) <= 1.0 and float(jnp.std(y)) > 0
  kernels = np.asarray(model.blocks[0].conv1.kernel[...])
  assert abs(kernels.std() - 0.02) < 0.003 and abs(kernels.mean()) < 0.002  # N(0, 0.02)
  assert float(jnp.max(jnp.abs(model.conv_out.bias[...]))) == 0.0


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_resnet_generator_is_the_reference_network_layer_for_layer(norm):
  """Our forward pass equals the reference's layers computed in NumPy from the state dict our
  parameters map to: pads, convs, norms, skips, transposed convs, keys and layouts all agree."""
  n_blocks = 2
  model = filled(lambda rngs: ResnetGenerator(ngf=2, n_blocks=n_blocks, norm=norm, rngs=rngs))
  sd = to_reference_state_dict(model, rg.reference_keys(n_blocks, norm))
  x = np.random.default_rng(1).uniform(-1, 1, (2, 12, 8, 1)).astype(np.float32)  # not square
  got = np.asarray(model(jnp.asarray(x), train=False))
  want = np_resnet_generator(x.transpose(0, 3, 1, 2).astype(np.float64), sd, n_blocks)
  assert got.shape == (2, 12, 8, 1)
  assert np.std(want) > 0.05  # the values exercise tanh away from its flat ends
  np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def test_reference_keys_of_resnet_9blocks():
  keys = rg.reference_keys()
  assert keys["conv_in.kernel"] == "model.1.weight"
  assert keys["downs.1.bias"] == "model.7.bias"
  assert keys["blocks.8.conv2.kernel"] == "model.18.conv_block.5.weight"
  assert keys["ups.0.kernel"] == "model.19.weight" and keys["ups.1.kernel"] == "model.22.weight"
  assert keys["conv_out.bias"] == "model.26.bias"
  assert len(keys) == 2 * (1 + 2 + 18 + 2 + 1)
  batch = rg.reference_keys(norm="batch", use_dropout=True)
  assert "conv_in.bias" not in batch and batch["conv_out.bias"] == "model.26.bias"
  assert batch["blocks.0.conv2.kernel"] == "model.10.conv_block.6.weight"
  assert batch["blocks.0.norm2.mean"] == "model.10.conv_block.7.running_mean"
  assert batch["up_norms.1.var"] == "model.23.running_var"
  dropout_model = abstract(lambda rngs: ResnetGenerator(ngf=2, n_blocks=3, norm="batch",
                                                        use_dropout=True, rngs=rngs))
  assert set(flat_state(dropout_model)) == set(rg.reference_keys(3, "batch", True))


def test_transposed_conv_has_pytorch_geometry():
  """ConvTranspose2d(k3, s2, padding 1, output_padding 1) on a 2x2 input, by hand: each input
  pixel adds its value times a 3x3 block of ones at (2 iy - 1, 2 ix - 1); the output is 4x4."""
  model = filled(lambda rngs: ResnetGenerator(ngf=1, n_blocks=0, rngs=rngs))
  up = model.ups[0]  # 4 -> 2 channels; kernel (kh, kw, out, in)
  kernel = np.zeros(up.kernel.shape, np.float32)
  kernel[:, :, 0, 0] = 1.0
  up.kernel.set_value(jnp.asarray(kernel))
  up.bias.set_value(jnp.zeros(up.bias.shape))
  x = np.zeros((1, 2, 2, 4), np.float32)
  x[0, :, :, 0] = [[1, 2], [3, 4]]
  y = np.asarray(up(jnp.asarray(x)))
  assert y.shape == (1, 4, 4, 2)
  np.testing.assert_array_equal(y[0, :, :, 0], [[1, 3, 2, 2], [4, 10, 6, 6], [3, 7, 4, 4],
                                                [3, 7, 4, 4]])
  assert not y[..., 1].any()
  # A random kernel on a non-square input against the definition (torch weight layout).
  model = filled(lambda rngs: ResnetGenerator(ngf=1, n_blocks=0, rngs=rngs), seed=3)
  up = model.ups[0]
  x = np.random.default_rng(2).normal(size=(2, 3, 5, 4)).astype(np.float32)
  torch_weight = np.asarray(up.kernel[...]).transpose(3, 2, 0, 1)  # (in, out, kh, kw)
  want = np_conv_transpose(x.transpose(0, 3, 1, 2), torch_weight, np.asarray(up.bias[...]), 2,
                           1, 1)
  np.testing.assert_allclose(np.asarray(up(jnp.asarray(x))), want.transpose(0, 2, 3, 1),
                             rtol=1e-5, atol=1e-5)


def test_reflect_padding_by_hand():
  x = jnp.asarray([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 4, 1) * jnp.ones((1, 3, 1, 1))
  y = np.asarray(rg.reflect_pad(x, 2))[0, :, :, 0]
  assert y.shape == (7, 8)
  np.testing.assert_array_equal(y[3], [3, 2, 1, 2, 3, 4, 3, 2])  # the edge is not repeated
  z = np.asarray(rg.reflect_pad(jnp.arange(9.0).reshape(1, 3, 3, 1), 1))[0, :, :, 0]
  np.testing.assert_array_equal(z[:, 0], [4, 1, 4, 7, 4])  # column 1 mirrored, corners too
  np.testing.assert_array_equal(z[0], [4, 3, 4, 5, 4])


def test_resnet_generator_dropout_and_bf16():
  model = filled(lambda rngs: ResnetGenerator(ngf=2, n_blocks=1, use_dropout=True, rngs=rngs,
                                              dtype=jnp.bfloat16))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 8, 8, 1)), jnp.float32)
  with pytest.raises(ValueError, match="dropout"):
    model(x, train=True)
  evals = model(x, train=False)
  assert evals.dtype == jnp.float32 and model.conv_in.kernel[...].dtype == jnp.float32
  np.testing.assert_array_equal(evals, model(x, train=False))  # no dropout in eval
  a = model(x, train=True, rngs=nnx.Rngs(dropout=1))
  b = model(x, train=True, rngs=nnx.Rngs(dropout=2))
  assert not np.array_equal(a, b)


def test_resnet_generator_rejects_bad_sizes():
  with pytest.raises(ConfigError, match="data.image_size"):
    rg.check_image_size(30)
  with pytest.raises(ConfigError, match="data.image_size"):
    rg.check_image_size(4)
  assert rg.check_image_size(64) == 64
  model = abstract(lambda rngs: ResnetGenerator(ngf=2, n_blocks=1, rngs=rngs))
  with pytest.raises(ValueError, match="multiples of 4"):
    model(jnp.zeros((1, 30, 32, 1)), train=False)
  with pytest.raises(ConfigError, match="norm"):
    ResnetGenerator(norm="group", rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------ losses


def test_generator_loss_by_hand():
  real_a, real_b = jnp.array([0.0, 0.0]), jnp.array([1.0, -1.0])
  total, parts = cyclegan.generator_loss(
      real_a=real_a, real_b=real_b,
      rec_a=jnp.array([0.5, -0.5]),          # |.| = 0.5
      rec_b=jnp.array([1.0, -0.8]),          # |.| = 0.1
      same_a=jnp.array([0.2, 0.0]),          # |.| = 0.1
      same_b=jnp.array([0.0, -1.0]),         # |.| = 0.5
      d_b_fake_b_logits=jnp.array([0.5, 1.0]),   # LSGAN vs 1: (0.25 + 0) / 2
      d_a_fake_a_logits=jnp.zeros((1, 2, 2, 1)),  # 1
      kind="lsgan", lambda_a=10.0, lambda_b=4.0, lambda_identity=0.5)
  want = {"adv_ab": 0.125, "adv_ba": 1.0, "cycle_a": 10 * 0.5, "cycle_b": 4 * 0.1,
          "idt_ab": 4 * 0.5 * 0.5, "idt_ba": 10 * 0.5 * 0.1}
  assert set(parts) == set(want)
  for k, v in want.items():
    assert float(parts[k]) == pytest.approx(v, rel=1e-6), k
  assert float(total) == pytest.approx(sum(want.values()), rel=1e-6)
  # No identity terms: they are zero and the identity images may be absent.
  total0, parts0 = cyclegan.generator_loss(
      real_a=real_a, real_b=real_b, rec_a=real_a, rec_b=real_b, same_a=None, same_b=None,
      d_b_fake_b_logits=jnp.ones(2), d_a_fake_a_logits=jnp.ones(2), kind="lsgan",
      lambda_identity=0.0)
  assert float(total0) == 0.0 and float(parts0["idt_ab"]) == 0.0
  with pytest.raises(ValueError, match="same_a"):
    cyclegan.generator_loss(real_a=real_a, real_b=real_b, rec_a=real_a, rec_b=real_b,
                            same_a=None, same_b=None, d_b_fake_b_logits=jnp.ones(2),
                            d_a_fake_a_logits=jnp.ones(2), kind="lsgan")


def test_discriminator_loss_is_halved_by_hand():
  """The one discriminator loss every translator's discriminators use (gan.update_discriminator)."""
  # vs 1: (0 + 1) / 2; vs 0: 0.25
  d = gan.discriminator_loss(jnp.array([1.0, 0.0]), jnp.array([0.5]), "lsgan")
  assert float(d) == pytest.approx(0.5 * (0.5 + 0.25))
  d = gan.discriminator_loss(jnp.zeros(2), jnp.zeros(2), "bce")
  assert float(d) == pytest.approx(np.log(2.0), rel=1e-6)  # 0.5 * (log 2 + log 2)


def test_one_discriminator_update_is_a_step_on_the_halved_loss():
  """gan.update_discriminator: Adam's first step on 0.5 * (lsgan(D(real), 1) + lsgan(D(fake), 0)),
  fakes constant; its metrics by hand."""
  config = load("smoke")
  disc = build.build_patchgan(in_channels=1, ndf=4, n_layers=1, norm="instance",
                              compute_dtype="float32", seed=0)
  net, params, stats = Functional.split(disc)
  state = fit.NetState.create(params, stats, optax.sgd(0.1))
  rng = np.random.default_rng(0)
  real, fake = (jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 1)), jnp.float32) for _ in range(2))
  new, metrics = gan.update_discriminator(net, state, real, fake, config.gan_loss, prefix="d_x_")

  def loss(p):
    r, _ = net.apply(p, stats, real, train=True)
    f, _ = net.apply(p, stats, fake, train=True)
    return 0.5 * (jnp.mean((r - 1.0) ** 2) + jnp.mean(f**2)), (r, f)

  (want, (r, f)), grads = jax.value_and_grad(loss, has_aux=True)(params)
  assert float(metrics["d_x_loss"]) == pytest.approx(float(want), rel=1e-6)
  assert float(metrics["d_x_acc_real"]) == pytest.approx(float(jnp.mean(r > 0.5)))
  assert float(metrics["d_x_acc_fake"]) == pytest.approx(float(jnp.mean(f < 0.5)))
  for p, g, q in zip(jax.tree.leaves(params), jax.tree.leaves(grads), jax.tree.leaves(new.params)):
    np.testing.assert_allclose(np.asarray(q), np.asarray(p - 0.1 * g), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ history pool


def ids(values, shape=(2, 2, 1)):
  """Images whose every pixel is their id: which image came out is read off any pixel."""
  return jnp.asarray(np.asarray(values, np.float32)[:, None, None, None] * np.ones(shape))


def check_query(stored, count, size, inputs, outputs, new_pool):
  """Replays the reference's rules on the ids: returns the stored ids it implies, and how many
  outputs were swapped; fails if any output breaks the rules."""
  stored = list(stored)
  swaps = 0
  for image, out in zip(inputs, outputs):
    if count < size:
      assert out == image
      stored[count] = image
      count += 1
    elif out != image:  # a swap: a formerly stored image comes out, the new one takes its slot
      assert out in stored[:size], (out, stored)
      stored[stored.index(out)] = image
      swaps += 1
  np.testing.assert_array_equal(np.asarray(new_pool.images)[:, 0, 0, 0], stored)
  assert int(new_pool.count) == count
  return stored, count, swaps


def test_pool_fills_then_swaps_with_probability_one_half():
  size = 5
  pool = cyclegan.pool_init(size, (2, 2, 1))
  assert pool.images.shape == (5, 2, 2, 1) and pool.images.dtype == jnp.float32
  assert pool.count.dtype == jnp.int32 and int(pool.count) == 0
  query = jax.jit(cyclegan.pool_query)
  stored, count, next_id, swaps, full_queries = [0.0] * size, 0, 1, 0, 0
  for step in range(60):
    batch = [float(next_id + i) for i in range(3)]
    next_id += 3
    out, new_pool = query(pool, ids(batch), jax.random.key(step))
    assert out.shape == (3, 2, 2, 1) and out.dtype == jnp.float32
    outs = np.asarray(out)
    assert (outs == outs[:, :1, :1, :]).all()  # whole images, never mixed
    full_queries += sum(1 for i in range(3) if count + i >= size)
    stored, count, s = check_query(stored, count, size, batch, list(outs[:, 0, 0, 0]), new_pool)
    swaps += s
    pool = new_pool
    if step == 0:
      assert count == 3 and list(outs[:, 0, 0, 0]) == batch  # filling: inputs come back
  assert count == size
  assert 0.35 < swaps / full_queries < 0.65, (swaps, full_queries)


def test_pool_swap_share_and_slots_over_many_draws():
  size, n = 50, 4000
  out, pool = jax.jit(cyclegan.pool_query)(cyclegan.pool_init(size, (1, 1, 1)),
                                           ids(np.arange(1, n + 1), (1, 1, 1)),
                                           jax.random.key(7))
  out = np.asarray(out)[:, 0, 0, 0]
  swapped = out != np.arange(1, n + 1)
  assert not swapped[:size].any()
  share = swapped[size:].mean()
  assert 0.46 < share < 0.54, share  # 0.5 +- 5 standard deviations
  # The swapped-out images were stored earlier, each at most once; slots are drawn uniformly.
  returned = out[swapped]
  assert (returned < np.arange(1, n + 1)[swapped]).all()
  assert len(set(returned)) == len(returned)
  stored, *_ = check_query([0.0] * size, 0, size, list(np.arange(1, n + 1.0)), list(out), pool)
  assert int(pool.count) == size and len(set(stored)) == size
  first_fill = np.arange(1, size + 1)
  assert not np.isin(first_fill, stored).any()  # after ~2000 swaps every slot was replaced


def test_pool_is_deterministic_per_key_and_stops_gradients():
  pool = cyclegan.pool_init(2, (1, 1, 1))
  _, pool = cyclegan.pool_query(pool, ids([1, 2], (1, 1, 1)), jax.random.key(0))
  batch = ids(np.arange(3, 40), (1, 1, 1))
  a = cyclegan.pool_query(pool, batch, jax.random.key(1))
  b = cyclegan.pool_query(pool, batch, jax.random.key(1))
  c = cyclegan.pool_query(pool, batch, jax.random.key(2))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0])
  grad = jax.grad(lambda x: jnp.sum(cyclegan.pool_query(pool, x, jax.random.key(1))[0]))(batch)
  assert not np.asarray(grad).any()
  # Size 0: no pool, the images pass through.
  out, empty = cyclegan.pool_query(cyclegan.pool_init(0, (1, 1, 1)), batch, jax.random.key(0))
  np.testing.assert_array_equal(out, batch)
  assert empty.images.shape == (0, 1, 1, 1)
  with pytest.raises(ConfigError, match="pool_size"):
    cyclegan.pool_init(-1, (1, 1, 1))


def test_pool_sharded_equals_single_device():
  mesh = mesh_lib.make_mesh(4)
  rep, batch_sh = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
  rng = np.random.default_rng(0)
  pool = cyclegan.Pool(jnp.asarray(rng.normal(size=(6, 4, 4, 1)), jnp.float32),
                       jnp.asarray(4, jnp.int32))  # 2 free slots: fills, then swaps
  images = jnp.asarray(rng.normal(size=(8, 4, 4, 1)), jnp.float32)
  key = jax.random.key(5)
  want = cyclegan.pool_query(pool, images, key)
  for images_sharding in (rep, batch_sh):
    step = jax.jit(cyclegan.pool_query, in_shardings=(rep, images_sharding, rep),
                   out_shardings=rep)
    got = step(mesh_lib.put_replicated(pool, mesh), jax.device_put(images, images_sharding),
               jax.device_put(key, rep))
    assert got[0].sharding.is_fully_replicated and len(got[0].sharding.device_set) == 4
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  swapped = ~np.isclose(np.asarray(want[0]), np.asarray(images)).all(axis=(1, 2, 3))
  assert not swapped[:2].any() and swapped[2:].any()  # the case has both fills and swaps


# ------------------------------------------------------------------------------------ config


def load(variant=""):
  return configlib.load_config_file(REPO_ROOT / "configs/cyclegan.py", variant)


def test_config_defaults_are_the_reference_settings():
  c = load()
  assert (c.task, c.translator) == ("translator", "cyclegan")
  assert (c.source_class, c.target_class) == ("NORMAL", "COVID")
  assert (c.data.image_size, c.batch_size, c.model.generator, c.model.n_blocks) == (
      256, 1, "resnet", 9)
  assert (c.model.ngf, c.model.ndf, c.model.n_layers_d, c.model.norm) == (64, 64, 3, "instance")
  assert (c.gan_loss, c.lambda_a, c.lambda_b, c.lambda_identity, c.pool_size) == (
      "lsgan", 10.0, 10.0, 0.5, 50)
  assert (c.learning_rate, c.beta1, c.num_epochs, c.decay_epochs) == (2e-4, 0.5, 200, 100)
  assert not c.model.use_dropout
  pix2pix = configlib.load_config_file(REPO_ROOT / "configs/pix2pix.py")
  shared = ("data", "seed", "batch_size", "num_epochs", "decay_epochs", "learning_rate", "beta1",
            "beta2", "steps_per_call", "log_every", "sample_every", "checkpoint_every",
            "keep_checkpoints", "num_samples", "compute_dtype", "num_devices", "multihost",
            "augment", "source_class", "target_class")
  for key in shared:
    assert key in c and type(c[key]) is type(pix2pix[key]), key
  assert c.augment.to_dict().keys() == pix2pix.augment.to_dict().keys()
  with pytest.raises(ValueError, match="unknown variant"):
    load("gpu")


@pytest.mark.parametrize("variant,size", [("cpu", 64), ("smoke", 32)])
def test_config_variants_build_their_networks(variant, size):
  c = load(variant)
  assert c.data.image_size == size
  for generator in ("resnet", "unet"):
    c.model.generator = generator
    arch = build.generator_arch(c.model)
    build.check_generator_size(arch, size)
    out = nnx.eval_shape(lambda: build.GENERATORS[generator](
        arch, image_size=size, channels=1, dtype=jnp.float32, rngs=nnx.Rngs(0))(
            jnp.zeros((c.batch_size, size, size, 1)), train=False))
    assert out.shape == (c.batch_size, size, size, 1)
  c.model.generator = "resnet"
  _, _, _, d_b = cyclegan.build_networks(c, size, 1, abstract=True)
  assert d_b.convs[0].kernel.shape[2] == 1  # unconditional: one image, not a pair
  c.model.generator = "resnet_9"
  with pytest.raises(ConfigError, match="config.model.generator"):
    cyclegan.CycleGAN.check_config(c)
  c.model.generator = "resnet"
  c.data.image_size = size + 2
  with pytest.raises(ConfigError, match="data.image_size"):
    cyclegan.CycleGAN.check_config(c)


# ----------------------------------------------------------------------------------- trainer


def smoke(**overrides):
  config = load("smoke")
  config.update(overrides)
  return config


def test_sharded_step_equals_single_device_and_steps_learn():
  """Two steps on 1 and on 4 devices give the same losses, pools and networks (compared by their
  outputs: a conv bias before instance norm has no gradient but rounding noise, which Adam turns
  into +-lr steps, so such parameters differ by rounding while the outputs do not). Six more
  steps on one device: the pools fill to their size on the device, the cycle loss falls, all four
  networks move."""
  config = smoke(batch_size=4, pool_size=6)
  config.model.n_blocks, config.model.n_layers_d = 0, 1   # a smaller program to compile

  def outputs(model, st, probe):
    return [model.gen.apply(st.g_ab.params, st.g_ab.stats, probe, train=False)[0],
            model.gen.apply(st.g_ba.params, st.g_ba.stats, probe, train=False)[0],
            model.disc.apply(st.d_a.params, st.d_a.stats, probe, train=False)[0],
            model.disc.apply(st.d_b.params, st.d_b.stats, probe, train=False)[0]]

  results, single = two_steps_on_each_mesh(
      lambda mesh: cyclegan.CycleGAN(config, image_size=32, steps_per_epoch=3, mesh=mesh), outputs)
  (m1, st1, o1), (m4, st4, o4) = results
  for k in ("g_loss", "g_cycle_a", "g_cycle_b", "g_idt_ab", "d_a_loss", "d_b_loss"):
    np.testing.assert_allclose(m1[k], m4[k], rtol=1e-4, err_msg=k)
  for p1, p4 in ((st1.pool_a, st4.pool_a), (st1.pool_b, st4.pool_b)):
    assert int(p1.count) == int(p4.count) == 6      # 2 steps x 4 images, capped at 6
    np.testing.assert_allclose(p1.images, p4.images, rtol=1e-4, atol=1e-5)
  for x, y in zip(o1, o4):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-4)

  model, chunk, state, data, first = single
  init = model.init_state()  # the pools start empty
  assert int(init.pool_b.count) == 0 and init.pool_b.images.shape == (6, 32, 32, 1)
  later = []
  for _ in range(3):
    state, m = chunk(state, data, np.int32(2))
    later.append(jax.device_get(m))
  assert int(state.step) == 8
  cycle = lambda m: np.asarray(m["g_cycle_a"]) + np.asarray(m["g_cycle_b"])
  assert cycle(later[-1]).mean() < cycle(jax.device_get(first)).mean()
  total = sum(np.asarray(later[-1]["g_" + k]) for k in ("adv_ab", "adv_ba", "cycle_a", "cycle_b",
                                                        "idt_ab", "idt_ba"))
  np.testing.assert_allclose(np.asarray(later[-1]["g_loss"]), total, rtol=1e-5)
  assert_networks_moved(model, state, ("g_ab", "g_ba", "d_a", "d_b"))


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
  """configs/cyclegan.py:smoke run uninterrupted, and interrupted after its step-4 checkpoint,
  then resumed (the history pools are half full then: resume must restore them)."""
  config = load("smoke")
  return (config, *train_interrupted_and_resumed(cyclegan.CycleGAN, config,
                                                 tmp_path_factory.mktemp("cyclegan")))


def test_resume_equals_uninterrupted_bitwise(smoke_runs):
  _, _, full, run, resumed = smoke_runs
  assert_resumed_equals_uninterrupted(full, resumed, run, 12)  # 3 epochs of 19 // 4 steps


def test_export_load_translate_round_trip(smoke_runs, tmp_path):
  """The export is a plain generator export: G's weights, its arch, 'eval' inference (instance
  norm, no dropout), rebuilt by the shared builder and translating as G does."""
  config, full_dir, full, _, _ = smoke_runs
  gen = export.load_generator(full_dir / translator.GENERATOR_DIR)
  assert gen.meta["translator"] == "cyclegan" and gen.meta["inference"] == "eval"
  assert gen.meta["arch"] == {"name": "resnet", "ngf": 4, "n_blocks": 1, "norm": "instance",
                              "use_dropout": False}
  assert (gen.meta["source_class"], gen.meta["target_class"]) == ("NORMAL", "COVID")
  images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 1)).astype(np.uint8)
  module = build.build_generator(build.generator_arch(config.model), image_size=32, channels=1,
                                 compute_dtype="float32", seed=0)
  net, params, stats = Functional.split(module)
  nnx.replace_by_pure_dict(params, jax.device_get(nnx.to_pure_dict(gen.params)))
  want, _ = net.apply(params, stats, pixels.to_signed(jnp.asarray(images)), train=True)
  got = gen.translate(images, batch_size=4)

  def assert_one_level(a, b):
    """Two programs (the layers one by one and one jitted batch; batches of 4 and of 8) may sum
    in other orders, so a pixel on a half level may round the other way: one level, few pixels."""
    diff = np.abs(a.astype(int) - np.asarray(b).astype(int))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 0.002 * diff.size, np.count_nonzero(diff)

  assert_one_level(got, pixels.to_uint8(want))
  assert_one_level(got, gen.translate(images, batch_size=8))
  assert not np.array_equal(got[0], got[1])  # the output depends on the input
  # Saved again by hand and loaded by the one loader: the same translation.
  export.save(tmp_path / "g", params, stats, gen.meta)
  np.testing.assert_array_equal(
      export.load_generator(tmp_path / "g").translate(images, batch_size=4), got)


def test_exported_g_feeds_the_synthesize_task(smoke_runs, tmp_path):
  from cxr_jax import workdir as workdir_lib
  from cxr_jax.pipeline import synthesize

  _, full_dir, full, _, _ = smoke_runs
  config = configlib.load_config_file(REPO_ROOT / "configs/synthesize.py", "smoke")
  config.generator_dir = str(full_dir / translator.GENERATOR_DIR)
  out = workdir_lib.prepare(tmp_path / "syn", config)
  summary = synthesize.synthesize_task(config, out)
  counts = summary["train_counts"]
  assert summary["translator"] == "cyclegan"
  assert summary["num_synthetic"] == max(counts.values()) - counts["COVID"] > 0
  made = sorted((out / "synthetic/COVID").glob("*.png"))
  assert len(made) == summary["num_synthetic"]
  quality = json.loads((out / "synthetic/quality.json").read_text())
  assert quality["translator"] == "cyclegan" and quality["n_translated"] == counts["NORMAL"]
  assert quality["real_target"]["train"] == {"n": counts["COVID"], "seen_by_generator": True}
  assert (out / "synthetic/grid.png").exists()
