"""The device mesh: one `data` axis over every device of every process.

Training data is small (a few hundred MB at 256 px), so it is replicated on each device and each
step gathers its share of the global batch there; parameters are replicated; the batch dimension
of activations is sharded along `data`, which makes BatchNorm statistics global-batch statistics.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cxr_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D `data` mesh over the first `num_devices` devices (default: all)."""
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise ConfigError(f"config.num_devices: {n} requested, {len(devices)} available")
  return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_global_batch(batch_size: int, mesh: Mesh, key: str = "batch_size") -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ConfigError(f"config.{key}: the global batch ({batch_size}) must be a multiple of the "
                      f"number of devices ({n}); use {max(n, batch_size // n * n)} or a multiple")


def put_replicated(tree, mesh: Mesh):
  """Host arrays -> arrays replicated on every device of the mesh (multi-host safe: each process
  holds the same host copy and provides its local devices' data)."""
  sharding = replicated(mesh)

  def put(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
      # Typed keys travel as their key data (no numpy form), wrapped again on the devices.
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if isinstance(x, jax.Array) and jax.process_count() == 1:
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(put, tree)


def fetch(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host, batch-sharded) result as one host array on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def map_batches(fn, inputs: tuple[np.ndarray, ...], batch_size: int, mesh: Mesh) -> np.ndarray:
  """`fn(*batch)` over fixed-size (zero-padded, so compiled once) batches sharded along `data`;
  the batch size is rounded up to a multiple of the device count. Every batch is dispatched before
  the first result is fetched, so the device never waits for the host between batches."""
  n_dev = mesh.devices.size
  batch_size = max(n_dev, -(-batch_size // n_dev) * n_dev)
  n = len(inputs[0])
  dispatched = []
  for start in range(0, n, batch_size):
    parts = []
    for x in inputs:
      chunk = np.asarray(x[start:start + batch_size])
      if len(chunk) < batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:],
                                                chunk.dtype)])
      parts.append(put_batch(chunk, mesh))
    dispatched.append((fn(*parts), min(batch_size, n - start)))
  out = [fetch(y)[:valid] for y, valid in dispatched]
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def put_batch(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host-global batch -> an array sharded along `data` (each process keeps its slices)."""
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, batch_sharding(mesh), lambda idx: host[idx])
