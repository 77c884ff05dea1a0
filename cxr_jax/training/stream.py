"""Streamed training input: the batches of a run read from disk by grain, step by step, for data
that outgrow the device (`config.data.placement`: docs/architecture.md, "Where the training images
live").

A resident run keeps its training images on the devices and draws each step's batch there from
(`state.rng`, `state.step`) (`fit.resident_step`). A streamed run draws the same indices, with the
trainer's own `batch_indices` run on the host CPU, and reads only those images:

    grain.MapDataset.range(total_steps)      one element per training step
      .map(read the batch of step s)         indices of s (host CPU), this process's rows of the
                                             global batch read from the array_record copy
                                             (`data.records.RecordImages`) and decoded, then put
                                             on this process's devices as global arrays with the
                                             `data` sharding the step uses
      .to_iter_dataset(ReadOptions(threads, prefetch))   read ahead on worker threads

So a streamed run trains on exactly the batches a resident run of the same seed trains on
(augmentation stays on the device, the same code for both), each process reads only its share of
each global batch (disjoint rows), and host memory holds `prefetch` batches, not the data set.
The iterator's state (grain's `get_state`) is saved in every checkpoint (`Checkpointer.
iterator_state`) and restored with it; each element carries its step, which is checked against the
training step, so a resumed run can never train on another step's batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import jax
import numpy as np

from cxr_jax.data import records
from cxr_jax.errors import UserError
from cxr_jax.training import mesh as mesh_lib

DEFAULT_THREADS = 4
DEFAULT_PREFETCH = 8


def options(data_cfg: Any) -> dict[str, int]:
  """`fit.fit`'s reader threads and read-ahead of a streamed run, from `config.data`."""
  return {"stream_threads": int(data_cfg.get("stream_threads", DEFAULT_THREADS)),
          "stream_prefetch": int(data_cfg.get("stream_prefetch", DEFAULT_PREFETCH))}


def host_device() -> jax.Device | None:
  """The device the host-side index computation runs on: the CPU (None where the CPU backend is
  not loaded, e.g. JAX_PLATFORMS=cuda: the default device then computes the few indices)."""
  try:
    return jax.local_devices(backend="cpu")[0]  # this process's: jax.devices() lists every host's
  except RuntimeError:
    return None


class Stream:
  """The training batches of `trainer` over `data` (arrays or `records.LazyImages`, indexed by
  `trainer.batch_indices`), one per step, from step `start` on (`open`)."""

  def __init__(self, trainer: Any, data: Sequence[Any], *, rng: jax.Array, batch_size: int,
               total_steps: int, threads: int = DEFAULT_THREADS,
               prefetch: int = DEFAULT_PREFETCH):
    self.trainer, self.data, self.mesh = trainer, tuple(data), trainer.mesh
    self.total_steps, self.batch_size = int(total_steps), int(batch_size)
    self.sizes = tuple(int(len(x)) for x in self.data)
    self.sharding = mesh_lib.batch_sharding(self.mesh)
    self.spec = tuple(jax.ShapeDtypeStruct((self.batch_size,) + tuple(x.shape[1:]),
                                           np.dtype(x.dtype), sharding=self.sharding)
                      for x in self.data)
    # This process's rows of a global batch (the rows its devices hold), in order.
    index_map = self.sharding.addressable_devices_indices_map((self.batch_size,))
    self.rows = np.asarray(sorted({r for idx in index_map.values()
                                   for r in range(*idx[0].indices(self.batch_size))}), np.int64)
    self._position = {int(r): k for k, r in enumerate(self.rows)}
    device = host_device()
    key_data = jax.random.key_data(rng)
    if isinstance(key_data, jax.Array) and not key_data.is_fully_addressable:
      key_data = key_data.addressable_data(0)  # replicated: this process's copy (multi-host)
    key_data = np.asarray(key_data)
    impl = jax.random.key_impl(rng)
    self._rng = jax.random.wrap_key_data(
        key_data if device is None else jax.device_put(key_data, device), impl=impl)
    self._indices = jax.jit(trainer.batch_indices, static_argnums=2)
    self._threads, self._prefetch = max(1, int(threads)), max(1, int(prefetch))
    self._iter = None
    self._next_step = 0

  # ---------------------------------------------------------------------------- the pipeline

  def indices(self, step: int) -> tuple[np.ndarray, ...]:
    """The global indices into each data array of the batch of `step` (host numpy)."""
    out = self._indices(self._rng, np.int32(step), self.sizes)
    return tuple(np.asarray(i, np.int64) for i in out)

  def _read(self, step: int) -> tuple[int, tuple[jax.Array, ...]]:
    """Step `step`'s batch: this process's rows read and decoded, as global sharded arrays."""
    arrays = []
    for x, idx, spec in zip(self.data, self.indices(step), self.spec):
      local = records.read(x, idx[self.rows])
      arrays.append(jax.make_array_from_callback(
          spec.shape, self.sharding,
          lambda index, local=local: local[[self._position[r] for r in
                                            range(*index[0].indices(self.batch_size))]]))
    return int(step), tuple(arrays)

  def dataset(self) -> grain.MapDataset:
    return grain.MapDataset.range(self.total_steps).map(self._read)

  def open(self, start: int, saved: dict | None = None) -> None:
    """Positions the stream at step `start`: from `saved` (the iterator state of the checkpoint
    of `start`), else at `start` itself (a fresh run, or a resident run's checkpoint)."""
    self.close()
    options = grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=self._prefetch)
    it = self.dataset().to_iter_dataset(options).__iter__()
    state = dict(saved["grain"]) if saved else dict(it.get_state(), next_index=int(start))
    if saved and int(saved.get("step", start)) != start:
      raise UserError(f"the checkpoint of step {start} holds the input pipeline of step "
                      f"{saved.get('step')}: it was not written by this run's code; move the "
                      "checkpoints aside to start again")
    it.set_state(state)
    self._iter, self._next_step = it, int(start)

  def next(self) -> tuple[jax.Array, ...]:
    """The batch of the next step (checked: the element's step is the training step)."""
    if self._iter is None:
      raise RuntimeError("Stream.open() first")
    step, batch = next(self._iter)
    if step != self._next_step:
      raise RuntimeError(f"the input pipeline gave the batch of step {step} for step "
                         f"{self._next_step}")
    self._next_step += 1
    return batch

  def state(self) -> dict:
    """What a checkpoint keeps (`Checkpointer.iterator_state`): grain's iterator state and the
    step it is at."""
    return {"grain": self._iter.get_state(), "step": self._next_step,
            "process_count": jax.process_count()}

  def close(self) -> None:
    it, self._iter = self._iter, None
    if it is not None and hasattr(it, "close"):
      it.close()
