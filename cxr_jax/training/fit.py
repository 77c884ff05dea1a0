"""The one training driver: what every model's training shares, so that a trainer file keeps only
its networks, losses, step, batch sampling, validation hook and export metadata.

`fit(trainer, workdir, ...)` restores the newest readable checkpoint, places the training arrays on
the devices (replicated) or, for data that stream from disk, opens the stream at the restored
step (`training/stream.py`), compiles the training chunk once, runs the host loop (`loop.run`) with
the TensorBoard writer open, closes the checkpoints and exports the final (or best) state.

The chunk runs up to `steps_per_call` steps between two host decisions: on accelerators in one
device call (a `lax.fori_loop` whose number of steps is a traced argument), on the CPU one
asynchronous dispatch per step (`loop_on_device`: XLA's CPU convolutions are slow inside loops);
either writes per-step metrics into a fixed `[steps_per_call]` buffer. A shorter chunk (a log or
checkpoint boundary, a run resumed at an odd step, the end) is the same program, so a run compiles
exactly one training program whatever its schedule or resume point.

A trainer (see `Trainer`) builds its networks on `trainer.mesh` and keeps them in `NetState`s, one
per network, which apply their optimiser's update as Flax's `TrainState` does.

`SeedStack` trains several seeds of one trainer as one program: their states stacked on a leading
seed axis are just another state, so `fit`, `compile_chunk`, `loop.run` and the `Checkpointer` run
it unchanged. Each seed's best state by validation is kept inside the stacked state (updated on
the device by `jnp.where`), so one checkpoint holds everything and a resumed run is exact.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Mapping, Protocol, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from cxr_jax import console
from cxr_jax.data import records
from cxr_jax.errors import ConfigError
from cxr_jax.training import loop
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training import stream as stream_lib
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
  key, the run's: constant through training); `batch_indices(rng, step, sizes)` gives, for the
  batch of `step`, the indices into each of `fit`'s data arrays (whose lengths are `sizes`): a
  pure jax function, run on the device for resident data and on the host CPU for streamed data
  (`training/stream.py`); `train_on_batch(state, batch)` updates on those arrays' rows (uint8
  images, labels) and returns `(state, metrics)` with `step` incremented; `train_step(state,
  data)` is `resident_step`, the step of resident data (and of `SeedStack`);
  `export(directory, state, step)` writes the export.
  Optional: `validate(step, state) -> metrics` (every `eval_every` steps, weighed for the best
  checkpoint), `hook(step, state, writer)` (every `hook_every` steps, e.g. sample grids),
  `keep_best(state, metrics) -> state` (after each validation: a state that keeps its own best,
  `SeedStack`) and `make_writer(workdir)` (a writer other than `<workdir>/tensorboard`).
  """
  name: str
  mesh: jax.sharding.Mesh

  def init_state(self) -> Any: ...

  def batch_indices(self, rng: jax.Array, step: jax.Array,
                    sizes: tuple[int, ...]) -> tuple[jax.Array, ...]: ...

  def train_on_batch(self, state: Any, batch: tuple[jax.Array, ...]) -> tuple[Any, dict]: ...

  def train_step(self, state: Any, data: tuple[jax.Array, ...]) -> tuple[Any, dict]: ...

  def export(self, directory: pathlib.Path, state: Any, step: int) -> None: ...


def resident_step(trainer: Trainer, state: Any,
                  data: tuple[jax.Array, ...]) -> tuple[Any, dict]:
  """The step of a run whose training arrays are on the devices: the batch of `state.step`
  gathered there (`trainer.batch_indices`), then `trainer.train_on_batch`."""
  indices = trainer.batch_indices(state.rng, state.step, tuple(int(x.shape[0]) for x in data))
  return trainer.train_on_batch(state, tuple(x[i] for x, i in zip(data, indices)))


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


def loop_on_device(backend: str | None = None) -> bool:
  """Whether a chunk's steps loop inside one compiled program (`lax.fori_loop`) or are dispatched
  one compiled step at a time. On accelerators the loop saves a dispatch per step. On the CPU,
  XLA compiles convolutions inside a while loop to much slower code than the same convolutions
  outside one (jax-ml/jax#12868): on 2 cores experiment:demo's CycleGAN ran 2.96 steps/s
  dispatched and 0.61 inside a `fori_loop`, its classifier 23.8 and 6.5 (docs/performance.md), so
  there each step is its own dispatch. Dispatch is asynchronous either way: the host never waits
  for a step."""
  return (backend or jax.default_backend()) != "cpu"


