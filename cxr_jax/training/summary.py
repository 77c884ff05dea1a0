"""What a run tells its user while it trains: TensorBoard event files, a CSV of the same scalars,
and one progress bar per stage.

Only process 0 writes; other processes get a writer that drops everything and show no progress.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from typing import Mapping

import numpy as np
from absl import logging

from cxr_jax import console
from cxr_jax import workdir as workdir_lib

SCALARS_CSV = "scalars.csv"  # step,tag,value; read by evaluation.plots.write_training_curves


class SummaryWriter:
  """TensorBoard scalars and images under `<workdir>/tensorboard` (tensorboardX, no TensorFlow).

  Scalars are also appended to `<logdir>/scalars.csv` (`step,tag,value`), which the training
  curves picture reads without needing TensorBoard installed. A resumed run appends again; the
  reader keeps the last value written for a step.
  """

  def __init__(self, logdir: str | os.PathLike):
    self._writer = None
    self._csv = None
    if workdir_lib.is_writer():
      from tensorboardX import SummaryWriter as _TbWriter  # pylint: disable=import-outside-toplevel
      self._writer = _TbWriter(str(logdir), flush_secs=30)
      path = pathlib.Path(logdir) / SCALARS_CSV
      new = not path.exists() or path.stat().st_size == 0
      self._csv = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
      if new:
        self._csv.write("step,tag,value\n")

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in values.items():
      self._writer.add_scalar(name, float(value), step)
      self._csv.write(f"{int(step)},{name},{float(value)!r}\n")

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """`image`: uint8 [H, W] or [H, W, 1]."""
    if self._writer is None:
      return
    image = np.asarray(image)
    if image.ndim == 2:
      image = image[..., None]
    self._writer.add_image(tag, image, step, dataformats="HWC")

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._csv.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._csv.close()
      self._writer = self._csv = None



# Which variant fits a machine when the run at hand would take more than a day there.
_DAY = 86400.0
_CPU_HINTS = {
    "pix2pix": "configs/pix2pix.py:cpu fits a CPU (64 px, a narrower network), or "
               "configs/experiment.py:demo for the whole pipeline",
    "classifier": "configs/experiment.py:demo fits a CPU (64 px, a narrow ResNet)",
}
_ACCELERATOR_HINT = ("lower config.num_epochs or config.data.image_size, or run on more devices "
                     "(config.multihost)")


def _slow_hint(name: str) -> str:
  import jax  # pylint: disable=import-outside-toplevel
  if jax.default_backend() == "cpu":
    for key, hint in _CPU_HINTS.items():
      if name.startswith(key):
        return hint
    return "configs/experiment.py:demo fits a CPU"
  return _ACCELERATOR_HINT


class Progress:
  """One progress bar per training stage, with throughput and ETA.

  On a terminal (process 0) a tqdm bar; otherwise (CI, a pipe, a file) a plain line through the
  logger at the first report `FIRST_LINE_S` after the start, then at most every `LINE_EVERY_S`,
  and at the end: a stage shorter than that prints one line (`--log_level=info|debug`: every
  report). Every report also goes to the log file with all its metrics. The ETA counts from the first report, so it leaves out compilation once
  a second report exists. A run whose ETA passes a day warns once, naming the variant that fits.

  The loop calls `report` at its log points and may call `due(step)` after each chunk: it turns
  true `FIRST_REPORT_S` after the start (and after the first report), then every `REPORT_EVERY_S`,
  so that the first ETA comes within a minute whatever `log_every` is.
  """
  FIRST_REPORT_S = 10.0
  REPORT_EVERY_S = 30.0
  FIRST_LINE_S = 30.0
  LINE_EVERY_S = 60.0

  def __init__(self, total_steps: int, start_step: int, *, images_per_step: int, name: str,
               hint: str | None = None):
    self.total, self.name, self.images_per_step = total_steps, name, images_per_step
    self._t0, self._s0 = time.perf_counter(), start_step
    self._last_t, self._last_s = self._t0, start_step
    self._reports = 0
    self._first: tuple[float, int] | None = None   # (time, step) of the first report
    self._last_report_t = self._t0
    self._next_line_t = self._t0 + self.FIRST_LINE_S  # no plain console line before this
    self._hint = hint
    self._warned_slow = False
    self._visible = workdir_lib.is_writer()
    self._bar = None
    if self._visible and console.is_tty() and start_step < total_steps:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step",
                       file=sys.stderr, dynamic_ncols=True, leave=True,
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                  "[{elapsed}{postfix}]")
      self._bar.set_postfix_str("compiling", refresh=True)

  def rate(self, step: int) -> float:
    """Steps per second since the last call."""
    now = time.perf_counter()
    rate = (step - self._last_s) / max(now - self._last_t, 1e-9)
    self._last_t, self._last_s = now, step
    return rate

  def due(self, step: int) -> bool:
    """Whether a report is wanted now (time-based); cheap, call it after every chunk."""
    if step >= self.total or step <= self._s0:
      return False
    interval = self.FIRST_REPORT_S if self._reports < 2 else self.REPORT_EVERY_S
    return time.perf_counter() - self._last_report_t >= interval

  def eta(self, step: int) -> float:
    """Seconds left: from the rate since the first report when there is one, else since start."""
    now = time.perf_counter()
    if self._first is not None and step > self._first[1]:
      t, s = self._first
    else:
      t, s = self._t0, self._s0
    done = step - s
    return (self.total - step) * (now - t) / done if done > 0 else float("nan")

  def report(self, step: int, metrics: Mapping[str, float], steps_per_sec: float) -> None:
    now = time.perf_counter()
    eta = self.eta(step)
    measured = self._first is not None and step > self._first[1]  # compilation left out
    self._reports += 1
    if self._first is None:
      self._first = (now, step)
    self._last_report_t = now
    pct = 100.0 * step / max(self.total, 1)
    shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    speed = f"{steps_per_sec:.3g} steps/s {steps_per_sec * self.images_per_step:.3g} img/s"
    line = (f"{self.name} step {step}/{self.total} ({pct:.0f}%)  {shown}  {speed}  "
            f"ETA {console.fmt_seconds(eta)}")
    at_end = step >= self.total
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix_str(f"{speed}, ETA {console.fmt_seconds(eta)}, {_short(metrics)}",
                                refresh=True)  # tqdm puts ", " before the postfix
      logging.info("%s", line, extra=console.FILE_ONLY)
    elif self._visible:
      if at_end or now >= self._next_line_t or console.verbose():
        self._next_line_t = now + self.LINE_EVERY_S
        logging.info("%s", line)
      else:
        logging.info("%s", line, extra=console.FILE_ONLY)
    if (measured and not self._warned_slow and self._visible and np.isfinite(eta)
        and eta > _DAY):
      self._warned_slow = True
      logging.warning("%s: at %.3g steps/s this run needs about %s more; %s.", self.name,
                      steps_per_sec, console.fmt_seconds(eta), self._hint or _slow_hint(self.name))
    if at_end:
      self.close()

  def close(self) -> None:
    """Ends the bar (also done by the report that reaches `total_steps`); safe to call twice."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def _short(metrics: Mapping[str, float], limit: int = 3) -> str:
  """The few metrics that fit on a bar: losses and accuracy first."""
  keys = [k for k in metrics if k.endswith("loss") or k == "accuracy"] or list(metrics)
  return " ".join(f"{k}={metrics[k]:.3g}" for k in keys[:limit])
