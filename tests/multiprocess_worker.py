"""One process of the two-process pix2pix run of `test_multiprocess.py` (not a test itself).

It does what `main.py --config=configs/pix2pix.py:smoke --config.multihost=True --overwrite` does
(join through CXR_COORDINATOR_ADDRESS / CXR_NUM_PROCESSES / CXR_PROCESS_ID, move the old workdir
aside, train with checkpoints, export the generator), then restores the last checkpoint as a
resumed run would, and saves what this process holds for the test to compare. Then it trains the
same config again with `--config.data.placement=stream` in WORKDIR-stream, counting the training
rows this process reads (each process reads only its share of each global batch). Usage:

  python tests/multiprocess_worker.py WORKDIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import numpy as np
from absl import logging

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# pylint: disable=wrong-import-position
import jax

from cxr_jax import configlib
from cxr_jax import runtime
from cxr_jax import tasks
from cxr_jax import workdir as workdir_lib
from cxr_jax.data import records
from cxr_jax.training import checkpoint
from cxr_jax.training import export
from cxr_jax.training import fit
from cxr_jax.training import translator
from cxr_jax.training.checkpoint import Checkpointer


def smoke_config():
  config = configlib.load_config_file(REPO_ROOT / "configs/pix2pix.py", "smoke")
  config.multihost = True
  return config


def dump_generator(path: pathlib.Path, run: pathlib.Path) -> None:
  """This process's view of the exported generator, flattened to {key path: array}."""
  gen = export.load_generator(run / translator.GENERATOR_DIR)
  leaves = jax.tree_util.tree_flatten_with_path({"params": gen.params, "stats": gen.stats})[0]
  np.savez(path, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})


def main(workdir: str, out_dir: str) -> None:
  out = pathlib.Path(out_dir)
  logging.use_absl_handler()  # main.py's app.run does this: INFO lines with times, for failures
  logging.set_verbosity(logging.INFO)
  config = smoke_config()
  runtime.initialize(config)
  pid = jax.process_index()
  (out / f"process_{pid}.json").write_text(json.dumps({
      "process_index": pid, "process_count": jax.process_count(),
      "local_devices": jax.local_device_count(), "global_devices": jax.device_count()}))
  # The writer arrives late, so that a non-writer that would move the old run aside itself (the
  # multi-host --overwrite bug) gets there first and says so on its stdout.
  if pid == 0:
    time.sleep(float(os.environ.get("CXR_TEST_WRITER_DELAY", "0")))
  run = workdir_lib.prepare(workdir, config, overwrite=True)
  # The trainer's state, as shapes and shardings: the restore target below, without building the
  # model again (that would compile its initialisation again, 15 s on process 1).
  targets = []
  place_state = fit.place_state

  def recording_place_state(state, mesh):
    state = place_state(state, mesh)
    targets.append(checkpoint.abstract(state))
    return state

  fit.place_state = recording_place_state
  tasks.get(config.task)(config, run)
  dump_generator(out / f"generator_{pid}.npz", run)

  # The restore a resumed run starts with, by both processes.
  ckpt = Checkpointer(run / "checkpoints")
  state, step = ckpt.restore_latest(targets[0])
  ckpt.close()
  np.savez(out / f"restored_{pid}.npz", step=step,
           **{f"state/{k}": np.asarray(v) for k, v in checkpoint.flatten(state).items()})

  # Streamed: the same training, its batches read by grain, each process its own rows.
  rows_read = []
  read = records.read

  def counting_read(x, ids):
    rows_read.append(len(ids))
    return read(x, ids)

  records.read = counting_read
  config.data.placement = "stream"
  streamed = workdir_lib.prepare(f"{workdir}-stream", config)
  tasks.get(config.task)(config, streamed)
  records.read = read
  (out / f"stream_{pid}.json").write_text(json.dumps({"rows_read": rows_read}))
  print(f"worker {pid}: done", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
