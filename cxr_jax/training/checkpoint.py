"""Orbax checkpoints of a whole training state, saved asynchronously and restored exactly.

The state pytree (nnx.State objects, optax states, step, RNG key) is saved as a flat dict keyed by
its key paths, so that a checkpoint is readable without the Python classes that made it, and a
mismatch with the model being restored is reported key by key instead of as an Orbax traceback.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from cxr_jax.errors import UserError


def flatten(tree: Any) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  flat = {}
  for path, leaf in leaves:
    flat[_key(path)] = leaf
  return flat


def unflatten(template: Any, flat: dict[str, Any]) -> Any:
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  return jax.tree_util.tree_unflatten(treedef, [flat[_key(p)] for p, _ in paths_leaves])


def _key(path) -> str:
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def abstract(tree: Any) -> Any:
  """Shape/dtype/sharding stand-ins, the restore target Orbax needs."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of a run under `directory` (async writes).

  With `best_metric`, a second manager under `<directory>/../best` keeps the single checkpoint with
  the highest value of that metric (e.g. validation macro-F1), beside the latest ones.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               asynchronous: bool = True, best_metric: str | None = None):
    self.directory = pathlib.Path(directory).absolute()
    # The handler is named up front: a manager that has not saved in this process (a resumed
    # run) can then read a checkpoint's metadata, which the compatibility check needs.
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=asynchronous),
        item_handlers=ocp.StandardCheckpointHandler())
    self.best_metric = best_metric
    self._best = None
    if best_metric:
      self._best = self._open_best(best_metric, asynchronous)

  def _open_best(self, best_metric: str, asynchronous: bool):
    try:
      return ocp.CheckpointManager(
          self.directory.parent / "best",
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, enable_async_checkpointing=asynchronous,
              best_fn=lambda m: m[best_metric], best_mode="max"),
          item_handlers=ocp.StandardCheckpointHandler())
    except Exception as e:  # pylint: disable=broad-except  # a damaged metrics record
      path = self.directory.parent / "best"
      raise UserError(f"{path}: cannot read the records of the best checkpoint "
                      f"({type(e).__name__}: {e}); move the folder aside and run the same "
                      "command again (the run resumes; the best is chosen anew from then on)."
                      ) from None

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def save(self, step: int, state: Any, *, metrics: dict[str, float] | None = None,
           force: bool = False) -> None:
    """Saves `step`; with `metrics`, first offers it to the best manager and waits for that write.

    The wait orders the commits (at the cost of one unoverlapped write per evaluation): once the
    latest checkpoint of a step exists, its validation result has been weighed, so a run killed
    between the two writes and resumed from that step still picks the same best. A resumed run
    replays the steps after its checkpoint: those the best manager has weighed already (up to its
    newest step) are not offered again, which would raise Orbax's StepAlreadyExistsError at the
    same step on every restart.
    """
    flat = flatten(state)
    if self._best is not None and metrics is not None:
      if step > max(self._best.all_steps(), default=-1):
        self._best.save(step, args=ocp.args.StandardSave(flat),
                        metrics={k: float(v) for k, v in metrics.items()}, force=True)
        self._best.wait_until_finished()
    self._mgr.save(step, args=ocp.args.StandardSave(flat), force=force)

  def restore(self, step: int, template: Any, *, best: bool = False) -> Any:
    mgr = self._best if best else self._mgr
    self._check_compatible(mgr, step, template)
    flat = mgr.restore(step, args=ocp.args.StandardRestore(abstract(flatten(template))))
    return unflatten(template, flat)

  def restore_best(self, template: Any) -> tuple[Any, int | None]:
    """The best checkpoint and its step, or (None, None) when there is none. An unreadable one
    stops the run with a message naming it: evaluating other weights instead would change what
    the run reports."""
    step = self.best_step()
    if step is None:
      return None, None
    try:
      return self.restore(step, template, best=True), step
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      path = self.directory.parent / "best" / str(step)
      raise UserError(f"{path}: the best checkpoint cannot be read ({type(e).__name__}: {e}). It "
                      "is left as it is; move it aside and run the same command again to "
                      "evaluate the final weights instead.") from None

  def best_step(self) -> int | None:
    return None if self._best is None else self._best.best_step()

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
          from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
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

  def _check_compatible(self, mgr, step: int, template: Any) -> None:
    try:
      meta = mgr.item_metadata(step)
    except Exception:  # pylint: disable=broad-except
      return  # unreadable metadata: let restore fail and fall back
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
    if self._best is not None:
      self._best.wait_until_finished()

  def close(self) -> None:
    self._mgr.close()
    if self._best is not None:
      self._best.close()
