"""Two CPU processes joined by jax.distributed train pix2pix exactly like one process does.

Multi-host runs cannot be tried on a laptop otherwise: this runs the project's own path (joining
through CXR_COORDINATOR_ADDRESS / CXR_NUM_PROCESSES / CXR_PROCESS_ID, --overwrite, the trainer,
Orbax checkpoints written and restored by both processes, export) in 2 processes x 2 CPU devices
and compares every number with a 1-process run on 4 devices and the same global batch; then the
same training streamed (`config.data.placement="stream"`), each process reading only its half of
every global batch from the array_record copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from cxr_jax import configlib
from cxr_jax import workdir as workdir_lib
from cxr_jax.training import checkpoint
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training import pix2pix
from cxr_jax.training import translator
from cxr_jax.training.checkpoint import Checkpointer

from conftest import REPO_ROOT
from conftest import xla_flags_with_devices

WORKER = REPO_ROOT / "tests" / "multiprocess_worker.py"
NUM_PROCESSES = 2
TIMEOUT_S = 300  # a hang (a lost peer, a missed barrier) fails the test instead of blocking CI
LAST_STEP = 12  # configs/pix2pix.py:smoke: 3 epochs of 4 steps


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _workers(workdir, out_dir):
  """Runs the worker processes while the body runs; yields a list that receives their output.

  Every way out (a failed worker, a failure in the body, the time limit) kills the workers that
  are still running: a process whose peer died would otherwise wait for it for minutes.
  """
  port = _free_port()
  procs, logs, texts = [], [], []
  try:
    for pid in range(NUM_PROCESSES):
      env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT),
                 XLA_FLAGS=xla_flags_with_devices(2),  # the suite's compiler settings
                 JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",  # jax's default; mpi needs an MPI
                 CXR_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 CXR_NUM_PROCESSES=str(NUM_PROCESSES), CXR_PROCESS_ID=str(pid),
                 CXR_TEST_WRITER_DELAY="1")
      # pylint: disable-next=consider-using-with
      logs.append(open(out_dir / f"log_{pid}.txt", "w+", encoding="utf-8"))
      procs.append(subprocess.Popen([sys.executable, str(WORKER), str(workdir), str(out_dir)],
                                    cwd=REPO_ROOT, env=env, stdout=logs[-1],
                                    stderr=subprocess.STDOUT))
    yield texts
    deadline = time.monotonic() + TIMEOUT_S
    while (any(p.poll() is None for p in procs) and time.monotonic() < deadline
           and all(p.returncode in (None, 0) for p in procs)):
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.seek(0)
      texts.append(log.read())
      log.close()
  failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
  assert not failed, "worker(s) failed or timed out (rc -9: killed): {}\n{}".format(
      failed, "\n".join(f"--- process {i}:\n{t[-5000:]}" for i, t in enumerate(texts)))


def _restore(directory, template) -> dict:
  """The full training state (params, batch stats, optimiser states, step, rng) of the last
  checkpoint, restored onto this process's 4 devices."""
  ckpt = Checkpointer(directory, asynchronous=False)
  try:
    assert ckpt.latest_step() == LAST_STEP, ckpt.all_steps()
    return checkpoint.flatten(jax.device_get(ckpt.restore(LAST_STEP, template)))
  finally:
    ckpt.close()


def _assert_close(actual: dict, expected: dict, what: str) -> None:
  """Equal up to float32 rounding: Gloo sums the processes' shares of a reduction in another order
  than one process sums its devices', and 12 GAN steps compound that (it is not bitwise)."""
  assert sorted(actual) == sorted(expected), what
  for key, value in expected.items():
    value = np.asarray(value)
    # Parameters and statistics move at most 12 x 2e-4 (the learning rate) from their initial
    # values, so 5e-6 still catches an update that is 0.2 % off. Adam's moments of gradients that
    # are rounding noise (biases before BatchNorm) differ by more, relative to their element.
    is_moment = key.split("/")[1:2] == ["opt"]
    scale = float(np.max(np.abs(value))) if is_moment and value.size else 0.0
    np.testing.assert_allclose(actual[key], value, rtol=2e-4, atol=max(5e-6, 2e-3 * scale),
                               err_msg=f"{what}: {key}")


