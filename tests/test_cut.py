"""CUT: the PatchNCE loss and the patch head against hand-computed values, parameter counts, the
encoder's layers, the config, sharded == single device, resume == uninterrupted (bitwise), and the
export feeding synthesis as any translator's."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cxr_jax import configlib
from cxr_jax.errors import ConfigError
from cxr_jax.models import build
from cxr_jax.models.patch_mlp import PatchMLP
from cxr_jax.models.resnet_generator import ResnetGenerator, encoder_channels
from cxr_jax.training import cut
from cxr_jax.training import export
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training import translator

from conftest import REPO_ROOT, assert_resumed_equals_uninterrupted, train_interrupted_and_resumed
from conftest import assert_networks_moved, two_steps_on_each_mesh


def load(variant=""):
  return configlib.load_config_file(REPO_ROOT / "configs/cut.py", variant)


def n_params(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# --------------------------------------------------------------------------------- PatchNCE


def test_patch_nce_loss_by_hand():
  """Two patches of one image, unit vectors: q0 = (0.6, 0.8), q1 = (1, 0); k0 = (1, 0),
  k1 = (0, 1). Row p: logits (q_p.k_p, then q_p.k_j for j = 0, 1 with -10 at j = p) / T, and the
  loss is -log softmax of the first."""
  q = jnp.array([[[0.6, 0.8], [1.0, 0.0]]])
  k = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
  t = 0.5

  def ce(logits):
    return math.log(sum(math.exp(x / t) for x in logits)) - logits[0] / t

  want = [ce([0.6, -10.0, 0.8]), ce([0.0, 1.0, -10.0])]
  np.testing.assert_allclose(np.asarray(cut.patch_nce_loss(q, k, t))[0], want, rtol=1e-6)
  # The keys are constants of the loss (the reference detaches them); queries get gradients.
  gq, gk = jax.grad(lambda q, k: jnp.sum(cut.patch_nce_loss(q, k, t)), argnums=(0, 1))(q, k)
  assert not np.any(np.asarray(gk)) and np.any(np.asarray(gq))
  # Each image's patches are negatives of its own patches only: a second image changes nothing.
  both = cut.patch_nce_loss(jnp.concatenate([q, -q]), jnp.concatenate([k, k]), t)
  np.testing.assert_allclose(np.asarray(both)[0], want, rtol=1e-6)


def test_patch_nce_prefers_the_matching_patch():
  """Queries equal to their keys score below log(P + 1) (chance), shuffled ones above it."""
  k = jax.random.normal(jax.random.key(0), (2, 8, 16))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  chance = math.log(9)
  assert float(jnp.mean(cut.patch_nce_loss(k, k, 0.07))) < 0.1 * chance
  assert float(jnp.mean(cut.patch_nce_loss(k[:, ::-1], k, 0.07))) > chance


def test_patch_mlp_by_hand_and_its_parameter_count():
  """Per layer: the features at the given positions, Linear -> ReLU -> Linear, L2-normalised; one
  MLP of c * dim + dim + dim * dim + dim parameters per layer of c channels."""
  head = PatchMLP((1, 3), dim=4, rngs=nnx.Rngs(0))
  assert n_params(head) == (1 * 4 + 4 + 16 + 4) + (3 * 4 + 4 + 16 + 4)
  feats = [jnp.arange(8.0).reshape(1, 2, 4, 1), jnp.ones((2, 2, 2, 3))]
  ids = [jnp.array([5, 0]), jnp.array([3])]
  out = head(feats, ids)
  assert [o.shape for o in out] == [(1, 2, 4), (2, 1, 4)]
  def by_hand(layer, x):
    h = np.maximum(x @ np.asarray(head.hidden[layer].kernel) + np.asarray(head.hidden[layer].bias),
                   0)
    y = h @ np.asarray(head.out[layer].kernel) + np.asarray(head.out[layer].bias)
    return y / (np.linalg.norm(y) + 1e-7)

  for row, position in zip(np.asarray(out[0])[0], (5.0, 0.0)):
    np.testing.assert_allclose(row, by_hand(0, np.array([position])), rtol=1e-5, atol=1e-6)
  for image in np.asarray(out[1]):
    np.testing.assert_allclose(image[0], by_hand(1, np.ones(3)), rtol=1e-5, atol=1e-6)
  # Xavier-normal with gain 0.02: std 0.02 * sqrt(2 / (fan_in + fan_out)), biases zero.
  big = PatchMLP((256,), dim=256, rngs=nnx.Rngs(1))
  assert float(jnp.std(big.out[0].kernel[...])) == pytest.approx(0.02 * math.sqrt(2 / 512), 0.02)
  assert not np.any(np.asarray(big.out[0].bias[...]))


def test_the_reference_sized_head_and_networks_count_by_hand():
  """configs/cut.py's default: the head's five MLPs on encoder layers of 1, 128, 256, 256, 256
  channels (the padded input, the two stride-2 convolutions, residual blocks 0 and 4)."""
  c = load()
  channels = [encoder_channels(i, in_channels=1, ngf=c.model.ngf) for i in c.nce_layers]
  assert channels == [1, 128, 256, 256, 256]
  head = nnx.eval_shape(lambda: PatchMLP(channels, dim=c.model.nce_mlp_dim, rngs=nnx.Rngs(0)))
  assert n_params(head) == sum(256 * ch + 256 + 256 * 256 + 256 for ch in channels) == 559_872


def test_encoder_layers_are_the_generators_own_tensors():
  """`encode` returns the generator's intermediate tensors: layer 0 is the 3-pixel reflection-
  padded input, 10 + i the output of residual block i, and running the encoder does not change
  the generator's output."""
  gen = ResnetGenerator(ngf=4, n_blocks=2, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1), minval=-1, maxval=1)
  f0, f4, f7, f11 = gen.encode(x, layers=(0, 4, 7, 11), train=False)
  np.testing.assert_array_equal(np.asarray(f0), np.pad(np.asarray(x), ((0, 0), (3, 3), (3, 3),
                                                                       (0, 0)), mode="reflect"))
  assert f4.shape == (2, 8, 8, 8) and f7.shape == (2, 4, 4, 16) and f11.shape == (2, 4, 4, 16)
  assert [encoder_channels(i, in_channels=1, ngf=4) for i in (0, 1, 4, 7, 11)] == [1, 4, 8, 16, 16]
  block1 = gen.blocks[1](gen.encode(x, layers=(10,), train=False)[0], train=False, rngs=None)
  np.testing.assert_allclose(np.asarray(block1), np.asarray(f11), rtol=1e-6, atol=1e-6)
  with pytest.raises(ConfigError, match="do not exist"):
    gen.encode(x, layers=(12,), train=False)


