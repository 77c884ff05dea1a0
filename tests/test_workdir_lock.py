"""A workdir belongs to one live run: the OS lock `workdir.prepare` takes in `<workdir>/run.lock`.

Other processes are real ones (`python -c` on the package, or `main.py`); the lock is the kernel's
(flock), so a process that dies releases it. That a run with a refused intruder still ends with a
lone run's checkpoints, bit for bit, is tests/test_kill_resume.py's (its uninterrupted classifier).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from cxr_jax import workdir as workdir_lib

from conftest import REPO_ROOT

# Tries the lock from another process: prints the one-line refusal and exits 2, or holds it until
# stdin closes (or it is killed), printing "held" once it has it.
_OTHER = textwrap.dedent("""
    import sys
    from cxr_jax import workdir
    from cxr_jax.errors import UserError
    try:
      workdir.acquire(sys.argv[1])
    except UserError as e:
      print(e, flush=True)
      sys.exit(2)
    print("held", flush=True)
    sys.stdin.read()
""")


def _other(path, **kw) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", _OTHER, str(path)], cwd=REPO_ROOT, text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          **kw)


def _refused(path) -> str:
  """The other process's one-line refusal (it must be refused)."""
  out, err = _other(path).communicate(timeout=60)
  lines = out.strip().splitlines()
  assert len(lines) == 1 and "is in use by another run" in lines[0], (out, err)
  return lines[0]


def _cfg(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict({"task": "pix2pix", "batch_size": 2}, **kw))


@pytest.fixture(autouse=True)
def _release_locks():
  yield
  workdir_lib.release()


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
  run = workdir_lib.prepare(tmp_path / "run", _cfg())
  holder = json.loads((run / workdir_lib.LOCK_FILE).read_text())
  assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
  line = _refused(run)
  assert line.startswith(f"{run} is in use by another run (pid {os.getpid()} on host "
                         f"{socket.gethostname()}, started {holder['started']}")
  # Re-preparing a workdir this process holds keeps the lock (the experiment's stages, resumes).
  assert workdir_lib.prepare(run, _cfg()) == run
  nested = workdir_lib.prepare(run / "stages" / "a", _cfg(task="classifier"))
  assert (nested / workdir_lib.LOCK_FILE).is_file()
  _refused(nested)
  workdir_lib.release(run)
  assert (run / workdir_lib.LOCK_FILE).read_text() == ""  # a run that ended leaves it empty
  other = _other(run)
  try:
    assert other.stdout.readline().strip() == "held"
  finally:
    other.communicate(timeout=60)
  _refused(nested)  # still ours


def test_a_dead_holders_lock_is_taken_over_with_a_note(tmp_path, caplog):
  run = tmp_path / "run"
  run.mkdir()
  other = _other(run)
  assert other.stdout.readline().strip() == "held"
  with pytest.raises(workdir_lib.UserError, match=f"pid {other.pid} on host"):
    workdir_lib.prepare(run, _cfg())
  assert not (run / workdir_lib.CONFIG_FILE).exists()  # refused before writing anything
  other.send_signal(signal.SIGKILL)
  other.communicate(timeout=60)
  with caplog.at_level(logging.WARNING):
    workdir_lib.prepare(run, _cfg())
  notes = [r.getMessage() for r in caplog.records if "Took over the lock" in r.getMessage()]
  assert len(notes) == 1 and f"pid {other.pid} on host" in notes[0] and str(run) in notes[0]
  assert json.loads((run / workdir_lib.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_overwrite_moves_the_run_aside_and_locks_the_new_workdir(tmp_path):
  run = workdir_lib.prepare(tmp_path / "run", _cfg())
  (run / "result.txt").write_text("old")
  workdir_lib.prepare(run, _cfg(batch_size=4), overwrite=True)
  aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
  assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["config.json",
                                                                          "result.txt"]
  assert sorted(p.name for p in run.iterdir()) == ["config.json", "run.lock"]
  _refused(run)


def test_main_on_a_busy_workdir_stops_at_once_in_one_line(tmp_path):
  run = workdir_lib.prepare(tmp_path / "run", _cfg())
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "main.py"),
       f"--config={REPO_ROOT / 'configs/prepare_data.py'}:smoke", f"--workdir={run}"],
      cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [
      f"error: {run} is in use by another run (pid {os.getpid()} on host "
      f"{socket.gethostname()}, started "
      f"{json.loads((run / 'run.lock').read_text())['started']}; lock file {run / 'run.lock'}): "
      f"wait for it to end, or use another --workdir"]
  assert sorted(p.name for p in run.iterdir()) == ["config.json", "run.lock"]
