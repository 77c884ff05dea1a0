"""Calling an NNX module as a pure function of its parameters and batch statistics.

Trainers split a module once (`Functional.split`) and keep only pytrees in their state; compiled
steps merge the module inside the trace, so Python never walks the module graph per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
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


def build(make: Callable[[nnx.Rngs], nnx.Module], seed: int, *,
          abstract: bool = False) -> nnx.Module:
  """Builds a module with its whole initialisation compiled as one program.

  Built eagerly, every parameter shape compiles its own threefry sampler: tens of seconds for a
  ResNet-50 on a CPU. One `nnx.jit` and an `rbg` key make it a few seconds. The key only draws
  initial weights; training randomness uses the default (threefry) keys. `abstract=True` gives
  shapes only, for modules whose values are about to be restored.
  """
  if abstract:
    return nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  return nnx.jit(lambda: make(nnx.Rngs(jax.random.key(seed, impl="rbg"))))()
