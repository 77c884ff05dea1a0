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

import pytest  # pylint: disable=wrong-import-position

from cxr_jax import runtime  # pylint: disable=wrong-import-position

runtime.enable_compilation_cache()

REPO_ROOT = _ROOT


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
  """Each test session gets its own dataset cache: tests never read a user's ~/.cache."""
  monkeypatch.setenv("CXR_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cxr_cache"))