# ----------------------------------------------------------------------------------- config


def test_config_defaults_variants_and_checks():
  c = load()
  assert (c.task, c.translator, c.gan_loss, c.model.generator, c.model.n_blocks) == (
      "translator", "cut", "lsgan", "resnet", 9)
  assert (c.lambda_gan, c.lambda_nce, c.nce_idt, c.num_patches, c.nce_t) == (
      1.0, 1.0, True, 256, 0.07)
  assert (c.num_epochs, c.decay_epochs, c.batch_size, c.data.image_size) == (400, 200, 1, 256)
  fast = load("fast")
  assert (fast.nce_idt, fast.lambda_nce, fast.num_epochs, fast.decay_epochs) == (
      False, 10.0, 200, 50)
  for variant in ("", "fast", "cpu", "smoke"):
    cut.CUT.check_config(load(variant))
  with pytest.raises(ValueError, match="unknown variant"):
    load("gpu")
  for key, value, message in (("nce_layers", (0, 4, 12), "nce_layers"),
                              ("nce_layers", (), "nce_layers"),
                              ("nce_t", 0.0, "nce_t"), ("num_patches", 0, "num_patches"),
                              ("lambda_nce", -1.0, "lambda_nce")):
    bad = load("smoke")
    bad[key] = value
    with pytest.raises(ConfigError, match=f"config.{message}"):
      cut.CUT.check_config(bad)
  bad = load("smoke")
  bad.model.generator = "unet"
  with pytest.raises(ConfigError, match="config.model.generator"):
    cut.CUT.check_config(bad)