class Chunk:
  """`chunk(state, data, num_steps) -> (state, metrics [steps_per_call, ...])`: up to
  `steps_per_call` training steps, `num_steps` traced or looped over by the host, through one
  compiled training program (`program`). See `compile_chunk`."""

  def __init__(self, program: Callable, *, steps_per_call: int, on_device: bool,
               new_buffer: Callable, streamed: bool = False):
    self.program, self.steps_per_call, self.on_device = program, steps_per_call, on_device
    self.new_buffer, self.streamed = new_buffer, streamed

  def __call__(self, state: Any, data: Any, num_steps) -> tuple[Any, Any]:
    """`data`: the resident arrays, or (streamed) the `stream.Stream` whose next batch each step
    takes."""
    if self.on_device:
      return self.program(state, data, num_steps)
    buffer = self.new_buffer(state, None if self.streamed else data)
    for i in range(int(num_steps)):
      state, buffer = self.program(state, buffer, data.next() if self.streamed else data,
                                   np.int32(i))
    return state, buffer

  def compiled(self, state: Any, data: Any) -> tuple["Chunk", Any]:
    """Compiled ahead of time for these arguments' shapes (the benchmark reports compile time
    apart): (the chunk that runs the compiled program, the compiled program). Streamed: `data`
    is the stream (its batch shapes)."""
    if self.on_device:
      lowered = self.program.lower(state, data, np.int32(self.steps_per_call))
    elif self.streamed:
      lowered = self.program.lower(state, self.new_buffer(state, None), data.spec, np.int32(0))
    else:
      lowered = self.program.lower(state, self.new_buffer(state, data), data, np.int32(0))
    program = lowered.compile()
    chunk = Chunk(program, steps_per_call=self.steps_per_call, on_device=self.on_device,
                  new_buffer=self.new_buffer, streamed=self.streamed)
    return chunk, program


def compile_chunk(trainer: Trainer, steps_per_call: int, *,
                  on_device: bool | None = None, batch_spec: tuple | None = None) -> Chunk:
  """The `Chunk` of `trainer`: `chunk(state, data, num_steps) -> (state, metrics
  [steps_per_call, ...])` with `num_steps <= steps_per_call`; metrics of steps beyond
  `num_steps` are zeros, and the state is donated (updated in place). One compiled training
  program whatever the chunk length:
  - `on_device` (the default off the CPU, see `loop_on_device`): a `lax.fori_loop` over a traced
    `num_steps` (`train_chunk`);
  - otherwise: one step (`train_chunk_step`, writing its metrics into row `i` of the donated
    buffer) dispatched `num_steps` times without waiting for any of them.
  `batch_spec` (a streamed run: the shapes of one step's batch, `stream.Stream.spec`): the
  one-step program of `trainer.train_on_batch`, dispatched once per step with that step's batch
  (a batch per step has to come from the host, so the steps are not looped on the device)."""
  rep = mesh_lib.replicated(trainer.mesh)
  # The step as a jitted function of its own, called by the program and by the metrics buffer's
  # shape inference alike: JAX traces it once for both (a trace of a small network's step costs
  # about as much as compiling it on a CPU). `inline=True` puts its trace into the program's, so
  # the program compiled is the one a direct call gives (the same optimised HLO, checked).
  if batch_spec is not None:
    batch_sharding = mesh_lib.batch_sharding(trainer.mesh)
    on_batch = jax.jit(trainer.train_on_batch, inline=True)

    def empty_stream_buffer(state, _):
      _, shapes = jax.eval_shape(on_batch, state, batch_spec)
      return jax.tree.map(lambda s: jnp.zeros((steps_per_call,) + s.shape, s.dtype), shapes)

    def train_batch_step(state, buffer, batch, i):
      state, metrics = on_batch(state, batch)
      return state, jax.tree.map(lambda b, m: b.at[i].set(m), buffer, metrics)

    program = jax.jit(train_batch_step, donate_argnums=(0, 1),
                      in_shardings=(rep, rep, (batch_sharding,) * len(batch_spec), rep),
                      out_shardings=(rep, rep))
    return Chunk(program, steps_per_call=steps_per_call, on_device=False, streamed=True,
                 new_buffer=jax.jit(empty_stream_buffer, static_argnums=1, out_shardings=rep))
  if on_device is None:
    on_device = loop_on_device()

  step = jax.jit(trainer.train_step, inline=True)

  def empty_buffer(state, data):
    _, shapes = jax.eval_shape(step, state, data)
    return jax.tree.map(lambda s: jnp.zeros((steps_per_call,) + s.shape, s.dtype), shapes)

  def record(buffer, i, metrics):
    return jax.tree.map(lambda b, m: b.at[i].set(m), buffer, metrics)

  if on_device:
    def train_chunk(state, data, num_steps):
      def body(i, carry):
        st, buf = carry
        st, metrics = step(st, data)
        return st, record(buf, i, metrics)

      return jax.lax.fori_loop(0, num_steps, body, (state, empty_buffer(state, data)))

    program = jax.jit(train_chunk, donate_argnums=0, in_shardings=(rep, rep, rep),
                      out_shardings=(rep, rep))
  else:
    def train_chunk_step(state, buffer, data, i):
      state, metrics = step(state, data)
      return state, record(buffer, i, metrics)

    program = jax.jit(train_chunk_step, donate_argnums=(0, 1),
                      in_shardings=(rep, rep, rep, rep), out_shardings=(rep, rep))
  return Chunk(program, steps_per_call=steps_per_call, on_device=on_device,
               new_buffer=jax.jit(empty_buffer, out_shardings=rep))


