"""Test set-up: CPU backend, several simulated devices, and a compilation cache of the session's
own, shared by every test and every `main.py` the tests start, so that a program compiled once
(by another trainer object, another test or a subprocess) is not compiled again."""

import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 4 simulated CPU devices: sharded steps are checked against single-device ones.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()
_ROOT = pathlib.Path(__file__).resolve().parents[1]
# A fresh folder per session (removed at its end), so that no run reads a stale cache; set
# JAX_COMPILATION_CACHE_DIR to keep one across sessions. The `main.py` processes the tests start
# inherit the variable, hence the cache.
_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _OWN_CACHE = tempfile.mkdtemp(prefix="cxr-jax-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE

import pytest  # pylint: disable=wrong-import-position

from cxr_jax import runtime  # pylint: disable=wrong-import-position

runtime.enable_compilation_cache()

REPO_ROOT = _ROOT


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
  """Each test session gets its own dataset cache: tests never read a user's ~/.cache."""
  monkeypatch.setenv("CXR_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cxr_cache"))