def test_two_processes_train_checkpoint_and_restore_like_one(tmp_path):
  config = configlib.load_config_file(REPO_ROOT / "configs/pix2pix.py", "smoke")
  assert jax.device_count() == 4  # the reference: 1 process, 4 devices (tests/conftest.py)

  # An older run of another config in the workdir: --overwrite must move it aside exactly once.
  run, out = tmp_path / "run", tmp_path / "out"
  out.mkdir()
  old_config = configlib.load_config_file(REPO_ROOT / "configs/pix2pix.py", "smoke")
  old_config.seed = 1
  workdir_lib.prepare(run, old_config)
  workdir_lib.release(run)  # that run has ended: the workers' process 0 takes the workdir
  (run / "old_run.txt").write_text("the previous run")

  with _workers(run, out) as logs:
    # The reference, in this process meanwhile (the workers mostly wait for each other's compiles).
    reference = translator.train(pix2pix.Pix2Pix, config,
                                 workdir_lib.prepare(tmp_path / "ref", config))

  facts = [json.loads((out / f"process_{i}.json").read_text()) for i in range(NUM_PROCESSES)]
  assert [f["process_index"] for f in facts] == [0, 1]
  assert all(f["process_count"] == 2 and f["local_devices"] == 2 and f["global_devices"] == 4
             for f in facts), facts

  # --overwrite: only the writer moved the old run aside; the other process waited for it.
  aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
  assert len(aside) == 1, aside
  assert sorted(p.name for p in aside[0].iterdir()) == ["config.json", "old_run.txt"]
  assert "Moved the previous run" in logs[0] and "Moved the previous run" not in logs[1]
  assert json.loads((run / "config.json").read_text())["seed"] == 0

  # The whole training state after 12 steps: 2 processes == 1 process on the same global batch.
  template = pix2pix.Pix2Pix(config, image_size=config.data.image_size, steps_per_epoch=1,
                             mesh=mesh_lib.make_mesh()).init_state()
  expected = _restore(tmp_path / "ref" / "checkpoints", template)
  saved = _restore(run / "checkpoints", template)  # written by 2 processes, read by 1
  assert int(saved["step"]) == LAST_STEP
  _assert_close(saved, expected, "2 processes vs 1, after 12 steps")

  for pid in range(NUM_PROCESSES):
    # What each process restored (as a resumed run does) is exactly what was saved.
    with np.load(out / f"restored_{pid}.npz") as restored:
      assert int(restored["step"]) == LAST_STEP
      got = {k[len("state/"):]: restored[k] for k in restored.files if k.startswith("state/")}
    assert sorted(got) == sorted(saved)
    for key, value in saved.items():
      np.testing.assert_array_equal(got[key], value, err_msg=f"process {pid} restored {key}")
    # The exported generator, as each process loads it, equals the reference's.
    with np.load(out / f"generator_{pid}.npz") as gen:
      _assert_close(dict(gen), _keyed({"params": reference.params, "stats": reference.stats}),
                    f"generator loaded by process {pid}")


  # Streamed in 2 processes: each read its 2 of the 4 rows of every (source, target) batch, and the
  # state equals the 1-process (resident) run's to the same rounding.
  streamed = _restore(tmp_path / "run-stream" / "checkpoints", template)
  _assert_close(streamed, expected, "2 processes streamed vs 1 process resident, after 12 steps")
  for pid in range(NUM_PROCESSES):
    rows = json.loads((out / f"stream_{pid}.json").read_text())["rows_read"]
    assert rows == [config.batch_size // NUM_PROCESSES] * (2 * LAST_STEP), (pid, rows)


def _keyed(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
