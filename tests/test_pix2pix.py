"""pix2pix: losses by hand, learning on a fixed pair, sharded == single device, the task end to end,
and resume == uninterrupted."""

import logging
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax import configlib
from cxr_jax.errors import UserError
from cxr_jax.models import build
from cxr_jax.training import export
from cxr_jax.training import fit
from cxr_jax.training import gan
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training import pix2pix
from cxr_jax.training import pixels
from cxr_jax.training import translator
from cxr_jax.training.functional import Functional

from conftest import REPO_ROOT


def smoke_config(**overrides):
  config = configlib.load_config_file(REPO_ROOT / "configs/pix2pix.py", "smoke")
  config.update(overrides)
  return config


def test_gan_losses_against_hand_values():
  logits = jnp.array([2.0, -1.0])
  softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
  # BCE with logits against 1: softplus(-x); against 0: softplus(x).
  assert float(gan.gan_loss(logits, True, "bce")) == pytest.approx(
      (softplus(-2.0) + softplus(1.0)) / 2, rel=1e-6)
  assert float(gan.gan_loss(logits, False, "bce")) == pytest.approx(
      (softplus(2.0) + softplus(-1.0)) / 2, rel=1e-6)
  assert float(gan.gan_loss(jnp.zeros(3), True, "bce")) == pytest.approx(math.log(2), 1e-6)
  assert float(gan.gan_loss(logits, True, "lsgan")) == pytest.approx((1 + 4) / 2)
  # D's loss is halved: 0.5 * (real term + fake term).
  d = gan.discriminator_loss(jnp.zeros(4), jnp.zeros(4), "bce")
  assert float(d) == pytest.approx(math.log(2), rel=1e-6)
  fake, target = jnp.array([0.5, -0.5]), jnp.array([0.0, 0.5])
  total, (adv, l1) = pix2pix.generator_loss(jnp.zeros(2), fake, target, "bce", 100.0)
  assert float(l1) == pytest.approx((0.5 + 1.0) / 2)
  assert float(total) == pytest.approx(math.log(2) + 100 * 0.75, rel=1e-6)


def test_learning_rate_constant_then_linear_to_zero():
  sched = gan.constant_then_linear_decay(1.0, total_steps=40, decay_steps=20)
  assert float(sched(0)) == 1.0 and float(sched(19)) == 1.0
  assert float(sched(30)) == pytest.approx(0.5)
  assert float(sched(40)) == pytest.approx(0.0)


def _fixed_pair(size, batch):
  rng = np.random.default_rng(0)
  source = rng.integers(0, 256, (batch, size, size, 1)).astype(np.uint8)
  target = np.clip(source.astype(int) + 60, 0, 255).astype(np.uint8)
  return pixels.to_signed(jnp.asarray(source)), pixels.to_signed(jnp.asarray(target))


def test_steps_on_a_fixed_pair_reduce_l1():
  config = smoke_config(learning_rate=2e-3)
  model = pix2pix.Pix2Pix(config, image_size=32, steps_per_epoch=100,
                          mesh=mesh_lib.make_mesh(1))
  state = model.init_state()
  src, tgt = _fixed_pair(32, 2)
  step = jax.jit(model.update)
  l1 = []
  for i in range(15):
    state, metrics = step(state, src, tgt, jax.random.key(i))
    l1.append(float(metrics["g_l1"]))
  assert l1[-1] < 0.85 * l1[0] and l1[-1] == min(l1), l1
  assert int(state.step) == 15


