"""Test set-up: CPU backend, several simulated devices, and a persistent compilation cache so that
a second test session does not recompile the same tiny models."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 4 simulated CPU devices: sharded steps are checked against single-device ones.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()
_ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_ROOT / ".cache" / "jax-tests"))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from cxr_jax import runtime  # pylint: disable=wrong-import-position
from cxr_jax import workdir as workdir_lib  # pylint: disable=wrong-import-position
from cxr_jax.training import checkpoint  # pylint: disable=wrong-import-position
from cxr_jax.training import translator  # pylint: disable=wrong-import-position

runtime.enable_compilation_cache()

REPO_ROOT = _ROOT


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


def assert_resumed_equals_uninterrupted(full, resumed, run: pathlib.Path, steps: int) -> None:
  """The resumed run's export is the uninterrupted one's, bit for bit, after `steps` steps, and
  the resumed run wrote its sample grids."""
  assert full.meta["step"] == resumed.meta["step"] == steps
  for a, b in zip(jax.tree.leaves((full.params, full.stats)),
                  jax.tree.leaves((resumed.params, resumed.stats))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert list((run / "samples").glob("step_*.png"))
