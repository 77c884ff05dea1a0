"""A run's working directory: created once, reused only by the same config, never clobbered.

The resolved config is written to `<workdir>/config.json`. Starting again with the same workdir and
an equal config resumes the run; a different config is refused with the differing keys named,
unless the user passes `--overwrite`, which moves the old contents aside instead of deleting them.

A workdir belongs to one live run: `prepare` takes an OS lock (`fcntl.flock`) on
`<workdir>/run.lock` for the process's lifetime (or until `release`), writing the holder's pid, host
and start time in it. A second run on the same workdir stops at once, naming the holder; the kernel
releases the lock when its process dies, so a lock left by a killed run is simply taken over (with a
note). Multi-host runs take it on process 0 only. Nested workdirs (the experiment's stages) take
their own lock files; a process re-preparing a workdir it holds keeps its lock.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import pathlib
import shutil
import socket
import sys
from typing import Any

import ml_collections
from absl import logging

from cxr_jax import configlib
from cxr_jax.errors import ConfigError, UserError
from cxr_jax.utils import files

CONFIG_FILE = "config.json"
LOCK_FILE = "run.lock"
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
  path = _path(workdir)
  if _process_count() == 1:
    return _prepare(path, config, overwrite=overwrite, write=write, lock=True)
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  if is_writer():
    ok = False
    try:
      result = _prepare(path, config, overwrite=overwrite, write=write, lock=True)
      ok = True
      return result
    finally:  # also when refusing: the others must not wait forever, they refuse too
      multihost_utils.broadcast_one_to_all(np.int32(ok))
  if not int(multihost_utils.broadcast_one_to_all(np.int32(0))):
    raise UserError(f"{path}: process 0 refused this workdir (its message says why)")
  # The writer has moved any old run aside and written the config: nothing is left to move here.
  return _prepare(path, config, overwrite=False, write=False, lock=False)


def lock(workdir: str | os.PathLike) -> pathlib.Path:
  """Creates `workdir` and takes its lock (see `acquire`) before anything else happens: a
  one-process run calls it first, so that a busy workdir is refused before JAX starts."""
  path = _path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  acquire(path)
  return path


def _path(workdir: str | os.PathLike) -> pathlib.Path:
  if "://" in str(workdir):
    raise ConfigError(f"--workdir={workdir}: URLs are not supported; use a path on a file system "
                      "every host sees (a local disk for one host; NFS or a mounted bucket, e.g. "
                      "gcsfuse, for several)")
  return pathlib.Path(workdir)


def _prepare(path: pathlib.Path, config: ml_collections.ConfigDict, *, overwrite: bool,
             write: bool, lock: bool) -> pathlib.Path:
  if lock:  # before looking: a run that is refused must not read a half-moved workdir
    path.mkdir(parents=True, exist_ok=True)
    acquire(path)
  saved = path / CONFIG_FILE
  # A workdir holding nothing but a config (a run refused at start-up) holds no run to protect.
  holds_run = saved.exists() and any(p.name not in (CONFIG_FILE, LOCK_FILE)
                                     for p in path.iterdir())
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
      if lock:  # the old lock went aside with its folder: lock the new one, drop the old file
        path.mkdir(parents=True)
        acquire(path)
        (aside / LOCK_FILE).unlink(missing_ok=True)
      print(f"Moved the previous run in {path} to {aside}")
  path.mkdir(parents=True, exist_ok=True)
  if write and is_writer():
    files.write_text_atomic(saved, config_to_json(config))
  return path


# ------------------------------------------------------------------------------ the run's lock

_HELD: dict[str, int] = {}  # resolved workdir -> descriptor of its locked run.lock


def acquire(path: str | os.PathLike) -> None:
  """Locks `<path>/run.lock` for this process, or refuses in one line naming the holder.

  Non-blocking: a busy workdir is an error at once, never a wait. Re-entrant: a workdir this
  process holds stays held (also when re-prepared); one that was moved aside is locked afresh.
  """
  path = pathlib.Path(path)
  key = str(path.resolve())
  lock_path = path / LOCK_FILE
  fd = _HELD.get(key)
  if fd is not None:
    try:
      here, held = os.stat(lock_path), os.fstat(fd)
      if (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino):
        return
    except FileNotFoundError:
      pass
    del _HELD[key]  # the folder was moved aside, with the file this descriptor locks
    os.close(fd)
  try:
    import fcntl  # pylint: disable=import-outside-toplevel
  except ImportError:  # not POSIX (Windows): nothing prevents two runs here
    return
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = _read_holder(fd)
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise UserError(f"{path} is in use by another run ({_describe(holder)}; lock file "
                      f"{lock_path}): wait for it to end, or use another --workdir") from None
    logging.warning("Cannot lock %s (%s): this file system does not support locks, so nothing "
                    "stops a second run from using %s at the same time", lock_path,
                    e.strerror or e, path)
    return
  previous = _read_holder(fd)
  info = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc).strftime(
              "%Y-%m-%d %H:%M:%S UTC"),
          "command": " ".join(sys.argv)}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
  _HELD[key] = fd
  inside_held = any(str(parent) in _HELD for parent in path.resolve().parents)
  if previous and not inside_held:  # a run that ended normally empties the file (release)
    logging.warning("Took over the lock of %s left by a run that no longer runs (%s)", path,
                    _describe(previous))


def release(path: str | os.PathLike | None = None) -> None:
  """Releases this process's lock on `path` (all its workdirs if None), emptying the lock file:
  a run that ended leaves an empty one, a killed run its holder's details."""
  keys = list(_HELD) if path is None else [str(pathlib.Path(path).resolve())]
  for key in keys:
    fd = _HELD.pop(key, None)
    if fd is None:
      continue
    try:
      os.ftruncate(fd, 0)
    finally:
      os.close(fd)  # closing the descriptor releases the lock


def _read_holder(fd: int) -> dict:
  try:
    text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    return json.loads(text) if text else {}
  except (OSError, ValueError):
    return {}


def _describe(holder: dict) -> str:
  if not holder:
    return "a process that is just starting"
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
          f"{holder.get('started', '?')}")


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
