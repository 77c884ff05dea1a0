"""Test set-up: CPU backend, several simulated devices, and a compilation cache of the session's
own, shared by every test and every `main.py` the tests start, so that a program compiled once
(by another trainer object, another test or a subprocess) is not compiled again."""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 4 simulated CPU devices: sharded steps are checked against single-device ones.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()
# The tests' programs are tiny and each runs a few times: LLVM's optimisation passes cost more than
# they save (20 % fewer CPU seconds, docs/performance.md). Programs compiled with other settings may
# round differently: tests compare runs of one program bitwise, different programs to rounding.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:  # set it to compare
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# XLA's older CPU emitters: the suite's compile time drops by 45 % against XLA's fusion emitters
# (docs/performance.md). With them, two different programs that compute the same thing (a row's
# seeds in one program vs each seed alone, a streamed vs a resident batch) agree to float rounding
# rather than bit for bit: `assert_same_across_programs` compares them bitwise only with XLA's
# default emitters (`XLA_FLAGS=--xla_cpu_use_fusion_emitters=true pytest ...`).
if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
CROSS_PROGRAM_BITWISE = "--xla_cpu_use_fusion_emitters=false" not in os.environ["XLA_FLAGS"]
_ROOT = pathlib.Path(__file__).resolve().parents[1]
# A fresh folder per session (removed at its end), so that no run reads a stale cache; set
# JAX_COMPILATION_CACHE_DIR to keep one across sessions. The `main.py` processes the tests start
# inherit the variable, hence the cache.
_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _OWN_CACHE = tempfile.mkdtemp(prefix="cxr-jax-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE


def xla_flags_with_devices(count: int) -> str:
  """This session's XLA flags (the compiler settings above) with `count` simulated CPU devices,
  for the processes a test starts."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])


import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from cxr_jax import runtime  # pylint: disable=wrong-import-position
from cxr_jax import configlib  # pylint: disable=wrong-import-position
from cxr_jax import workdir as workdir_lib  # pylint: disable=wrong-import-position
from cxr_jax.data import dataset  # pylint: disable=wrong-import-position
from cxr_jax.pipeline import experiment  # pylint: disable=wrong-import-position
from cxr_jax.training import checkpoint  # pylint: disable=wrong-import-position
from cxr_jax.training import fit  # pylint: disable=wrong-import-position
from cxr_jax.training import mesh as mesh_lib  # pylint: disable=wrong-import-position
from cxr_jax.training import pixels  # pylint: disable=wrong-import-position
from cxr_jax.training import translator  # pylint: disable=wrong-import-position

runtime.enable_compilation_cache()

REPO_ROOT = _ROOT


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# pytest-xdist (`-n 2`, the README's command, with pyproject's `--dist=loadfile`): a module's tests
# run on one worker (its module fixtures, and `smoke_experiment`, are built once), and the longest
# modules (measured, docs/performance.md) are handed out first, so that the workers finish
# together. The workers inherit this process's environment, hence the compilation cache above.
_LONGEST_FIRST = ("test_experiment", "test_multiseed", "test_kill_resume", "test_multiprocess",
                  "test_bench", "test_cut", "test_cyclegan", "test_pix2pix", "test_stream",
                  "test_translate", "test_classifier", "test_pretrained", "test_own_data",
                  "test_torch_io", "test_synthesize", "test_models")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):  # pylint: disable=unused-argument
  """A test's captured output as valid UTF-8: xdist sends reports between processes as UTF-8, and
  the hostile-input tests log file names that are not (undecodable bytes as surrogates)."""
  report = yield
  report.sections = [(title, text.encode("utf-8", "backslashreplace").decode("utf-8"))
                     for title, text in report.sections]
  return report


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  rank = {m: i for i, m in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: file order otherwise


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
  """Each test session gets its own dataset cache: tests never read a user's ~/.cache."""
  monkeypatch.setenv("CXR_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cxr_cache"))