def place_state(state: Any, mesh: jax.sharding.Mesh) -> Any:
  """The initial state replicated on the mesh, as copies: the first chunk donates the state, which
  must not delete values the trainer keeps."""
  return mesh_lib.put_replicated(jax.tree.map(jnp.copy, state), mesh)


def placement_of(data: Sequence[Any]) -> str:
  """'stream' when a training array is a view of images on disk (`data.records`, chosen by
  `config.data.placement`), else 'device'."""
  return "stream" if any(records.is_lazy(x) for x in data) else "device"


def fit(trainer: Trainer, workdir: pathlib.Path, *, data: tuple[Any, ...],
        schedule: loop.Schedule, keep_checkpoints: int, images_per_step: int,
        best_metric: str | None = None,
        memory_hint: str = "lower config.batch_size or config.data.image_size",
        placement: str | None = None, batch_size: int | None = None,
        stream_threads: int = stream_lib.DEFAULT_THREADS,
        stream_prefetch: int = stream_lib.DEFAULT_PREFETCH) -> FitResult:
  """Trains `trainer` to `schedule.total_steps` (resuming a run in `workdir`) and exports.

  `placement` (default `placement_of(data)`): 'device' puts `data` on the devices (replicated)
  and draws each batch there; 'stream' reads each step's batch (`batch_size` rows) through
  `stream.Stream` with `stream_threads` reader threads, `stream_prefetch` batches ahead, and
  saves the stream's position in every checkpoint."""
  workdir = pathlib.Path(workdir)
  mesh = trainer.mesh
  placement = placement or placement_of(data)
  if placement not in ("device", "stream"):
    raise ValueError(f"placement {placement!r} is not 'device' or 'stream'")
  init = trainer.init_state()
  state = place_state(init, mesh)
  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=keep_checkpoints,
                      best_metric=best_metric)
  restored, start = ckpt.restore_latest(state)
  if restored is not None:
    state = restored
    logging.info("Resumed from %s at step %d", ckpt.directory, start)
  steps_per_call = min(schedule.steps_per_call, schedule.total_steps)
  schedule = dataclasses.replace(schedule, steps_per_call=steps_per_call)
  stream = None
  if placement == "stream":
    if batch_size is None:
      raise ValueError("a streamed fit needs the global batch size")
    stream = stream_lib.Stream(trainer, data, rng=init.rng, batch_size=batch_size,
                               total_steps=schedule.total_steps, threads=stream_threads,
                               prefetch=stream_prefetch)
    stream.open(start or 0, ckpt.restore_iterator(start) if restored is not None else None)
    ckpt.iterator_state = stream.state
    data_dev = stream
    chunk = compile_chunk(trainer, steps_per_call, batch_spec=stream.spec)
    logging.info("%s: streaming %d-image batches from disk (%d reader threads, %d batches "
                 "ahead)", trainer.name, batch_size, stream_threads, stream_prefetch,
                 extra=console.FILE_ONLY)
  else:
    data_dev = mesh_lib.put_replicated(tuple(data), mesh)
    chunk = compile_chunk(trainer, steps_per_call)
  validate = getattr(trainer, "validate", None)
  hook = getattr(trainer, "hook", None)
  make_writer = getattr(trainer, "make_writer", None)
  writer = make_writer(workdir) if make_writer else SummaryWriter(workdir / "tensorboard")
  try:  # closed also when training stops on an error (its event file is flushed)
    state = loop.run(
        state, chunk_fn=lambda st, k: chunk(st, data_dev, np.int32(k)), schedule=schedule,
        start_step=start or 0, checkpointer=ckpt, writer=writer, name=trainer.name,
        images_per_step=images_per_step, eval_fn=validate,
        hook_fn=None if hook is None else lambda step, st: hook(step, st, writer),
        select_fn=getattr(trainer, "keep_best", None), memory_hint=memory_hint)
    best, step = (ckpt.restore_best(state) if best_metric else (None, None))
    if best is None:
      best, step = state, schedule.total_steps
    ckpt.close()
    trainer.export(workdir, best, step)
  finally:
    writer.close()
    if stream is not None:
      stream.close()
  return FitResult(state=best, step=step, final_step=schedule.total_steps)



