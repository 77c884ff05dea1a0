"""Orbax checkpoints of a whole training state, saved asynchronously and restored exactly.

The state pytree (nnx.State objects, optax states, step, typed RNG key) is saved as a flat dict
keyed by `jax.tree_util.keystr` paths, so that a checkpoint is readable without the Python classes
that made it, and a mismatch with the model being restored is reported key by key instead of as an
Orbax traceback. Typed PRNG keys are stored as their raw key data.

One `CheckpointManager` per run keeps the latest K checkpoints and, when a metric is named, the
best one by that metric, through Orbax's preservation policies (`LatestN` or `BestN`). A step's
metrics are written inside its checkpoint, so the best is never out of step with the latest.

A streamed run (`training/stream.py`) also saves its input pipeline's position: grain's iterator
state, as JSON, is the item `data_iterator` of the same checkpoint (the model state is the item
`default`, where a checkpoint of a resident run keeps it too), so the two are never out of step.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from cxr_jax.errors import UserError

STATE = "default"           # the item holding the training state (Orbax's single-item name)
ITERATOR = "data_iterator"  # a streamed run's input pipeline state


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def _key_path(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _storable(x: Any) -> Any:
  """Typed PRNG keys (arrays or abstract stand-ins) -> their uint32 key data."""
  if not _is_key(x):
    return x
  if isinstance(x, jax.ShapeDtypeStruct):
    shape = jax.eval_shape(jax.random.key_data, x).shape
    return jax.ShapeDtypeStruct(shape, np.uint32, sharding=x.sharding)
  return jax.random.key_data(x)


def _key_impl(x: Any) -> Any:
  """The PRNG implementation of a typed key, also of an abstract one (read while tracing)."""
  if not isinstance(x, jax.ShapeDtypeStruct):
    return jax.random.key_impl(x)
  found = []
  jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)), x)
  return found[0]


def flatten(tree: Any) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_key_path(path): _storable(leaf) for path, leaf in leaves}


def unflatten(template: Any, flat: dict[str, Any]) -> Any:
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves = []
  for path, leaf in paths_leaves:
    value = flat[_key_path(path)]
    if _is_key(leaf):
      value = jax.random.wrap_key_data(value, impl=_key_impl(leaf))
    leaves.append(value)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def abstract(tree: Any) -> Any:
  """Shape/dtype/sharding stand-ins, the restore target Orbax needs."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of a run under `directory` (async writes) and, with
  `best_metric`, also the one with the highest value of that metric (e.g. validation macro-F1)."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               asynchronous: bool = True, best_metric: str | None = None):
    self.directory = pathlib.Path(directory).absolute()
    self.best_metric = best_metric
    policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
    best_fn = None
    if best_metric:
      best_fn = lambda m: m[best_metric]  # noqa: E731
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=best_fn, n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=asynchronous, best_fn=best_fn, best_mode="max",
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
    # Called at every save of a streamed run: the input pipeline's state (JSON) at that step.
    self.iterator_state: Callable[[], dict] | None = None
    try:
      # The handlers are named up front: a manager that has not saved in this process (a resumed
      # run) can then read a checkpoint's metadata, which the compatibility check needs.
      self._mgr = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={STATE: ocp.StandardCheckpointHandler(),
                         ITERATOR: ocp.JsonCheckpointHandler()})
    except Exception as e:  # pylint: disable=broad-except  # a damaged metrics record
      raise UserError(f"{self.directory}: cannot read the records of the checkpoints "
                      f"({type(e).__name__}: {e}); move the damaged step folder aside and run "
                      "the same command again.") from None

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def best_step(self) -> int | None:
    return self._mgr.best_step() if self.best_metric else None

  def save(self, step: int, state: Any, *, metrics: dict[str, float] | None = None,
           force: bool = False) -> None:
    """Saves `step` with its validation `metrics` (weighed for the best one) in the same write."""
    items = {STATE: ocp.args.StandardSave(flatten(state))}
    if self.iterator_state is not None:
      items[ITERATOR] = ocp.args.JsonSave(self.iterator_state())
    self._mgr.save(step, args=ocp.args.Composite(**items), force=force,
                   metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()})

  def restore(self, step: int, template: Any) -> Any:
    self._check_compatible(step, template)
    restored = self._mgr.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract(flatten(template)))}))
    return unflatten(template, restored[STATE])

  def restore_iterator(self, step: int) -> dict | None:
    """The input pipeline's state saved with `step` (a streamed run's), or None (a resident
    run's checkpoint: a streamed run resumed from it starts its pipeline at the step)."""
    if not (self.directory / str(step) / ITERATOR).is_dir():
      return None
    restored = self._mgr.restore(step, args=ocp.args.Composite(
        **{ITERATOR: ocp.args.JsonRestore()}))
    return dict(restored[ITERATOR])

  def restore_best(self, template: Any) -> tuple[Any, int | None]:
    """The best checkpoint and its step, or (None, None) when there is none. An unreadable one
    stops the run with a message naming it: evaluating other weights instead would change what
    the run reports."""
    step = self.best_step()
    if step is None:
      return None, None
    try:
      return self.restore(step, template), step
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"{self.directory / str(step)}: the best checkpoint cannot be read "
                      f"({type(e).__name__}: {e}). It is left as it is; move it aside and run the "
                      "same command again to evaluate the best of the others.") from None

  def restore_latest(self, template: Any) -> tuple[Any, int | None]:
    """The newest readable checkpoint, falling back to older ones (nothing is deleted)."""
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, template), step
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        aside = self._aside_path(step)
        logging.warning("Checkpoint %s/%d is unreadable (%s: %s); trying the one before it. "
                        "It is kept as %s.", self.directory, step, type(e).__name__, e, aside)
        if jax.process_index() == 0:
          os.replace(self.directory / str(step), aside)
        if jax.process_count() > 1:  # every process lists the steps after the move
          multihost_utils.sync_global_devices(f"cxr_jax.checkpoint aside {self.directory} {step}")
        self._mgr.reload()
    return None, None

  def _aside_path(self, step: int) -> pathlib.Path:
    """`<step>.unreadable`, numbered when an earlier unreadable copy of the step is kept there:
    a step left in place would be listed again and block saving that step."""
    aside = self.directory / f"{step}.unreadable"
    n = 1
    while aside.exists():
      aside, n = self.directory / f"{step}.unreadable-{n}", n + 1
    return aside

  def _check_compatible(self, step: int, template: Any) -> None:
    try:
      meta = self._mgr.item_metadata(step)
    except Exception:  # pylint: disable=broad-except
      return  # unreadable metadata: let restore fail and fall back
    if meta is not None and STATE in meta:
      meta = meta[STATE]
    if meta is None:
      return
    saved = {k: tuple(getattr(v, "shape", ()) or ()) for k, v in dict(meta).items()}
    wanted = {k: tuple(np.shape(v)) for k, v in flatten(template).items()}
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    shapes = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    if missing or extra or shapes:
      parts = []
      if shapes:
        parts.append("shape differs for " + ", ".join(
            f"{k} (checkpoint {saved[k]}, model {wanted[k]})" for k in shapes[:5]))
      if missing:
        parts.append("not in checkpoint: " + ", ".join(missing[:5]))
      if extra:
        parts.append("only in checkpoint: " + ", ".join(extra[:5]))
      raise UserError(f"{self.directory}/{step} is a checkpoint of another model or config: "
                      + "; ".join(parts))

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.close()
