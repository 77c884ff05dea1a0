"""Provenance: version, commit of a source checkout (with its dirty flag), the config's hash; in
every export's model.json."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys

import ml_collections
import pytest

import cxr_jax
from cxr_jax import provenance
from cxr_jax import workdir as workdir_lib

from conftest import REPO_ROOT


def _cfg(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict({"task": "pix2pix", "batch_size": 2}, **kw))


def test_config_hash_is_the_config_files_and_follows_every_key(tmp_path):
  run = workdir_lib.prepare(tmp_path / "run", _cfg())
  workdir_lib.release(run)
  p = provenance.provenance(_cfg())
  assert p["config_sha256"] == hashlib.sha256((run / "config.json").read_bytes()).hexdigest()
  assert provenance.provenance(_cfg(batch_size=3))["config_sha256"] != p["config_sha256"]
  assert p["cxr_jax_version"] == cxr_jax.__version__
  assert provenance.provenance()["config_sha256"] is None


def _git(*args, cwd):
  return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)


def test_commit_and_dirty_flag_of_a_checkout_and_none_outside_one(tmp_path):
  """A copy of the package in a fresh repository: the commit, then dirty after an edit; the same
  copy without .git (or without git) records None and does not fail."""
  if shutil.which("git") is None:
    pytest.skip("git is not installed")
  repo = tmp_path / "repo"
  shutil.copytree(REPO_ROOT / "cxr_jax", repo / "cxr_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  probe = ("import json, cxr_jax.provenance as p; c, d = p.git_state(); "
           "print(json.dumps([c, d]))")

  def state():
    out = subprocess.run([sys.executable, "-c", probe], cwd=repo, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)

  assert state() == [None, None]  # not a checkout
  _git("init", "-q", cwd=repo)
  assert state() == [None, None]  # a checkout without a commit
  _git("add", "cxr_jax", cwd=repo)
  _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x", cwd=repo)
  head = _git("rev-parse", "HEAD", cwd=repo).stdout.strip()
  assert state() == [head, False]
  (repo / "cxr_jax" / "errors.py").write_text(
      (repo / "cxr_jax" / "errors.py").read_text() + "\n# edited\n")
  assert state() == [head, True]
  # The package inside another repository's subfolder (a venv in a checkout) is not its code.
  nested = repo / "venv" / "site"
  shutil.copytree(repo / "cxr_jax", nested / "cxr_jax")
  out = subprocess.run([sys.executable, "-c", probe], cwd=nested, capture_output=True, text=True,
                       check=True)
  assert json.loads(out.stdout) == [None, None]


def test_every_export_records_it(tmp_path):
  from cxr_jax.models import build  # pylint: disable=import-outside-toplevel
  from cxr_jax.training import export  # pylint: disable=import-outside-toplevel
  from cxr_jax.training.functional import Functional  # pylint: disable=import-outside-toplevel
  arch = {"variant": "v1.5", "stage_sizes": [1], "width": 4, "in_channels": 1}
  _, params, stats = Functional.split(build.build_resnet(arch, num_classes=2,
                                                         compute_dtype="float32", seed=0))
  export.save(tmp_path / "c", params, stats, {"kind": "classifier"}, _cfg())
  meta = json.loads((tmp_path / "c" / "model.json").read_text())
  assert meta["provenance"] == provenance.provenance(_cfg())
  assert meta["provenance"]["git_commit"] == provenance.git_state()[0]
  if (pathlib.Path(cxr_jax.__file__).parent.parent / ".git").exists() and shutil.which("git"):
    assert len(meta["provenance"]["git_commit"]) == 40  # this checkout's
