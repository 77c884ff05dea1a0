"""What a run tells its user while it trains: TensorBoard event files and a console progress line.

Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import os
import time
from typing import Mapping

import numpy as np
from absl import logging

from cxr_jax import workdir as workdir_lib


class SummaryWriter:
  """TensorBoard scalars and images under `<workdir>/tensorboard` (tensorboardX, no TensorFlow)."""

  def __init__(self, logdir: str | os.PathLike):
    self._writer = None
    if workdir_lib.is_writer():
      from tensorboardX import SummaryWriter as _TbWriter  # pylint: disable=import-outside-toplevel
      self._writer = _TbWriter(str(logdir), flush_secs=30)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in values.items():
      self._writer.add_scalar(name, float(value), step)

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """`image`: uint8 [H, W] or [H, W, 1]."""
    if self._writer is None:
      return
    image = np.asarray(image)
    if image.ndim == 2:
      image = image[..., None]
    self._writer.add_image(tag, image, step, dataformats="HWC")

  def text(self, step: int, tag: str, text: str) -> None:
    if self._writer is not None:
      self._writer.add_text(tag, text, step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


class Progress:
  """A one-line progress report with throughput and ETA, through the logger."""

  def __init__(self, total_steps: int, start_step: int, *, images_per_step: int, name: str):
    self.total, self.name, self.images_per_step = total_steps, name, images_per_step
    self._t0, self._s0 = time.perf_counter(), start_step
    self._last_t, self._last_s = self._t0, start_step

  def rate(self, step: int) -> float:
    """Steps per second since the last call."""
    now = time.perf_counter()
    rate = (step - self._last_s) / max(now - self._last_t, 1e-9)
    self._last_t, self._last_s = now, step
    return rate

  def report(self, step: int, metrics: Mapping[str, float], steps_per_sec: float) -> None:
    elapsed = time.perf_counter() - self._t0
    done = step - self._s0
    eta = (self.total - step) * elapsed / done if done else float("nan")
    shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    logging.info("%s step %d/%d (%.0f%%)  %s  %.1f steps/s %.1f img/s  ETA %s", self.name, step,
                 self.total, 100.0 * step / max(self.total, 1), shown, steps_per_sec,
                 steps_per_sec * self.images_per_step, _fmt_seconds(eta))


def _fmt_seconds(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