# ----------------------------------------------------------------------- seeds in one program

SEED_MODES = ("map", "vmap")


def seed_key(name: str, index: int) -> str:
  """The metric `name` of the `index`-th seed of a `SeedStack` (e.g. `loss@1`)."""
  return f"{name}@{index}"


def split_seed_key(key: str) -> tuple[str, int | None]:
  """`loss@1` -> ('loss', 1); a key of no seed -> (key, None)."""
  name, at, index = key.rpartition("@")
  return (name, int(index)) if at and index.isdigit() else (key, None)


@flax.struct.dataclass
class SeedsState:
  """N seeds' states stacked on a leading axis, and each seed's best state by validation."""
  step: jax.Array          # the common step (scalar int32)
  seeds: Any               # the trainer's state, each leaf [N, ...]
  best: Any                # each seed's state at its best validation so far, [N, ...]
  best_metric: jax.Array   # [N] float32, -inf before the first validation
  best_step: jax.Array     # [N] int32


class SeedStack:
  """The `Trainer` of N seeds of one trainer in one program (see the module docstring).

  `trainers[i]` differ only in their seed (initial state) and where they export; `trainers[0]`'s
  step, validation and batch sampling serve all of them. `mode` batches the seeds:
  - `map`: each seed's step in turn inside one step program, the same per-seed computation as a
    run alone (bitwise equal on the CPU), one dispatch, one compilation, one data placement; a
    `jax.lax.map` over the seed axis where chunks loop on the device (`loop_on_device`), the
    seeds unrolled on the CPU (a convolution inside a loop is slower there, and rounds
    differently from the same convolution in a run alone);
  - `vmap`: `jax.vmap` over the step, one batched step for all seeds (faster on accelerators; on
    a CPU a vmapped convolution with per-seed kernels is a grouped convolution whose float
    results differ slightly from the unbatched one).
  Metrics are reported per seed as `name@i` (`seed_key`); `SeedWriters` sends them to each seed's
  own TensorBoard folder. `best_metric` (a key of `validate`'s metrics) picks each seed's best
  state, the later step on ties (as the Orbax manager's `BestN` does for a run alone).
  """

  def __init__(self, trainers: Sequence[Trainer], *, mode: str, best_metric: str,
               export_dirs: Sequence[pathlib.Path], writer_dirs: Sequence[pathlib.Path]):
    if mode not in SEED_MODES:
      raise ValueError(f"mode {mode!r} is not one of {SEED_MODES}")
    self.trainers, self.mode, self.best_metric = list(trainers), mode, best_metric
    self.export_dirs, self.writer_dirs = list(export_dirs), list(writer_dirs)
    self.n = len(self.trainers)
    first = self.trainers[0]
    self.name, self.mesh = f"{first.name} x{self.n} seeds", first.mesh
    rep = mesh_lib.replicated(self.mesh)
    self._take = jax.jit(lambda tree, i: jax.tree.map(lambda x: x[i], tree), out_shardings=rep)
    self._keep_best = jax.jit(self._update_best, donate_argnums=0, out_shardings=rep)

  def init_state(self) -> SeedsState:
    states = [t.init_state() for t in self.trainers]
    # One structure: the trainers' static fields (e.g. each `NetState.tx`, equal optimisers
    # built per trainer) are the first trainer's, whose step runs every seed.
    treedef = jax.tree.structure(states[0])
    states = [jax.tree.unflatten(treedef, jax.tree.leaves(st)) for st in states]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    return SeedsState(step=jnp.zeros((), jnp.int32), seeds=stacked,
                      best=jax.tree.map(jnp.copy, stacked),
                      best_metric=jnp.full((self.n,), -jnp.inf, jnp.float32),
                      best_step=jnp.zeros((self.n,), jnp.int32))

  def train_step(self, state: SeedsState, data: tuple[jax.Array, ...]):
    def one(st):
      # The barriers keep XLA from fusing the step with the slicing of the seed axis around it
      # (which changes how it contracts multiply-adds): each seed's step compiles as a run alone.
      st = jax.lax.optimization_barrier(st)
      return jax.lax.optimization_barrier(self.trainers[0].train_step(st, data))

    if self.mode == "vmap":
      seeds, metrics = jax.vmap(one)(state.seeds)
    elif loop_on_device():
      seeds, metrics = jax.lax.map(one, state.seeds)
    else:
      each = [one(jax.tree.map(lambda x, i=i: x[i], state.seeds)) for i in range(self.n)]
      seeds, metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *each)
    flat = {seed_key(k, i): v[i] for k, v in metrics.items() for i in range(self.n)}
    return state.replace(step=state.step + 1, seeds=seeds), flat

  def seed_state(self, tree: Any, index: int) -> Any:
    """Seed `index`'s slice of a stacked pytree, replicated on the mesh (one compiled gather)."""
    return self._take(tree, jnp.int32(index))

  def validate(self, step: int, state: SeedsState) -> dict[str, float]:
    out = {}
    for i in range(self.n):
      metrics = self.trainers[0].validate(step, self.seed_state(state.seeds, i))
      out.update({seed_key(k, i): v for k, v in metrics.items()})
    return out

  def _update_best(self, state: SeedsState, values: jax.Array) -> SeedsState:
    better = values >= state.best_metric      # ties: the later step, as Orbax's BestN

    def pick(new, old):
      return jnp.where(better.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    best = jax.tree.map(
        lambda new, old: (jax.random.wrap_key_data(
            pick(jax.random.key_data(new), jax.random.key_data(old)),
            impl=jax.random.key_impl(new))
            if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key) else pick(new, old)),
        state.seeds, state.best)
    return state.replace(best=best, best_metric=jnp.where(better, values, state.best_metric),
                         best_step=jnp.where(better, state.step, state.best_step))

  def keep_best(self, state: SeedsState, metrics: Mapping[str, float]) -> SeedsState:
    values = np.asarray([metrics[seed_key(self.best_metric, i)] for i in range(self.n)],
                        np.float32)
    return self._keep_best(state, mesh_lib.put_replicated(values, self.mesh))

  def make_writer(self, workdir: pathlib.Path) -> "SeedWriters":
    del workdir
    return SeedWriters([SummaryWriter(pathlib.Path(d) / "tensorboard") for d in self.writer_dirs])

  def export(self, directory: pathlib.Path, state: SeedsState, step: int) -> None:
    """Each seed's best state to its own export directory (`directory`, the stack's, is not
    used)."""
    del directory, step
    best_steps = np.asarray(jax.device_get(state.best_step))
    for i, (trainer, out) in enumerate(zip(self.trainers, self.export_dirs)):
      trainer.export(pathlib.Path(out), self.seed_state(state.best, i), int(best_steps[i]))


