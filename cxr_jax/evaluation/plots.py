"""Figures for the report: confusion matrix, one-vs-rest ROC and precision-recall curves, training
curves.

A training run's curves come from the `scalars.csv` its `SummaryWriter` writes beside the
TensorBoard event files (`write_training_curves`), so no TensorBoard install is needed to draw them.

Figures are built on matplotlib's Agg canvas directly (no pyplot): no global figure registry to
leak or close, no display needed on a headless machine, safe next to other threads. Each PNG is
written to a temporary file and renamed, so a crash never leaves a half-written picture.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn import metrics as skm

from cxr_jax import workdir as workdir_lib
from cxr_jax.training.summary import SCALARS_CSV


def new_figure(figsize: tuple[float, float]) -> Figure:
  """A figure on its own Agg canvas (not registered with pyplot)."""
  fig = Figure(figsize=figsize, dpi=100)
  FigureCanvasAgg(fig)
  return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
  """Saves `fig` as PNG atomically and releases it."""
  path = os.fspath(path)
  tmp = f"{path}.tmp"
  fig.savefig(tmp, format="png", bbox_inches="tight")
  fig.clear()
  os.replace(tmp, path)


def confusion_matrix_png(path: str | os.PathLike, cm, class_names: Sequence[str], *,
                         title: str = "", normalize: bool = True) -> None:
  """Confusion matrix (rows true, columns predicted): each cell shows the count and its share of
  the true class; colours follow the row share (`normalize`) or the count."""
  cm = np.asarray(cm, np.int64)
  k = len(class_names)
  if cm.shape != (k, k):
    raise ValueError(f"cm must be [{k}, {k}] for {k} classes, got shape {cm.shape}")
  rows = cm.sum(1, keepdims=True)
  share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
  shown = share if normalize else cm.astype(np.float64)
  vmax = 1.0 if normalize else max(float(cm.max()), 1.0)
  size = 1.6 + 1.1 * k
  fig = new_figure((size + 1.0, size))
  ax = fig.add_subplot()
  im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04,
               label="share of true class" if normalize else "count")
  for i in range(k):
    for j in range(k):
      pct = f"{100 * share[i, j]:.1f} %" if rows[i, 0] > 0 else "-"
      colour = "white" if shown[i, j] > 0.5 * vmax else "black"
      ax.text(j, i, f"{cm[i, j]}\n{pct}", ha="center", va="center", color=colour, fontsize=9)
  ax.set_xticks(range(k), class_names, rotation=30, ha="right")
  ax.set_yticks(range(k), class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  if title:
    ax.set_title(title)
  save_figure(fig, path)


def _labels_and_probs(labels, probs, k: int) -> tuple[np.ndarray, np.ndarray]:
  """labels [N] and float64 probs [N, k] for the one-vs-rest curves, or a ValueError."""
  labels = np.asarray(labels)
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or probs.shape[1] != k or labels.shape != (probs.shape[0],):
    raise ValueError(f"need labels [N] and probs [N, {k}], got {labels.shape} and {probs.shape}")
  return labels, probs


def roc_curves_png(path: str | os.PathLike, labels, probs, class_names: Sequence[str], *,
                   title: str = "") -> None:
  """One-vs-rest ROC curve of each class with its AUC in the legend; a class absent from the
  labels (or the only one present) has no curve and is marked n/a."""
  labels, probs = _labels_and_probs(labels, probs, len(class_names))
  fig = new_figure((5.5, 5.0))
  ax = fig.add_subplot()
  ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
  for c, name in enumerate(class_names):
    positive = labels == c
    if positive.all() or not positive.any():
      ax.plot([], [], label=f"{name} (AUC n/a: one class only)")
      continue
    fpr, tpr, _ = skm.roc_curve(positive, probs[:, c])
    auc = skm.roc_auc_score(positive, probs[:, c])
    ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC = {auc:.3f})")
  ax.set_xlim(-0.01, 1.01)
  ax.set_ylim(-0.01, 1.01)
  ax.set_aspect("equal")
  ax.set_xlabel("false positive rate (1 - specificity)")
  ax.set_ylabel("true positive rate (sensitivity)")
  ax.legend(loc="lower right", fontsize=8)
  ax.grid(alpha=0.3)
  if title:
    ax.set_title(title)
  save_figure(fig, path)


def average_precision(positive, scores) -> float:
  """Area under the step-wise precision-recall curve, sum_n (R_n - R_{n-1}) P_n (no
  interpolation, so not the trapezoid's optimism): the AP the legend shows."""
  precision, recall, _ = skm.precision_recall_curve(positive, scores)
  # precision_recall_curve runs from high thresholds to low: recall decreases along the arrays.
  return float(-np.sum(np.diff(recall) * precision[:-1]))


def pr_curves_png(path: str | os.PathLike, labels, probs, class_names: Sequence[str], *,
                  title: str = "") -> dict[str, float | None]:
  """One-vs-rest precision-recall curve of each class with its average precision (AP) in the
  legend, and each class's prevalence (a no-skill classifier's AP) as a dotted line: with
  imbalanced classes (COVID is the minority) PR curves show what ROC curves hide. Returns the APs
  (None for a class absent from the labels or the only one present)."""
  labels, probs = _labels_and_probs(labels, probs, len(class_names))
  fig = new_figure((5.5, 5.0))
  ax = fig.add_subplot()
  aps: dict[str, float | None] = {}
  for c, name in enumerate(class_names):
    positive = labels == c
    if positive.all() or not positive.any():
      ax.plot([], [], label=f"{name} (AP n/a: one class only)")
      aps[name] = None
      continue
    precision, recall, _ = skm.precision_recall_curve(positive, probs[:, c])
    aps[name] = average_precision(positive, probs[:, c])
    line, = ax.step(recall, precision, where="post", linewidth=1.5,
                    label=f"{name} (AP = {aps[name]:.3f})")
    ax.axhline(positive.mean(), color=line.get_color(), linestyle=":", linewidth=1)
  ax.set_xlim(-0.01, 1.01)
  ax.set_ylim(-0.01, 1.01)
  ax.set_aspect("equal")
  ax.set_xlabel("recall (sensitivity)")
  ax.set_ylabel("precision (positive predictive value)")
  ax.legend(loc="lower left", fontsize=8, title="dotted: prevalence", title_fontsize=7)
  ax.grid(alpha=0.3)
  if title:
    ax.set_title(title)
  save_figure(fig, path)
  return aps


def reliability_png(path: str | os.PathLike, bins: Sequence[Mapping], *, title: str = "",
                    ece: float | None = None) -> None:
  """Reliability diagram: per confidence bin (`metrics.calibration`'s `bins`) the accuracy
  against the mean confidence, with the diagonal of perfect calibration and each bin's count."""
  fig = new_figure((4.5, 4.5))
  ax = fig.add_subplot()
  ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
  full = [b for b in bins if b["count"]]
  centres = [(b["low"] + b["high"]) / 2 for b in full]
  ax.bar(centres, [b["accuracy"] for b in full], width=[b["high"] - b["low"] for b in full],
         edgecolor="black", alpha=0.6, label="accuracy")
  ax.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "o", color="C1",
          markersize=4, label="mean confidence")
  for x, b in zip(centres, full):
    ax.text(x, min(b["accuracy"] + 0.02, 0.97), str(b["count"]), ha="center", fontsize=7)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel("confidence (top-class probability)")
  ax.set_ylabel("accuracy")
  ax.legend(loc="upper left", fontsize=8)
  ax.grid(alpha=0.3)
  text = title + ("" if ece is None else f"  ECE {ece:.3f} (pooled)")
  if text:
    ax.set_title(text.strip(), fontsize=9)
  save_figure(fig, path)


