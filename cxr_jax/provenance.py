"""What produced an output: the cxr-jax version, the git commit of a source checkout (and whether
it had uncommitted changes), and a hash of the resolved config.

Recorded in every export's `model.json` and in the experiment's `report.json`. The config hash is
the SHA-256 of the run's `config.json` as written (`sha256sum config.json` gives it back). The
commit is read only when the imported package sits at the top of a git work tree (an installed
wheel inside some other repository is not that repository's code); without git, or outside a
checkout, it is None.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import subprocess

import ml_collections

import cxr_jax
from cxr_jax import workdir as workdir_lib


def config_sha256(config: ml_collections.ConfigDict) -> str:
  return hashlib.sha256(workdir_lib.config_to_json(config).encode("utf-8")).hexdigest()


@functools.cache
def git_state() -> tuple[str | None, bool | None]:
  """(commit, dirty) of the checkout this package was imported from, or (None, None)."""
  root = pathlib.Path(cxr_jax.__file__).resolve().parent.parent

  def git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30,
                         check=True)
    return out.stdout.strip()

  try:
    if pathlib.Path(git("rev-parse", "--show-toplevel")).resolve() != root:
      return None, None
    return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
  except (OSError, subprocess.SubprocessError):  # no git, no checkout, no commit yet
    return None, None


def provenance(config: ml_collections.ConfigDict | None = None) -> dict:
  commit, dirty = git_state()
  return {"cxr_jax_version": cxr_jax.__version__, "git_commit": commit, "git_dirty": dirty,
          "config_sha256": None if config is None else config_sha256(config)}