class SeedWriters:
  """One `SummaryWriter` per seed: `train/loss@1` goes to seed 1's as `train/loss`; a scalar of
  no seed (the program's speed) goes to every seed's."""

  def __init__(self, writers: Sequence[SummaryWriter]):
    self.writers = list(writers)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    routed: list[dict[str, float]] = [{} for _ in self.writers]
    for key, value in values.items():
      name, index = split_seed_key(key)
      for i in (range(len(self.writers)) if index is None else (index,)):
        routed[i][name] = value
    for writer, vals in zip(self.writers, routed):
      if vals:
        writer.scalars(step, vals)

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    name, index = split_seed_key(tag)
    for i, writer in enumerate(self.writers):
      if index is None or index == i:
        writer.image(step, name, image)

  def flush(self) -> None:
    for writer in self.writers:
      writer.flush()

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


def seeds_mode(config: ml_collections.ConfigDict) -> str | None:
  """How `config.seeds_in_one_program` batches a row's seeds here: 'map', 'vmap' or None (one
  run after another). 'auto': `vmap` on accelerators; one run after another on a CPU, where a
  program of N seeds costs what N runs cost (docs/performance.md)."""
  value = config.get("seeds_in_one_program", "off")
  value = {True: "auto", False: "off", None: "off", "": "off"}.get(value, value)
  if value == "off":
    return None
  if value == "auto":
    return None if jax.default_backend() == "cpu" else "vmap"
  if value in SEED_MODES:
    return value
  raise ConfigError(f"config.seeds_in_one_program: {value!r} is not one of 'auto', 'map', "
                    "'vmap', 'off'")


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """`config` with `seed` (a copy)."""
  cfg = config.copy_and_resolve_references()
  cfg.seed = int(seed)
  return cfg