def training_curves_png(path: str | os.PathLike,
                        history: Mapping[str, Sequence[tuple[float, float]]], *,
                        title: str = "") -> None:
  """One small panel per series of `(step, value)` pairs (losses have different scales)."""
  names = list(history)
  cols = max(1, min(3, len(names)))
  rows = max(1, math.ceil(len(names) / cols))
  fig = new_figure((4.0 * cols, 2.8 * rows))
  if not names:
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, "no training history", ha="center", va="center")
    ax.set_axis_off()
  for i, name in enumerate(names):
    ax = fig.add_subplot(rows, cols, i + 1)
    points = np.asarray(history[name], np.float64).reshape(-1, 2)
    ax.plot(points[:, 0], points[:, 1], linewidth=1.2)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  save_figure(fig, path)


def read_scalars(csv_path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """`{tag: [(step, value), ...]}` sorted by step from a `step,tag,value` CSV; a step written twice
  (a run resumed from a checkpoint older than its last log) keeps its last value."""
  latest: dict[str, dict[int, float]] = {}
  with open(csv_path, encoding="utf-8") as f:
    for line in f:
      fields = line.rstrip("\n").split(",")
      if len(fields) < 3 or fields[0] == "step":
        continue
      try:
        step, value = int(fields[0]), float(fields[-1])
      except ValueError:
        continue  # a line cut short by a crash
      latest.setdefault(",".join(fields[1:-1]), {})[step] = value
  return {tag: sorted(points.items()) for tag, points in latest.items()}


def write_training_curves(workdir: str | os.PathLike, *,
                          prefixes: Sequence[str] = ("train/", "val/")) -> pathlib.Path | None:
  """Draws `<workdir>/training_curves.png` from `<workdir>/tensorboard/scalars.csv`.

  One panel per `train/` and `val/` scalar. Returns the picture's path, or None when the run
  wrote no scalars (or on processes other than 0, which write nothing).
  """
  workdir = pathlib.Path(workdir)
  csv_path = workdir / "tensorboard" / SCALARS_CSV
  if not workdir_lib.is_writer() or not csv_path.is_file():
    return None
  history = {tag: points for tag, points in read_scalars(csv_path).items()
             if tag.startswith(tuple(prefixes))}
  if not history:
    return None
  out = workdir / "training_curves.png"
  training_curves_png(out, history, title=workdir.name)
  return out