def test_sharded_step_equals_single_device():
  config = smoke_config(batch_size=4)
  normal = np.random.default_rng(1).integers(0, 256, (12, 32, 32, 1)).astype(np.uint8)
  covid = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 1)).astype(np.uint8)
  results = []
  for devices in (1, 4):
    mesh = mesh_lib.make_mesh(devices)
    model = pix2pix.Pix2Pix(config, image_size=32, steps_per_epoch=3, mesh=mesh)
    state = fit.place_state(model.init_state(), mesh)
    data = mesh_lib.put_replicated((normal, covid), mesh)
    state, metrics = fit.compile_chunk(model, steps_per_call=3)(state, data, np.int32(3))
    results.append((jax.device_get(state.g.params), jax.device_get(metrics)))
  (p1, m1), (p4, m4) = results
  np.testing.assert_allclose(m1["g_l1"], m4["g_l1"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_chunk_in_one_loop_equals_one_dispatch_per_step():
  """The two forms of a chunk (`fit.compile_chunk`: a fori_loop program on accelerators, one
  dispatch per step on the CPU) run the same steps: 2 steps of a 3-row chunk give the same
  parameters and metrics (up to the rounding of convolutions compiled inside a loop), the unused
  row is zeros; the ahead-of-time compiled chunk (what the benchmark times) is bitwise the jitted
  one."""
  config = smoke_config(batch_size=4)
  normal = np.random.default_rng(1).integers(0, 256, (12, 32, 32, 1)).astype(np.uint8)
  covid = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 1)).astype(np.uint8)
  mesh = mesh_lib.make_mesh(1)
  model = pix2pix.Pix2Pix(config, image_size=32, steps_per_epoch=3, mesh=mesh)
  data = mesh_lib.put_replicated((normal, covid), mesh)
  results = {}
  for on_device in (True, False):
    chunk = fit.compile_chunk(model, steps_per_call=3, on_device=on_device)
    assert chunk.on_device is on_device
    state = fit.place_state(model.init_state(), mesh)
    state, metrics = chunk(state, data, np.int32(2))
    results[on_device] = (jax.device_get(state), jax.device_get(metrics))
    if not on_device:
      aot, _ = chunk.compiled(fit.place_state(model.init_state(), mesh), data)
      state2, metrics2 = aot(fit.place_state(model.init_state(), mesh), data, np.int32(2))
      for a, b in zip(jax.tree.leaves(jax.device_get(state2.g.params)),
                      jax.tree.leaves(state.g.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  (s_loop, m_loop), (s_each, m_each) = results[True], results[False]
  assert int(s_loop.step) == int(s_each.step) == 2
  for k in m_loop:
    assert m_loop[k].shape == m_each[k].shape == (3,), k
    np.testing.assert_allclose(m_loop[k], m_each[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert m_each[k][2] == 0, k
  for a, b in zip(jax.tree.leaves(s_loop.g.params), jax.tree.leaves(s_each.g.params)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_pix2pix_task_end_to_end_via_main(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "main.py"),
       "--config=" + str(REPO_ROOT / "configs/pix2pix.py:smoke"), f"--workdir={run}"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (run / "config.json").exists() and (run / "split_manifest.csv").exists()
  assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  assert list((run / "tensorboard").glob("events.out.tfevents.*"))
  assert list((run / "samples").glob("step_*.png"))
  assert (run / "generator" / "model.json").exists()
  gen = export.load_generator(run / "generator")
  assert gen.meta["translator"] == "pix2pix" and gen.meta["inference"] == "instance"
  images = np.zeros((3, 32, 32, 1), np.uint8)
  out = gen.translate(images, batch_size=4)
  assert out.shape == images.shape and out.dtype == np.uint8
  # Batch-size independence of the seeded synthesis.
  np.testing.assert_array_equal(out, gen.translate(images, batch_size=8))


class _Interrupt(Exception):
  pass


def test_resume_at_an_odd_step_equals_uninterrupted_and_compiles_one_program(tmp_path, monkeypatch,
                                                                             caplog):
  """Chunks of up to 3 steps, logs every 4, checkpoints every 5: a run resumed at step 5 runs
  chunks of 1 and 2 steps, all one compiled training program, and ends bitwise where an uninterrupted
  run ends."""
  from cxr_jax import workdir as workdir_lib
  from cxr_jax.training import checkpoint

  config = smoke_config(steps_per_call=3, checkpoint_every=5)
  full = translator.train(pix2pix.Pix2Pix, config, workdir_lib.prepare(tmp_path / "full", config))

  original_save = checkpoint.Checkpointer.save

  def save_then_die(self, step, state, **kw):
    original_save(self, step, state, **kw)
    if step == 5:
      self.wait()
      raise _Interrupt()

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_die)
  run = workdir_lib.prepare(tmp_path / "resumed", config)
  with pytest.raises(_Interrupt):
    translator.train(pix2pix.Pix2Pix, config, run)
  monkeypatch.setattr(checkpoint.Checkpointer, "save", original_save)
  lengths = []
  original_run = fit.loop.run

  def recording_run(state, *, chunk_fn, **kw):
    assert kw["start_step"] == 5
    return original_run(state, chunk_fn=lambda st, k: (lengths.append(k), chunk_fn(st, k))[1],
                        **kw)

  monkeypatch.setattr(fit.loop, "run", recording_run)
  caplog.set_level(logging.WARNING)
  with jax.log_compiles(True):  # logged for every program lowered and compiled (cached or not)
    resumed = translator.train(pix2pix.Pix2Pix, config, run)
  # 5-6, 6-7 (the progress bar's short first chunks), 7-8 (a log), 8-10 (a checkpoint), 10-12
  assert lengths == [1, 1, 1, 2, 2], lengths
  compiled = [r for r in caplog.records if "Compiling jit(train_chunk" in r.getMessage()]
  assert len(compiled) == 1, "one compiled training program"
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(full.stats), jax.tree.leaves(resumed.stats)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert full.meta["step"] == resumed.meta["step"] == 12


def test_generator_exports_load_by_their_meta_whatever_the_translator(tmp_path):
  """Synthesis loads any generator export through one loader: the meta names the architecture
  (built by models/build.py) and how to run it, not the model that trained it."""
  config = smoke_config()
  gen, _ = pix2pix.build_networks(config, 32, 1)
  net, params, stats = Functional.split(gen)
  meta = {"kind": "generator", "translator": "another-translator",
          "arch": build.generator_arch(config.model), "image_size": 32, "channels": 1,
          "compute_dtype": "float32", "inference": "eval", "source_class": "NORMAL",
          "target_class": "COVID", "step": 0}
  export.save(tmp_path / "g", params, stats, meta)
  loaded = export.load_generator(tmp_path / "g")
  images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 1)).astype(np.uint8)
  expected, _ = net.apply(params, stats, pixels.to_signed(jnp.asarray(images)), train=False)
  np.testing.assert_array_equal(loaded.translate(images, batch_size=4),
                                np.asarray(pixels.to_uint8(expected)))
  for key, value, message in (("arch", {"name": "resnet9"}, "unknown generator architecture"),
                              ("inference", "sometimes", "'inference' is 'sometimes'")):
    export.save(tmp_path / key, params, stats, dict(meta, **{key: value}))
    with pytest.raises(UserError, match=message):
      export.load_generator(tmp_path / key)
