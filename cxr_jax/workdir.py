"""A run's working directory: created once, reused only by the same config, never clobbered.

The resolved config is written to `<workdir>/config.json`. Starting again with the same workdir and
an equal config resumes the run; a different config is refused with the differing keys named,
unless the user passes `--overwrite`, which moves the old contents aside instead of deleting them.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil
from typing import Any

import ml_collections

from cxr_jax import configlib
from cxr_jax.errors import ConfigError, UserError
from cxr_jax.utils import files

CONFIG_FILE = "config.json"
# Keys that may change between a run and its resumption without changing what it computes.
RESUME_SAFE_KEYS = ("log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
                    "eval_every", "multihost", "progress")
# Keys that may change between runs of one task in the same workdir, because the task keeps each
# value's outputs apart (predict writes predictions-<slug of input>.csv per input).
TASK_RESUME_SAFE_KEYS: dict[str, tuple[str, ...]] = {"predict": ("input",)}


def default_cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("CXR_JAX_CACHE") or
                      pathlib.Path.home() / ".cache" / "cxr_jax")


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def prepare(workdir: str | os.PathLike, config: ml_collections.ConfigDict, *,
            overwrite: bool = False, write: bool = True) -> pathlib.Path:
  """Creates `workdir` for `config`, or checks that an existing one belongs to an equal config.

  On several hosts only the writer (process 0) checks, moves aside and writes; the others wait for
  it and then check what it left, so that the old run is moved once and every process agrees.
  """
  if "://" in str(workdir):
    raise ConfigError(f"--workdir={workdir}: URLs are not supported; use a path on a file system "
                      "every host sees (a local disk for one host; NFS or a mounted bucket, e.g. "
                      "gcsfuse, for several)")
  path = pathlib.Path(workdir)
  if _process_count() == 1:
    return _prepare(path, config, overwrite=overwrite, write=write)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  if is_writer():
    try:
      return _prepare(path, config, overwrite=overwrite, write=write)
    finally:  # also when refusing: the others must not wait forever, they refuse the same way
      multihost_utils.sync_global_devices(f"cxr_jax.workdir.prepare {path}")
  multihost_utils.sync_global_devices(f"cxr_jax.workdir.prepare {path}")
  # The writer has moved any old run aside and written the config: nothing is left to move here.
  return _prepare(path, config, overwrite=False, write=False)


def _prepare(path: pathlib.Path, config: ml_collections.ConfigDict, *, overwrite: bool,
             write: bool) -> pathlib.Path:
  saved = path / CONFIG_FILE
  # A workdir holding nothing but a config (a run refused at start-up) holds no run to protect.
  holds_run = saved.exists() and any(p.name != CONFIG_FILE for p in path.iterdir())
  if holds_run:
    try:
      old = json.loads(saved.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise UserError(f"{saved}: cannot read the saved config ({e}); pass --overwrite to start "
                      "a new run here (the old contents are kept aside)") from None
    new = json.loads(config_to_json(config))
    task_safe = TASK_RESUME_SAFE_KEYS.get(str(new.get("task", "")), ())
    if old.get("task") != new.get("task"):
      task_safe = ()
    differing = [k for k in configlib.diff(old, new)
                 if k.rsplit(".", 1)[-1] not in RESUME_SAFE_KEYS and k not in task_safe]
    if differing and not overwrite:
      shown = ", ".join(f"{k} ({_fmt(configlib.flatten(old).get(k))} -> "
                        f"{_fmt(configlib.flatten(new).get(k))})" for k in differing[:12])
      raise UserError(
          f"{path} holds a run with a different config; differing keys: {shown}. Use another "
          "--workdir, or pass --overwrite to move the old run aside and start afresh.")
    if differing and overwrite:
      stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
      aside = path.with_name(f"{path.name}.old-{stamp}")
      n = 1
      while aside.exists():  # two --overwrite within a second: never move a run into another
        n += 1
        aside = path.with_name(f"{path.name}.old-{stamp}-{n}")
      shutil.move(str(path), str(aside))
      print(f"Moved the previous run in {path} to {aside}")
  path.mkdir(parents=True, exist_ok=True)
  if write and is_writer():
    files.write_text_atomic(saved, config_to_json(config))
  return path


def _process_count() -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_count()


def is_writer() -> bool:
  """Only process 0 of a multi-host run writes logs, images and reports."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index() == 0


def _fmt(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."
