"""Models: exact parameter counts of the reference architectures (abstract, nothing allocated),
shapes, BatchNorm/dropout train-vs-eval behaviour and bf16 compute, on narrow networks."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cxr_jax.errors import ConfigError
from cxr_jax.models import layers
from cxr_jax.models.layers import channel_aligned_conv
from cxr_jax.models.patchgan import PatchGAN
from cxr_jax.models.resnet import Bottleneck, ResNet
from cxr_jax.models.unet import UNet, up_conv


def rngs(seed: int = 0) -> nnx.Rngs:
  """'rbg' keys: on CPU each new init shape compiles ~8x faster than with threefry."""
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def build(ctor, seed: int = 0):
  """One jitted init instead of one small compile per parameter shape (and cached on disk)."""
  return nnx.jit(lambda: ctor(rngs=rngs(seed)))()


def build_and_run(ctor, x, seed: int = 0, dropout_seed: int | None = None):
  """Init, an eval pass and optionally a train pass in one compiled program: on a small CPU the
  cost is XLA compilation, per program."""

  @nnx.jit
  def go(x):
    model = ctor(rngs=rngs(seed))
    y = model(x, train=False)
    t = None if dropout_seed is None else model(x, train=True, rngs=dropout_rngs(dropout_seed))
    return model, y, t
  return go(x)


def materialize(ctor, seed: int = 0, std: float = 0.02):
  """An abstract model filled from numpy (kernels N(0, std), identity norms): for forward-pass
  tests that do not need the real initialisers, without compiling them."""
  model = nnx.eval_shape(lambda: ctor(rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable):
      fill = {"kernel": lambda s: rng.normal(0.0, std, s), "scale": np.ones, "var": np.ones}
      var.set_value(jnp.asarray(fill.get(path[-1], np.zeros)(var.shape), jnp.float32))
  return model


def dropout_rngs(seed: int) -> nnx.Rngs:
  return nnx.Rngs(dropout=jax.random.key(seed, impl="rbg"))


def n_params(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract(ctor):
  return nnx.eval_shape(lambda: ctor(rngs=nnx.Rngs(0)))


def images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 1.0, shape), jnp.float32)


@nnx.jit(static_argnames="train")
def run(model, x, r=None, *, train):
  return model(x, train=train, rngs=r)


# ------------------------------------------------------------------------- parameter counts


def test_parameter_counts_match_the_references():
  # pytorch-CycleGAN-and-pix2pix unet_256 (3->3): 54,413,955 ("54.414 M"); 1->1 drops
  # 2*64*16 + 2*128*16 weights and 2 biases of the outermost convs.
  assert n_params(abstract(lambda rngs: UNet(in_channels=3, out_channels=3, rngs=rngs))) \
      == 54_413_955
  assert n_params(abstract(lambda rngs: UNet(rngs=rngs))) == 54_407_809
  # Instance norm (affine=False) has no parameters but all convs get biases.
  assert n_params(abstract(lambda rngs: UNet(in_channels=3, out_channels=3, norm="instance",
                                             rngs=rngs))) == 54_409_603
  # NLayerDiscriminator(6, 64, 3): 2,768,705 ("2.769 M"); 2 channels: -4*64*16.
  assert n_params(abstract(lambda rngs: PatchGAN(in_channels=6, rngs=rngs))) == 2_768_705
  assert n_params(abstract(lambda rngs: PatchGAN(rngs=rngs))) == 2_764_609
  # torchvision resnet50: 25,557,032 - fc 2,049,000 + 2048*3 + 3.
  assert n_params(abstract(lambda rngs: ResNet(num_classes=3, rngs=rngs))) == 23_514_179
  assert n_params(abstract(lambda rngs: ResNet(num_classes=3, in_channels=1, rngs=rngs))) \
      == 23_514_179 - 2 * 64 * 49


def test_unet_256_shape_abstract():
  out = nnx.eval_shape(lambda: UNet(rngs=nnx.Rngs(0))(jnp.zeros((1, 256, 256, 1)), train=False))
  assert out.shape == (1, 256, 256, 1) and out.dtype == jnp.float32
  d = nnx.eval_shape(lambda: PatchGAN(rngs=nnx.Rngs(0))(jnp.zeros((1, 256, 256, 2)),
                                                         train=False))
  assert d.shape == (1, 30, 30, 1)  # 70x70 receptive fields on a 256 px pair


@pytest.mark.parametrize("size", [100, 16, 0, 48])
def test_unet_rejects_image_sizes_that_are_not_powers_of_two(size):
  with pytest.raises(ConfigError, match=f"image size {size}"):
    UNet(image_size=size, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("channels", [1, 2, 8])
def test_channel_aligned_conv_is_the_same_convolution(channels, monkeypatch):
  """Zero channels added inside the op change neither the output nor the gradients' shapes or
  values (the kernel keeps its parameter shape)."""
  monkeypatch.setattr(layers, "ALIGNED_BACKENDS", frozenset({jax.default_backend()}))
  kx, kw = jax.random.split(jax.random.key(3))
  x = jax.random.normal(kx, (2, 16, 16, channels))
  w = jax.random.normal(kw, (4, 4, channels, 5))
  dn = ("NHWC", "HWIO", "NHWC")

  def loss(conv):
    return lambda x, w: jnp.sum(jnp.sin(conv(x, w, (2, 2), ((1, 1), (1, 1)),
                                             dimension_numbers=dn)))

  want = jax.value_and_grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
  got = jax.value_and_grad(loss(channel_aligned_conv), (0, 1))(x, w)
  padded = " pad[" in str(jax.make_jaxpr(loss(channel_aligned_conv))(x, w))
  assert padded == (channels % 8 != 0)
  monkeypatch.setattr(layers, "ALIGNED_BACKENDS", frozenset())  # e.g. XLA:CPU: the plain op
  assert " pad[" not in str(jax.make_jaxpr(loss(channel_aligned_conv))(x, w))
  assert got[1][0].shape == x.shape and got[1][1].shape == w.shape
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_up_conv_is_pytorch_conv_transpose():
  """ConvTranspose2d(k4, s2, p1) is the adjoint of Conv2d(k4, s2, p1) with the same weight."""
  up = up_conv(3, 2, use_bias=False, rngs=rngs(), dtype=jnp.float32, param_dtype=jnp.float32)
  x = images((1, 5, 5, 3))
  y = up(x)
  assert y.shape == (1, 10, 10, 2)
  conv = lambda z: jax.lax.conv_general_dilated(  # noqa: E731
      z, up.kernel[...], (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  _, vjp = jax.vjp(conv, jnp.zeros((1, 10, 10, 2)))
  np.testing.assert_allclose(y, vjp(x)[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- U-Net forward


@pytest.fixture(scope="module")
def unet64():
  return build(lambda rngs: UNet(image_size=64, ngf=4, rngs=rngs))


def test_unet_forward_shapes_and_range(unet64):
  x = images((2, 64, 64, 1))
  y = run(unet64, x, train=False)
  assert y.shape == (2, 64, 64, 1) and y.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(y))) <= 1.0
  assert len(unet64.levels) == 6
  assert [lvl.dropout is not None for lvl in unet64.levels] == [False] * 4 + [True, False]


def test_unet_init_is_pix2pix_normal(unet64):
  kernels = np.concatenate([np.ravel(lvl.down.kernel[...]) for lvl in unet64.levels[2:]])
  assert abs(kernels.std() - 0.02) < 0.002 and abs(kernels.mean()) < 0.002
  scales = np.concatenate([np.ravel(lvl.up_norm.scale[...]) for lvl in unet64.levels[1:]])
  assert abs(scales.mean() - 1.0) < 0.01 and 0.01 < scales.std() < 0.03
  assert unet64.levels[0].down.bias is None and unet64.levels[1].down.bias is None
  assert not np.any(np.asarray(unet64.levels[0].up.bias[...]))


def test_unet_128_forward():
  g = materialize(lambda rngs: UNet(image_size=128, ngf=2, rngs=rngs))
  y = run(g, images((1, 128, 128, 1)), train=False)
  assert y.shape == (1, 128, 128, 1) and y.dtype == jnp.float32
  assert sum(lvl.dropout is not None for lvl in g.levels) == 2


def test_unet_dropout_and_batchnorm_train_vs_eval(unet64):
  x = images((2, 64, 64, 1), seed=1)
  bn = unet64.levels[1].down_norm
  mean0 = np.asarray(bn.mean[...])
  a = run(unet64, x, dropout_rngs(1), train=True)
  mean1 = np.asarray(bn.mean[...])
  assert not np.allclose(mean0, mean1)  # running averages move in train mode only
  b = run(unet64, x, dropout_rngs(1), train=True)
  c = run(unet64, x, dropout_rngs(2), train=True)
  np.testing.assert_allclose(a, b, atol=1e-6)  # batch statistics: same rngs, same output
  assert not np.allclose(a, c, atol=1e-4)  # dropout masks differ
  e1 = run(unet64, x, train=False)
  e2 = run(unet64, x, train=False)
  np.testing.assert_array_equal(e1, e2)  # no dropout, running statistics, no update
  np.testing.assert_array_equal(np.asarray(bn.mean[...]), np.asarray(unet64.levels[1]
                                                                     .down_norm.mean[...]))
  assert not np.allclose(e1, a, atol=1e-4)
  with pytest.raises(ValueError, match="rngs"):
    unet64(x, train=True)


def test_unet_bf16_compute_keeps_float32_params(unet64):
  abstract_bf16 = nnx.eval_shape(lambda: UNet(image_size=64, ngf=4, dtype=jnp.bfloat16,
                                              rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract_bf16)
  g16 = nnx.merge(graphdef, nnx.state(unet64))  # same parameters, bf16 compute
  assert {x.dtype for x in jax.tree.leaves(nnx.state(g16))} == {jnp.dtype(jnp.float32)}
  x = images((2, 64, 64, 1), seed=2)
  y16 = run(g16, x, train=False)
  y32 = run(unet64, x, train=False)
  assert y16.dtype == jnp.float32
  np.testing.assert_allclose(y16, y32, atol=0.1)
  assert float(jnp.mean(jnp.abs(y16 - y32))) < 0.02


def test_instance_norm_unet_forward():
  g = materialize(lambda rngs: UNet(image_size=32, ngf=2, norm="instance", rngs=rngs))
  assert not nnx.state(g, nnx.BatchStat)  # nothing to track
  x = images((2, 32, 32, 1))
  e, t = run(g, x, train=False), run(g, x, dropout_rngs(0), train=True)
  np.testing.assert_allclose(e, t, atol=1e-5)  # no dropout at 32 px, no running stats


# ------------------------------------------------------------------------- PatchGAN


def test_patchgan_forward_and_batchnorm():
  x = images((2, 64, 64, 2))
  d, e, t = build_and_run(lambda rngs: PatchGAN(ndf=4, rngs=rngs), x, dropout_seed=0)
  assert e.shape == (2, 6, 6, 1) and e.dtype == jnp.float32
  assert not np.allclose(e, t)  # running vs batch statistics
  # PyTorch momentum 0.1: the train pass moved the running mean from 0 by 0.1 * batch mean, and
  # the eval pass before it did not move it.
  h = nnx.leaky_relu(d.convs[0](x), 0.2)
  batch_mean = jnp.mean(d.convs[1](h), axis=(0, 1, 2))
  np.testing.assert_allclose(d.norms[0].mean[...], 0.1 * batch_mean, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------- ResNet


@pytest.fixture(scope="module")
def tiny_resnet():
  return build(lambda rngs: ResNet(num_classes=3, in_channels=1, stage_sizes=(1, 1, 1, 1),
                                   width=8, rngs=rngs), 5)


def test_resnet_features_head_split(tiny_resnet):
  x = images((2, 64, 64, 1))
  fmap, logits = nnx.jit(lambda m, x: (m.features(x, train=False), m(x, train=False)))(
      tiny_resnet, x)
  assert fmap.shape == (2, 2, 2, 8 * 8 * 4) and fmap.dtype == jnp.float32
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  np.testing.assert_allclose(tiny_resnet.head(fmap), logits, rtol=1e-5, atol=1e-5)
  # torchvision init: He normal with fan_out (64 * 3 * 3 = 576 for the 32-wide 3x3 conv).
  k = np.asarray(tiny_resnet.stages[2][0].c2.conv.kernel[...])
  assert abs(k.std() / (2.0 / (9 * k.shape[3]))**0.5 - 1.0) < 0.1


def test_resnet_batchnorm_train_vs_eval(tiny_resnet):
  x = images((4, 64, 64, 1), seed=3)
  bn = tiny_resnet.stem.bn
  mean0 = np.asarray(bn.mean[...])
  e = run(tiny_resnet, x, train=False)
  np.testing.assert_array_equal(bn.mean[...], mean0)
  t = run(tiny_resnet, x, train=True)
  assert not np.allclose(e, t)
  batch_mean = jnp.mean(tiny_resnet.stem.conv(x), axis=(0, 1, 2))
  np.testing.assert_allclose(bn.mean[...], 0.9 * mean0 + 0.1 * batch_mean, rtol=1e-4,
                             atol=1e-6)


def test_resnet_bf16(tiny_resnet):
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: ResNet(
      num_classes=3, in_channels=1, stage_sizes=(1, 1, 1, 1), width=8, dtype=jnp.bfloat16,
      rngs=nnx.Rngs(0))))
  r16 = nnx.merge(graphdef, nnx.state(tiny_resnet))
  x = images((2, 64, 64, 1), seed=4)
  y16, y32 = run(r16, x, train=False), run(tiny_resnet, x, train=False)
  assert y16.dtype == jnp.float32
  np.testing.assert_allclose(y16, y32, rtol=0.1, atol=0.1 * float(jnp.max(jnp.abs(y32))))


def test_resnet_v1_layout():
  m = abstract(lambda rngs: ResNet(num_classes=2, stage_sizes=(1, 1), width=8, variant="v1",
                                   rngs=rngs))
  assert m.stem.conv.bias is not None and m.stem.bn.epsilon == pytest.approx(1.001e-5)
  assert m.stem.bn.momentum == pytest.approx(0.99)  # Keras BatchNormalization
  assert m.stages[1][0].c1.conv.strides == 2 and m.stages[1][0].c2.conv.strides == 1
  block = Bottleneck(8, 4, 2, v1=True, momentum=0.9, eps=1e-5, zero_init_last_bn=True,
                     rngs=rngs(), dtype=jnp.float32, param_dtype=jnp.float32)
  assert not np.any(np.asarray(block.c3.bn.scale[...]))
  assert np.all(np.asarray(block.c2.bn.scale[...]) == 1.0)
  v15 = abstract(lambda rngs: ResNet(num_classes=2, stage_sizes=(1, 1), width=8, rngs=rngs))
  assert v15.stages[1][0].c1.conv.strides == 1 and v15.stages[1][0].c2.conv.strides == 2
  assert v15.stem.conv.bias is None and v15.stem.bn.momentum == pytest.approx(0.9)
  with pytest.raises(ConfigError, match="variant"):
    ResNet(num_classes=2, variant="v2", rngs=nnx.Rngs(0))


def test_a_network_built_again_reuses_its_initialisation_program_and_gets_new_arrays(caplog):
  """build.init_module keeps the compiled initialisation of (architecture, seed): the same
  network built again compiles nothing, has the same values in new arrays; another seed or
  another size is another program."""
  from cxr_jax.models import build  # pylint: disable=import-outside-toplevel
  arch = {"variant": "v1.5", "stage_sizes": [1, 1, 1, 1], "width": 4, "in_channels": 1}

  def compiled_building(seed, width=4):
    caplog.clear()
    with jax.log_compiles(True):  # logged for every program lowered (cached on disk or not)
      model = build.build_resnet(dict(arch, width=width), num_classes=3, compute_dtype="float32",
                                 seed=seed)
    return model, any("Compiling" in r.getMessage() for r in caplog.records)

  caplog.set_level(logging.WARNING)
  first, _ = compiled_building(11)
  again, compiled = compiled_building(11)
  assert not compiled, "the same network's initialisation was compiled again"
  a, b = jax.tree.leaves(nnx.state(first)), jax.tree.leaves(nnx.state(again))
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
  again.fc.kernel[...] = again.fc.kernel[...] + 1.0  # new arrays: the first build is untouched
  assert not np.array_equal(first.fc.kernel[...], again.fc.kernel[...])
  other_seed, compiled_seed = compiled_building(12)
  wider, compiled_width = compiled_building(11, width=8)
  assert compiled_seed and compiled_width
  assert not np.array_equal(other_seed.fc.kernel[...], first.fc.kernel[...])
  assert wider.fc.kernel[...].shape != first.fc.kernel[...].shape
