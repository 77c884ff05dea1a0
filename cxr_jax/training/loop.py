"""The host side of training, shared by every trainer.

The trainer supplies a jitted `chunk_fn(state, num_steps)` that runs `num_steps` steps on the
device and returns per-step metrics stacked along axis 0 (at least `num_steps` rows: `fit`'s
chunk fills a fixed-size buffer, of which the first `num_steps` rows are kept). This loop only
decides when to fetch those metrics, write summaries, run evaluations and save checkpoints;
between those points it queues chunks without waiting for the device, so Python dispatch never
gates a step.

The console's progress bar gets its first rate and ETA within seconds of the first compiled step:
the first chunks are short (1, 1, 2, 4, ... steps, then `steps_per_call`) and the bar is updated
whenever `Progress.due` says so, not only every `log_every` steps. Chunk lengths are a traced
argument of one compiled program (`fit.compile_chunk`), so this costs no compilation and changes
no result.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np

from cxr_jax.errors import UserError
from cxr_jax.training.checkpoint import Checkpointer
from cxr_jax.training.summary import Progress, SummaryWriter


class OutOfDeviceMemory(UserError):
  """The device ran out of memory in a chunk (a caller may fall back to a smaller program)."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


class TrainingDiverged(UserError):
  """A loss or gradient became NaN or infinite; the message names the step and the quantity."""


@dataclasses.dataclass
class Schedule:
  total_steps: int
  steps_per_call: int
  log_every: int
  checkpoint_every: int
  # Optional periodic work: validation (returns metrics for the best checkpoint), sample images.
  eval_every: int = 0
  hook_every: int = 0


def _next_boundary(step: int, every: int) -> int:
  return (step // every + 1) * every if every > 0 else np.iinfo(np.int64).max


def run(state: Any, *, chunk_fn: Callable[[Any, int], tuple[Any, Mapping[str, jax.Array]]],
        schedule: Schedule, start_step: int, checkpointer: Checkpointer | None,
        writer: SummaryWriter, name: str, images_per_step: int,
        eval_fn: Callable[[int, Any], Mapping[str, float]] | None = None,
        hook_fn: Callable[[int, Any], None] | None = None,
        select_fn: Callable[[Any, Mapping[str, float]], Any] | None = None,
        memory_hint: str = "lower config.batch_size or config.data.image_size") -> Any:
  """Trains from `start_step` to `schedule.total_steps`; returns the final state.

  `select_fn(state, validation metrics) -> state`, when given, runs after each validation and
  before that step's checkpoint (a state that keeps its own best weights)."""
  s = schedule
  step = start_step
  pending: list[tuple[int, Mapping[str, jax.Array], int]] = []  # (first step, metrics, steps)
  window: list[tuple[int, Mapping[str, Any]]] = []  # fetched, not yet logged
  progress = Progress(s.total_steps, start_step, images_per_step=images_per_step, name=name)

  def flush_metrics() -> None:
    """Fetches queued metrics (the only host sync between log points) and checks them."""
    if pending:
      fetched = [(first, {name: np.atleast_1d(v)[:k] for name, v in m.items()})
                 for first, m, k in jax.device_get(pending)]
      pending.clear()
      _check_finite(fetched)
      window.extend(fetched)

  def window_means(clear: bool) -> dict[str, float]:
    """Means of the metrics fetched since the last log point; kept (not cleared) for a progress
    update in between, so that the logged means still cover the whole interval."""
    flush_metrics()
    if not window:
      return {}
    stacked = {k: np.concatenate([np.atleast_1d(m[k]) for _, m in window]) for k in window[0][1]}
    if clear:
      window.clear()
    return {k: float(np.mean(v)) for k, v in stacked.items()}

  try:
    while step < s.total_steps:
      boundaries = [s.total_steps, _next_boundary(step, s.log_every),
                    _next_boundary(step, s.checkpoint_every), _next_boundary(step, s.eval_every),
                    _next_boundary(step, s.hook_every)]
      # Short first chunks (1, 1, 2, 4, ...): an early rate for the progress bar.
      ramp = max(1, step - start_step)
      k = int(min([step + min(s.steps_per_call, ramp)] + boundaries) - step)
      try:
        state, metrics = chunk_fn(state, k)
      except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
          raise OutOfDeviceMemory(f"out of device memory at step {step} "
                                  f"({jax.devices()[0].device_kind}): {memory_hint}",
                                  step) from None
        raise
      pending.append((step, metrics, k))
      step += k

      at_end = step >= s.total_steps
      at_log = step % s.log_every == 0 or at_end
      if at_log or progress.due(step):
        means = window_means(clear=at_log)
        rate = progress.rate(step)
        progress.report(step, means, rate)
        if at_log:
          writer.scalars(step, {f"train/{k}": v for k, v in means.items()})
          writer.scalars(step, {"perf/steps_per_sec": rate,
                                "perf/images_per_sec": rate * images_per_step})
      eval_metrics = None
      if eval_fn is not None and ((s.eval_every and step % s.eval_every == 0) or at_end):
        flush_metrics()
        eval_metrics = dict(eval_fn(step, state))
        writer.scalars(step, {f"val/{k}": v for k, v in eval_metrics.items()})
        if select_fn is not None:
          state = select_fn(state, eval_metrics)
      if hook_fn is not None and ((s.hook_every and step % s.hook_every == 0) or at_end):
        hook_fn(step, state)
      if checkpointer is not None and (step % s.checkpoint_every == 0 or at_end):
        flush_metrics()  # never save a state that has already diverged
        checkpointer.save(step, state, metrics=eval_metrics, force=at_end)
  finally:
    progress.close()  # a crash leaves no progress bar open
  writer.flush()
  if checkpointer is not None:
    checkpointer.wait()
  return state


def _check_finite(fetched) -> None:
  for first_step, metrics in fetched:
    for name, values in metrics.items():
      values = np.atleast_1d(np.asarray(values, np.float64))
      bad = np.flatnonzero(~np.isfinite(values))
      if bad.size:
        raise TrainingDiverged(
            f"training diverged: {name} is {values[bad[0]]} at step {first_step + int(bad[0]) + 1}"
            "; the last checkpoint before it is kept. Lower the learning rate, or use float32 "
            "compute (config.compute_dtype='float32').")