class Interrupt(Exception):
  """Stands for a run killed right after a checkpoint."""


def train_interrupted_and_resumed(cls, config, root: pathlib.Path, *, stop_after: int = 4):
  """Translator `cls` on `config`: trained uninterrupted in `root/full`, and in `root/resumed`
  interrupted right after its checkpoint of step `stop_after` was written, then resumed. Returns
  (full workdir, its export, resumed workdir, its export)."""
  full_dir = workdir_lib.prepare(root / "full", config)
  full = translator.train(cls, config, full_dir)
  original_save = checkpoint.Checkpointer.save

  def save_then_die(self, step, state, **kw):
    original_save(self, step, state, **kw)
    if step == stop_after:
      self.wait()
      raise Interrupt()

  run = workdir_lib.prepare(root / "resumed", config)
  checkpoint.Checkpointer.save = save_then_die
  try:
    with pytest.raises(Interrupt):
      translator.train(cls, config, run)
  finally:
    checkpoint.Checkpointer.save = original_save
  return full_dir, full, run, translator.train(cls, config, run)


def two_steps_on_each_mesh(build_model, outputs_of) -> tuple[list, tuple]:
  """An unpaired translator (`build_model(mesh)`) trained two steps, one chunk, on 1 and on 4
  devices from the same random sets (12 source and 5 target images of 32 px). Returns, per mesh,
  (metrics, state on the host, `outputs_of(model, host state, probe)` for two random probe
  images), and the 1-device run to go on with: (model, chunk, state, data, metrics)."""
  a = np.random.default_rng(1).integers(0, 256, (12, 32, 32, 1)).astype(np.uint8)
  b = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 1)).astype(np.uint8)
  probe = pixels.to_signed(jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 32, 32, 1))))
  results, single = [], None
  for devices in (1, 4):
    mesh = mesh_lib.make_mesh(devices)
    model = build_model(mesh)
    state = fit.place_state(model.init_state(), mesh)
    chunk = fit.compile_chunk(model, steps_per_call=2)
    data = mesh_lib.put_replicated((a, b), mesh)
    state, metrics = chunk(state, data, np.int32(2))
    host = jax.device_get(state)
    results.append((jax.device_get(metrics), host, outputs_of(model, host, probe)))
    if devices == 1:
      single = (model, chunk, state, data, metrics)
  return results, single


def assert_networks_moved(model, state, nets) -> None:
  """Every network in `nets` (fields of the state) has parameters other than its initial ones."""
  init = model.init_state()
  for net in nets:
    before = jax.tree.leaves(getattr(init, net).params)
    after = jax.tree.leaves(jax.device_get(getattr(state, net).params))
    assert any(not np.array_equal(x, y) for x, y in zip(before, after)), net


