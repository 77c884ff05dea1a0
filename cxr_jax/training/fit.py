"""The one training driver: what every model's training shares, so that a trainer file keeps only
its networks, losses, step, batch sampling, validation hook and export metadata.

`fit(trainer, workdir, ...)` restores the newest readable checkpoint, places the training arrays on
the devices (replicated), compiles the training chunk once, runs the host loop (`loop.run`) with
the TensorBoard writer open, closes the checkpoints and exports the final (or best) state.

The chunk runs up to `steps_per_call` steps in one device call: a `lax.fori_loop` whose number of
steps is a traced argument, writing per-step metrics into a fixed `[steps_per_call]` buffer. A
shorter chunk (a log or checkpoint boundary, a run resumed at an odd step, the end) is the same
program, so a run compiles exactly one training program whatever its schedule or resume point.

A trainer (see `Trainer`) builds its networks on `trainer.mesh` and keeps them in `NetState`s, one
per network, which apply their optimiser's update as Flax's `TrainState` does.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Protocol

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from cxr_jax.training import loop
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training.checkpoint import Checkpointer
from cxr_jax.training.summary import SummaryWriter


@flax.struct.dataclass
class NetState:
  """One network's trainable state: parameters, BatchNorm statistics, optimiser state."""
  params: Any
  stats: Any
  opt: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, params: Any, stats: Any, tx: optax.GradientTransformation) -> "NetState":
    return cls(params=params, stats=stats, opt=tx.init(params), tx=tx)

  def apply_gradients(self, grads: Any, stats: Any) -> "NetState":
    """One optimiser update with `grads`; `stats` are the statistics the forward pass produced."""
    updates, opt = self.tx.update(grads, self.opt, self.params)
    return self.replace(params=optax.apply_updates(self.params, updates), stats=stats, opt=opt)


class Trainer(Protocol):
  """What `fit` needs from a model's trainer.

  `init_state()` returns the initial state: a pytree with `step` (int32 scalar) and `rng` (a typed
  key); `train_step(state, data)` draws the batch of `state.step` from (`state.rng`, `state.step`)
  and the device-resident `data` (what `fit` was given, in that order), updates and returns
  `(state, metrics)` with `step` incremented; `export(directory, state, step)` writes the export.
  Optional: `validate(step, state) -> metrics` (every `eval_every` steps, weighed for the best
  checkpoint) and `hook(step, state, writer)` (every `hook_every` steps, e.g. sample grids).
  """
  name: str
  mesh: jax.sharding.Mesh

  def init_state(self) -> Any: ...

  def train_step(self, state: Any, data: tuple[jax.Array, ...]) -> tuple[Any, dict]: ...

  def export(self, directory: pathlib.Path, state: Any, step: int) -> None: ...


@dataclasses.dataclass(frozen=True)
class FitResult:
  state: Any            # the exported state: the best by validation, or the final one
  step: int             # its step
  final_step: int


def make_mesh(config: ml_collections.ConfigDict, *batch_keys: str) -> jax.sharding.Mesh:
  """The `data` mesh of `config.num_devices` (0: all), refusing global batches (`config.<key>`)
  that do not split evenly over it."""
  mesh = mesh_lib.make_mesh(config.get("num_devices") or None)
  for key in batch_keys or ("batch_size",):
    mesh_lib.check_global_batch(config[key], mesh, key)
  return mesh


def compile_chunk(trainer: Trainer, steps_per_call: int) -> Callable:
  """The jitted `chunk(state, data, num_steps) -> (state, metrics [steps_per_call, ...])`, with
  `num_steps <= steps_per_call` traced: one program for every chunk length. The state is donated
  (updated in place); metrics of steps beyond `num_steps` are zeros."""
  rep = mesh_lib.replicated(trainer.mesh)

  def train_chunk(state, data, num_steps):
    _, shapes = jax.eval_shape(trainer.train_step, state, data)
    buffer = jax.tree.map(lambda s: jnp.zeros((steps_per_call,) + s.shape, s.dtype), shapes)

    def body(i, carry):
      st, buf = carry
      st, metrics = trainer.train_step(st, data)
      return st, jax.tree.map(lambda b, m: b.at[i].set(m), buf, metrics)

    return jax.lax.fori_loop(0, num_steps, body, (state, buffer))

  return jax.jit(train_chunk, donate_argnums=0, in_shardings=(rep, rep, rep),
                 out_shardings=(rep, rep))


def place_state(state: Any, mesh: jax.sharding.Mesh) -> Any:
  """The initial state replicated on the mesh, as copies: the first chunk donates the state, which
  must not delete values the trainer keeps."""
  return mesh_lib.put_replicated(jax.tree.map(jnp.copy, state), mesh)


def fit(trainer: Trainer, workdir: pathlib.Path, *, data: tuple[np.ndarray, ...],
        schedule: loop.Schedule, keep_checkpoints: int, images_per_step: int,
        best_metric: str | None = None,
        memory_hint: str = "lower config.batch_size or config.data.image_size") -> FitResult:
  """Trains `trainer` to `schedule.total_steps` (resuming a run in `workdir`) and exports."""
  workdir = pathlib.Path(workdir)
  mesh = trainer.mesh
  state = place_state(trainer.init_state(), mesh)
  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=keep_checkpoints,
                      best_metric=best_metric)
  restored, start = ckpt.restore_latest(state)
  if restored is not None:
    state = restored
    logging.info("Resumed from %s at step %d", ckpt.directory, start)
  data_dev = mesh_lib.put_replicated(tuple(data), mesh)
  steps_per_call = min(schedule.steps_per_call, schedule.total_steps)
  schedule = dataclasses.replace(schedule, steps_per_call=steps_per_call)
  chunk = compile_chunk(trainer, steps_per_call)
  validate = getattr(trainer, "validate", None)
  hook = getattr(trainer, "hook", None)
  writer = SummaryWriter(workdir / "tensorboard")
  try:  # closed also when training stops on an error (its event file is flushed)
    state = loop.run(
        state, chunk_fn=lambda st, k: chunk(st, data_dev, np.int32(k)), schedule=schedule,
        start_step=start or 0, checkpointer=ckpt, writer=writer, name=trainer.name,
        images_per_step=images_per_step, eval_fn=validate,
        hook_fn=None if hook is None else lambda step, st: hook(step, st, writer),
        memory_hint=memory_hint)
    best, step = (ckpt.restore_best(state) if best_metric else (None, None))
    if best is None:
      best, step = state, schedule.total_steps
    ckpt.close()
    trainer.export(workdir, best, step)
  finally:
    writer.close()
  return FitResult(state=best, step=step, final_step=schedule.total_steps)