def test_found_by_name():
  assert translator.find("cut") is cut.CUT
  with pytest.raises(ConfigError, match="no module"):
    translator.find("cutt")
  with pytest.raises(ConfigError, match="not a translator"):
    translator.find("gan")


# ----------------------------------------------------------------------------------- trainer


def tiny(**overrides):
  config = load("smoke")
  config.model.n_blocks, config.model.n_layers_d = 0, 1   # a smaller program to compile
  config.nce_layers = (0, 4, 7)
  config.update(overrides)
  return config


def test_sharded_step_equals_single_device_and_steps_learn():
  """Two steps on 1 and on 4 devices: the same losses and networks (compared by their outputs).
  Six more on one device: the PatchNCE loss falls and G, D and the head all move."""
  config = tiny(batch_size=4)

  def outputs(model, st, probe):
    feats = model.gen.apply(st.g.params, st.g.stats, probe, layers=model.layers, train=False,
                            method="encode")[0]
    ids = [jnp.arange(4)] * len(feats)
    return [model.gen.apply(st.g.params, st.g.stats, probe, train=False)[0],
            model.disc.apply(st.d.params, st.d.stats, probe, train=False)[0],
            *model.head.apply(st.f.params, st.f.stats, feats, ids)[0]]

  results, single = two_steps_on_each_mesh(
      lambda mesh: cut.CUT(config, image_size=32, steps_per_epoch=3, mesh=mesh), outputs)
  (m1, _, o1), (m4, _, o4) = results
  for k in ("g_loss", "g_gan", "g_nce", "g_nce_idt", "d_loss"):
    np.testing.assert_allclose(m1[k], m4[k], rtol=1e-4, err_msg=k)
  for x, y in zip(o1, o4):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-4)

  model, chunk, state, data, first = single
  for _ in range(3):
    state, last = chunk(state, data, np.int32(2))
  assert int(state.step) == 8
  nce = lambda m: np.asarray(m["g_nce"]).mean()  # noqa: E731
  assert nce(jax.device_get(last)) < nce(jax.device_get(first))
  m = jax.device_get(last)
  np.testing.assert_allclose(
      m["g_loss"], m["g_gan"] + 0.5 * (m["g_nce"] + m["g_nce_idt"]), rtol=1e-5)
  assert_networks_moved(model, state, ("g", "d", "f"))


def test_fastcut_has_no_identity_term():
  config = tiny(nce_idt=False, lambda_nce=10.0)
  mesh = mesh_lib.make_mesh(1)
  model = cut.CUT(config, image_size=32, steps_per_epoch=3, mesh=mesh)
  a = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 1)).astype(np.uint8)
  state, metrics = jax.jit(model.train_step)(model.init_state(), (a, a))
  assert "g_nce_idt" not in metrics and int(state.step) == 1
  np.testing.assert_allclose(metrics["g_loss"], metrics["g_gan"] + metrics["g_nce"], rtol=1e-6)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
  """configs/cut.py:smoke run uninterrupted, and interrupted after its step-4 checkpoint, then
  resumed."""
  config = load("smoke")
  return (config, *train_interrupted_and_resumed(cut.CUT, config,
                                                 tmp_path_factory.mktemp("cut")))


def test_resume_equals_uninterrupted_bitwise(smoke_runs):
  _, _, full, run, resumed = smoke_runs
  assert_resumed_equals_uninterrupted(full, resumed, run, 12)  # 3 epochs of 19 // 4 steps


def test_export_is_a_plain_generator_export(smoke_runs):
  config, full_dir, _, _, _ = smoke_runs
  gen = export.load_generator(full_dir / translator.GENERATOR_DIR)
  assert gen.meta["translator"] == "cut" and gen.meta["inference"] == "eval"
  assert gen.meta["arch"] == build.generator_arch(config.model)
  images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 1)).astype(np.uint8)
  got = gen.translate(images, batch_size=4)
  np.testing.assert_array_equal(got, gen.translate(images, batch_size=8))
  assert not np.array_equal(got[0], got[1])  # the output depends on the input