def assert_same_across_programs(actual, desired, err_msg: str = "") -> None:
  """Arrays (or pytrees of them, e.g. flat checkpoints) computed by two different programs from
  the same inputs and keys: bitwise equal with XLA's default CPU emitters, else equal to float
  rounding (a few steps' accumulated last bits; a wrong batch, key or update is orders of
  magnitude further off)."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(actual)
  if tree.num_leaves != 1 or leaves[0][0]:  # a pytree: leaf by leaf, named by its path
    assert tree == jax.tree.structure(desired), (err_msg, tree, jax.tree.structure(desired))
    for (path, a), d in zip(leaves, jax.tree.leaves(desired)):
      assert_same_across_programs(a, d, f"{err_msg}: {jax.tree_util.keystr(path)}")
    return
  actual, desired = np.asarray(actual), np.asarray(desired)
  assert actual.dtype == desired.dtype, (err_msg, actual.dtype, desired.dtype)
  if CROSS_PROGRAM_BITWISE or not np.issubdtype(actual.dtype, np.inexact):
    np.testing.assert_array_equal(actual, desired, err_msg=err_msg)  # steps, keys: always exact
  else:
    # Relative to the array's own scale: Adam's normalised updates carry a gradient's rounding to
    # small elements as much as to large ones (measured: <= 3e-5 of the scale, after a row's 6
    # steps and after the streamed test's 10).
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(actual, desired, rtol=1e-4, atol=max(1e-7, 1e-4 * scale),
                               err_msg=err_msg)


def assert_resumed_equals_uninterrupted(full, resumed, run: pathlib.Path, steps: int) -> None:
  """The resumed run's export is the uninterrupted one's, bit for bit, after `steps` steps, and
  the resumed run wrote its sample grids."""
  assert full.meta["step"] == resumed.meta["step"] == steps
  for a, b in zip(jax.tree.leaves((full.params, full.stats)),
                  jax.tree.leaves((resumed.params, resumed.stats))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert list((run / "samples").glob("step_*.png"))


# ------------------------------------------------- experiment:smoke, run once for several tests


class Preempted(Exception):
  """Raised in place of a preemption right after a checkpoint."""


def _stage_times(workdir):
  return {p.name: p.stat().st_mtime_ns for p in (workdir / "stages").glob("*.json")}


def _external_set(config, root):
  """The smoke data rendered with another synthetic seed, plus an exact copy of one of the run's
  own images (to be left out) and an unreadable file (to be skipped and named)."""
  other = dataset.resolve_source(configlib.data_config(**dict(config.data.to_dict(),
                                                              synthetic_seed=1)))
  ext = pathlib.Path(shutil.copytree(other.root_path, root / "external"))
  own = dataset.resolve_source(config.data)
  first = next(e for e in own.entries if e.label == "NORMAL")
  shutil.copy(pathlib.Path(own.root_path) / first.file, ext / "NORMAL" / "copy-of-own.png")
  (ext / "NORMAL" / "broken.png").write_bytes(b"not an image")
  return ext


@pytest.fixture(scope="session")
def smoke_experiment(tmp_path_factory):
  """`experiment:smoke` (with an external test set) run once for test_experiment.py's end-to-end
  and console tests: in-process until the last-but-one classifier row is preempted right after its
  first checkpoint, then resumed to the end by `main.py` (the README's command) in a subprocess,
  whose console and log the console test reads. Returns the workdir, config, the stage records'
  times before and after the resume, and the subprocess's result."""
  root = tmp_path_factory.mktemp("smoke_experiment")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("CXR_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cxr_cache"))
    config = configlib.load_config_file(REPO_ROOT / "configs/experiment.py", "smoke")
    config.external_test_dir = str(_external_set(config, root))
    workdir = workdir_lib.prepare(root / "run", config)

    # Preempt the enhanced-pix2pix row's classifier right after its first checkpoint.
    original_save = checkpoint.Checkpointer.save

    def preempting_save(self, step, state, **kw):
      original_save(self, step, state, **kw)
      if "enhanced-pix2pix-scratch" in str(self.directory):
        self.wait()
        raise Preempted()

    mp.setattr(checkpoint.Checkpointer, "save", preempting_save)
    preempted = False
    try:
      experiment.run_experiment(config, workdir)
    except Preempted:
      preempted = True
    mp.setattr(checkpoint.Checkpointer, "save", original_save)
    before = _stage_times(workdir)
    checkpoint_kept = (workdir / "classifiers/enhanced-pix2pix-scratch-seed0/checkpoints").exists()
    workdir_lib.release()  # every workdir of the run (its stages too), as its death would

    resumed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "main.py"),
         "--config=" + str(REPO_ROOT / "configs/experiment.py:smoke"),
         f"--config.external_test_dir={config.external_test_dir}", f"--workdir={workdir}"],
        cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=600)
    after = _stage_times(workdir)
  return {"root": root, "workdir": workdir, "config": config, "preempted": preempted,
          "checkpoint_kept": checkpoint_kept, "before": before, "after": after,
          "resumed": resumed}
