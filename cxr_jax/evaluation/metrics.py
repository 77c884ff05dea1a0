"""Classification metrics on the held-out test set, each with a 95 % CI.

The paper compares classifiers whose accuracies differ by a few points on a few hundred test
images, so every number carries a CI. Proportions (accuracy, per-class precision, recall,
specificity) get the exact Clopper-Pearson interval of their count k / n: a percentile bootstrap
collapses to [1, 1] at 44/44 and is too narrow near 0 and 1, exactly where the classes' recalls
live. Clopper-Pearson rather than Wilson because it never covers less than the nominal 95 %
(Wilson dips below it for some p near 0 and 1); the price is a slightly wider interval. F1 and
ROC-AUC are not proportions of a count: they keep a percentile bootstrap. Every entry names its
interval in `ci_method`. Point estimates come from scikit-learn (the reference);
the bootstrap is vectorised in numpy: all resamples are drawn at once as multiplicity counts
`[B, N]`, per-resample confusion matrices are one matrix product, and ROC-AUC is a weighted
Mann-Whitney statistic, so 1000 resamples of 1000 images take a fraction of a second.

Undefined values (precision of a class never predicted, recall / ROC-AUC of a class absent from
the labels) are NaN in the report dict with a line in `notes`; macro averages skip them, as
scikit-learn's `zero_division=np.nan` does. `metrics.json` writes them as `null` (strict JSON).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

from cxr_jax.evaluation import stats
from cxr_jax.evaluation import subgroups as subgroups_lib
from cxr_jax.utils import files

CLOPPER_PEARSON = "clopper-pearson"
BOOTSTRAP = "percentile bootstrap"
_PER_CLASS = ("precision", "recall", "specificity", "f1", "roc_auc")
_SUMMARY = ("accuracy", "macro_f1", "weighted_f1", "macro_roc_auc")


def _check_inputs(labels, probs, class_names) -> tuple[np.ndarray, np.ndarray, int]:
  labels = np.asarray(labels)
  probs = np.asarray(probs, np.float64)
  k = len(class_names)
  if probs.ndim != 2 or probs.shape[1] != k:
    raise ValueError(f"probs must be [N, {k}] for {k} classes, got shape {probs.shape}")
  if labels.shape != (probs.shape[0],):
    raise ValueError(f"labels must be [N={probs.shape[0]}], got shape {labels.shape}")
  if labels.size == 0:
    raise ValueError("no test samples: cannot compute metrics")
  if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= k:
    raise ValueError(f"labels must be integers in [0, {k}), got {labels.dtype} "
                     f"in [{labels.min()}, {labels.max()}]")
  if not np.all(np.isfinite(probs)):
    raise ValueError("probs contain NaN or inf")
  return labels.astype(np.int64), probs, k


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den with NaN where den == 0 (an undefined metric, not a zero)."""
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  out = np.full(np.broadcast(num, den).shape, np.nan)
  np.divide(num, den, out=out, where=den != 0)
  return out


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
  """Mean over the defined entries; NaN (no warning) when none is defined."""
  defined = ~np.isnan(x)
  return _div(np.where(defined, x, 0.0).sum(axis), defined.sum(axis))


def metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
  """Metrics of a batch of confusion matrices `[..., K, K]` (rows true, columns predicted).

  One function for every resample: `[B, K, K]` gives `[B]` / `[B, K]` arrays.
  """
  cm = np.asarray(cm, np.float64)
  tp = np.diagonal(cm, axis1=-2, axis2=-1)
  support = cm.sum(-1)                    # true count per class
  predicted = cm.sum(-2)                  # predicted count per class
  n = support.sum(-1, keepdims=True)
  fp, fn = predicted - tp, support - tp
  tn = n - tp - fp - fn
  f1 = _div(2 * tp, 2 * tp + fp + fn)
  weighted = _div(np.where(np.isnan(f1), 0.0, f1 * support).sum(-1), support.sum(-1))
  return {
      "accuracy": _div(tp.sum(-1), n[..., 0]),
      "precision": _div(tp, predicted),
      "recall": _div(tp, support),
      "specificity": _div(tn, tn + fp),
      "f1": f1,
      "macro_f1": _nanmean(f1, -1),
      "weighted_f1": weighted,
  }


