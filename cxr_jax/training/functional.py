"""Calling an NNX module as a pure function of its parameters and batch statistics.

Trainers split a module once (`Functional.split`) and keep only pytrees in their state; compiled
steps merge the module inside the trace, so Python never walks the module graph per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx


@dataclasses.dataclass(frozen=True, eq=False)
class Functional:
  """The static part of a module (graph definition and any non-parameter, non-statistics state)."""
  graphdef: Any
  rest: Any

  @classmethod
  def split(cls, module: nnx.Module) -> tuple["Functional", nnx.State, nnx.State]:
    graphdef, params, stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
    return cls(graphdef, rest), params, stats

  def merge(self, params: nnx.State, stats: nnx.State) -> nnx.Module:
    # copy=True: the traced arrays get fresh Variables at the current trace level.
    return nnx.merge(self.graphdef, params, stats, self.rest, copy=True)

  def apply(self, params: nnx.State, stats: nnx.State, *args, method: str | None = None,
            **kwargs) -> tuple[Any, nnx.State]:
    """Runs `module(*args, **kwargs)` (or `module.<method>`); returns (output, new statistics)."""
    module = self.merge(params, stats)
    fn = getattr(module, method) if method else module
    out = fn(*args, **kwargs)
    return out, nnx.state(module, nnx.BatchStat)

