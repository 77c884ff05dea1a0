"""Process-level set-up done once before any task: multi-host join and the compilation cache."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cxr_jax import workdir as workdir_lib
from cxr_jax.errors import ConfigError

_initialized = False


def enable_compilation_cache(cache_dir: str | None = None) -> None:
  """Persists compiled XLA programs so that a second run (or test session) skips compilation."""
  path = (os.environ.get("JAX_COMPILATION_CACHE_DIR") or cache_dir or
          str(workdir_lib.default_cache_dir() / "jax-compilation"))
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _connect_cpu_collectives() -> None:
  """Connects the CPU processes' collectives now, while the processes are in step.

  Gloo connects a group of devices when the first program using it runs, and fails if a peer is
  more than 30 s late ("Gloo context initialization failed: DEADLINE_EXCEEDED"). On CPU only
  process 0 gets persistent-cache hits (the cache key holds a per-process topology fingerprint
  and only process 0 writes), so it runs ahead while the others compile the first training step.
  Once connected, a group waits for late peers without that limit.
  """
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  multihost_utils.sync_global_devices("cxr_jax.runtime: connect")  # one device per process
  mesh = Mesh(np.asarray(jax.devices()), ("all",))  # every device, as the `data` mesh
  ones = jax.make_array_from_callback((jax.device_count(),), NamedSharding(mesh, P("all")),
                                      lambda idx: np.ones(1, np.float32))
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones)
  total.block_until_ready()


def joins_multihost(config) -> bool:
  """Whether `initialize` joins a multi-host run (asked for, or on a Cloud TPU VM)."""
  return bool(config.get("multihost", False) or os.environ.get("TPU_WORKER_HOSTNAMES")
              or os.environ.get("CLOUD_TPU_TASK_ID"))


def initialize(config) -> None:
  """Joins a multi-host run when asked (or on a Cloud TPU VM) and turns on the compile cache."""
  global _initialized
  if _initialized:
    return
  if joins_multihost(config):
    # On Cloud TPU VMs and under SLURM / Open MPI the coordinator is found automatically; elsewhere
    # set CXR_COORDINATOR_ADDRESS (host:port of process 0), CXR_NUM_PROCESSES and CXR_PROCESS_ID.
    env = os.environ
    kwargs = {}
    if env.get("CXR_COORDINATOR_ADDRESS"):
      try:
        kwargs = dict(coordinator_address=env["CXR_COORDINATOR_ADDRESS"],
                      num_processes=int(env["CXR_NUM_PROCESSES"]),
                      process_id=int(env["CXR_PROCESS_ID"]))
      except (KeyError, ValueError):
        raise ConfigError("config.multihost: with CXR_COORDINATOR_ADDRESS set, CXR_NUM_PROCESSES "
                          "and CXR_PROCESS_ID must be set to integers too") from None
    try:
      jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
      raise ConfigError(f"config.multihost: could not join the multi-host run ({e}); on a Cloud "
                        "TPU VM run the command on every worker, elsewhere set "
                        "CXR_COORDINATOR_ADDRESS, CXR_NUM_PROCESSES and CXR_PROCESS_ID") from None
  if jax.process_count() > 1 and jax.default_backend() == "cpu":
    _connect_cpu_collectives()
  enable_compilation_cache()
  _initialized = True
  logging.info("JAX %s, process %d of %d, %d local / %d global devices (%s)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].device_kind)