def weighted_auc(binary: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """ROC-AUC of each row of `weights` `[B, N]` (sample multiplicities) as Mann-Whitney U.

  AUC = P(score_pos > score_neg) + 0.5 P(tie): sort once, sum weights per distinct score, then
  each positive group counts the negative weight below it plus half the tied one. NaN for a row
  without positives or negatives. With unit weights this equals `sklearn.metrics.roc_auc_score`.
  """
  binary = np.asarray(binary, bool)
  scores = np.asarray(scores, np.float64)
  weights = np.atleast_2d(np.asarray(weights, np.float64))
  order = np.argsort(scores, kind="stable")
  s, pos, w = scores[order], binary[order], weights[:, order]
  starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])   # first index of each distinct score
  w_pos = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)
  w_neg = np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1)
  neg_below = np.cumsum(w_neg, axis=1) - w_neg
  u = (w_pos * (neg_below + 0.5 * w_neg)).sum(1)
  return _div(u, w_pos.sum(1) * w_neg.sum(1))


def _bootstrap_counts(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
  """All resamples at once: `[B, N]` multiplicity of each test image in each resample."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, n, size=(n_bootstrap, n))
  flat = (np.arange(n_bootstrap)[:, None] * n + idx).ravel()
  return np.bincount(flat, minlength=n_bootstrap * n).reshape(n_bootstrap, n).astype(np.float64)


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float, float]:
  """Percentile interval over the defined resamples, and the fraction that were undefined."""
  defined = samples[~np.isnan(samples)]
  if defined.size == 0:
    return math.nan, math.nan, 1.0
  alpha = 100.0 * (1.0 - confidence) / 2.0
  lo, hi = np.percentile(defined, [alpha, 100.0 - alpha])
  return float(lo), float(hi), 1.0 - defined.size / samples.size


def _entry(value: float, samples: np.ndarray, confidence: float, name: str,
           notes: list[str]) -> dict[str, Any]:
  lo, hi, undefined = _interval(samples, confidence)
  if 0.0 < undefined < 1.0 and not math.isnan(value):
    notes.append(f"{name}: undefined in {undefined:.1%} of bootstrap resamples, "
                 "the CI uses the others")
  return {"value": float(value), "ci": [lo, hi], "ci_method": BOOTSTRAP}


def _exact_entry(value: float, k: float, n: float, confidence: float) -> dict[str, Any]:
  """A proportion k / n with its Clopper-Pearson interval ([nan, nan] when n = 0)."""
  lo, hi = stats.clopper_pearson_interval(int(round(k)), int(round(n)), confidence)
  return {"value": float(value), "ci": [lo, hi], "ci_method": CLOPPER_PEARSON}


def classification_report(labels, probs, class_names: Sequence[str], *, n_bootstrap: int = 1000,
                          seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
  """Test-set metrics of `probs` `[N, K]` (predicted class = argmax) against `labels` `[N]`.

  Returns a JSON-serialisable dict: `accuracy`, `macro_f1`, `weighted_f1`, `macro_roc_auc` and
  `per_class[name][precision|recall|specificity|f1|roc_auc]` as `{'value', 'ci': [lo, hi],
  'ci_method'}` (Clopper-Pearson for accuracy, precision, recall, specificity; bootstrap else),
  `per_class[name]['support']`, `confusion_matrix` (rows true, columns predicted), `support`,
  `notes` and the bootstrap settings.
  """
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  if n_bootstrap < 1:
    raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
  class_names = [str(c) for c in class_names]
  labels, probs, k = _check_inputs(labels, probs, class_names)
  n = labels.size
  preds = probs.argmax(1)
  ks = list(range(k))
  notes: list[str] = []

  # Point estimates: scikit-learn.
  cm = skm.confusion_matrix(labels, preds, labels=ks)
  precision, recall, f1, support = skm.precision_recall_fscore_support(
      labels, preds, labels=ks, average=None, zero_division=np.nan)
  point = metrics_from_confusion(cm)   # specificity; the rest equals sklearn's
  auc = np.full(k, np.nan)
  for c in ks:
    if 0 < support[c] < n:
      auc[c] = skm.roc_auc_score(labels == c, probs[:, c])
  values = {
      "accuracy": skm.accuracy_score(labels, preds),
      "macro_f1": skm.f1_score(labels, preds, labels=ks, average="macro", zero_division=np.nan),
      "weighted_f1": skm.f1_score(labels, preds, labels=ks, average="weighted",
                                  zero_division=np.nan),
      "macro_roc_auc": float(_nanmean(auc, 0)),
      "precision": precision, "recall": recall, "specificity": point["specificity"], "f1": f1,
      "roc_auc": auc,
  }
  for c, name in enumerate(class_names):
    if support[c] == 0:
      notes.append(f"class {name} is absent from the test labels: its recall and ROC-AUC are "
                   "undefined (NaN), left out of the macro ROC-AUC")
    elif support[c] == n:
      notes.append(f"only class {name} is in the test labels: its specificity and ROC-AUC are "
                   "undefined (NaN)")
    if cm[:, c].sum() == 0:
      notes.append(f"class {name} is never predicted: its precision is undefined (NaN)")

  # Bootstrap: per-resample confusion matrices from multiplicity counts.
  counts = _bootstrap_counts(n, n_bootstrap, seed)
  cell = np.eye(k * k)[labels * k + preds]                    # [N, K*K] one-hot of (true, pred)
  boot = metrics_from_confusion((counts @ cell).reshape(n_bootstrap, k, k))
  boot["roc_auc"] = np.stack([weighted_auc(labels == c, probs[:, c], counts) for c in ks], 1)
  boot["macro_roc_auc"] = _nanmean(boot["roc_auc"], 1)

  report: dict[str, Any] = {
      "n": int(n), "class_names": class_names, "n_bootstrap": int(n_bootstrap),
      "seed": int(seed), "confidence": float(confidence),
  }
  tp = np.diag(cm)
  predicted = cm.sum(0)
  counts_of = {"precision": lambda c: (tp[c], predicted[c]),
               "recall": lambda c: (tp[c], support[c]),
               "specificity": lambda c: (n - support[c] - predicted[c] + tp[c], n - support[c])}
  for key in _SUMMARY:
    if key == "accuracy":
      report[key] = _exact_entry(values[key], tp.sum(), n, confidence)
    else:
      report[key] = _entry(values[key], boot[key], confidence, key, notes)
  report["per_class"] = {}
  for c, name in enumerate(class_names):
    entry: dict[str, Any] = {"support": int(support[c])}
    for key in _PER_CLASS:
      if key in counts_of:
        entry[key] = _exact_entry(values[key][c], *counts_of[key](c), confidence)
      else:
        entry[key] = _entry(values[key][c], boot[key][:, c], confidence, f"{name} {key}", notes)
    report["per_class"][name] = entry
  report["confusion_matrix"] = cm.astype(int).tolist()
  report["support"] = [int(s) for s in support]
  report["notes"] = notes
  return report


def calibration(labels, probs, *, n_bins: int = 10) -> dict[str, Any]:
  """How far the predicted probabilities are from the frequencies they claim.

  `brier`: the multi-class Brier score, mean over images of sum_k (p_k - [y = k])^2 (Brier
  1950; 0 is perfect, 2 the worst). `ece`: the expected calibration error of the top label,
  sum_bins n_b / N |accuracy_b - confidence_b| over `n_bins` equal-width confidence bins (Guo et
  al. 2017; bins are (lo, hi], the first includes 0). `bins`: per bin its edges, count, mean
  confidence and accuracy (None when empty): the reliability diagram."""
  labels = np.asarray(labels)
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or labels.shape != (probs.shape[0],) or labels.size == 0:
    raise ValueError(f"need labels [N] and probs [N, K] with N > 0, got {labels.shape} and "
                     f"{probs.shape}")
  n, k = probs.shape
  onehot = np.eye(k)[labels.astype(np.int64)]
  brier = float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
  confidence = probs.max(1)
  correct = probs.argmax(1) == labels
  edges = np.linspace(0.0, 1.0, n_bins + 1)
  which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
  bins, ece = [], 0.0
  for b in range(n_bins):
    mask = which == b
    count = int(mask.sum())
    conf = float(confidence[mask].mean()) if count else None
    acc = float(correct[mask].mean()) if count else None
    if count:
      ece += count / n * abs(acc - conf)
    bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                 "confidence": conf, "accuracy": acc})
  return {"n": int(n), "brier": brier, "ece": float(ece), "n_bins": int(n_bins), "bins": bins}


def _nan_to_none(obj: Any) -> Any:
  """Strict JSON has no NaN: undefined metrics become null."""
  if isinstance(obj, float):
    return None if math.isnan(obj) else obj
  if isinstance(obj, dict):
    return {k: _nan_to_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_nan_to_none(v) for v in obj]
  return obj


def _fmt(x: float | None) -> str:
  return "n/a" if x is None or math.isnan(x) else f"{x:.4f}"


def _fmt_ci(entry: dict[str, Any]) -> str:
  lo, hi = entry["ci"]
  return "n/a" if lo is None or math.isnan(lo) else f"[{lo:.4f}, {hi:.4f}]"


def _fmt_cell(entry: dict[str, Any]) -> str:
  value = _fmt(entry["value"])
  return value if value == "n/a" else f"{value} {_fmt_ci(entry)}"


def metrics_markdown(report: dict[str, Any], *, title: str = "") -> str:
  """The report as markdown tables: summary, per class, confusion matrix, notes."""
  pct = f"{100 * report['confidence']:g} %"
  lines = [f"# {title}" if title else "# Test-set metrics", "",
           f"{report['n']} test images; {pct} CIs: exact Clopper-Pearson for proportions "
           "(accuracy, precision, recall, specificity), percentile bootstrap over "
           f"{report['n_bootstrap']} resamples (seed {report['seed']}) for F1 and ROC-AUC.", "",
           f"| Metric | Value | {pct} CI |", "|---|---|---|"]
  for key in _SUMMARY:
    lines.append(f"| {key} | {_fmt(report[key]['value'])} | {_fmt_ci(report[key])} |")
  lines += ["", "## Per class", "",
            "| Class | Support | " + " | ".join(_PER_CLASS) + " |",
            "|---|---:|" + "---|" * len(_PER_CLASS)]
  for name, entry in report["per_class"].items():
    cells = [_fmt_cell(entry[key]) for key in _PER_CLASS]
    lines.append(f"| {name} | {entry['support']} | " + " | ".join(cells) + " |")
  names = report["class_names"]
  lines += ["", "## Confusion matrix (rows true, columns predicted)", "",
            "| true \\ predicted | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names)]
  for name, row in zip(names, report["confusion_matrix"]):
    lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
  if report.get("subgroups"):
    lines += ["", subgroups_lib.markdown(report["subgroups"]).rstrip("\n")]
  if report["notes"]:
    lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
  return "\n".join(lines) + "\n"


def write_metrics(out_dir: str | os.PathLike, report: dict[str, Any], *,
                  title: str = "") -> tuple[str, str]:
  """Writes `metrics.json` (NaN as null) and `metrics.md` atomically; returns both paths."""
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, "metrics.json")
  md_path = os.path.join(out_dir, "metrics.md")
  files.write_text_atomic(json_path, json.dumps(_nan_to_none(report), indent=2, allow_nan=False) + "\n")
  files.write_text_atomic(md_path, metrics_markdown(report, title=title))
  return json_path, md_path
