"""Paired significance tests between two classifiers on the same test images, and seed averages.

The paper's claim is that GAN-enhanced training beats the original data; both classifiers see the
same test images, so the comparison is paired: McNemar on the discordant images and a paired
bootstrap of the accuracy difference. Runs over several seeds are summarised by a t-interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

_EXACT_BELOW = 25   # b + c below this: exact binomial test, else chi-square (continuity corrected)
_CHUNK = 1000       # bootstrap resamples drawn per block, to bound memory at large N


def _paired(correct_a, correct_b) -> tuple[np.ndarray, np.ndarray]:
  a = np.asarray(correct_a).astype(bool)
  b = np.asarray(correct_b).astype(bool)
  if a.ndim != 1 or a.shape != b.shape:
    raise ValueError(f"correct_a and correct_b must be 1-D of equal length, got {a.shape} and "
                     f"{b.shape}")
  if a.size == 0:
    raise ValueError("no test samples to compare")
  return a, b


def mcnemar(correct_a, correct_b) -> dict[str, Any]:
  """McNemar's test on per-image correctness of classifiers A and B (same images, same order).

  b = images A gets right and B wrong, c = the reverse. Exact two-sided binomial p-value when
  b + c < 25 (the chi-square approximation is poor there), else chi-square with continuity
  correction, (|b - c| - 1)^2 / (b + c) on 1 degree of freedom.
  """
  a, bb = _paired(correct_a, correct_b)
  b = int(np.sum(a & ~bb))
  c = int(np.sum(~a & bb))
  n_disc = b + c
  if n_disc == 0:
    test, statistic, p = "exact binomial", None, 1.0
  elif n_disc < _EXACT_BELOW:
    test, statistic = "exact binomial", None
    p = float(sps.binomtest(min(b, c), n_disc, 0.5, alternative="two-sided").pvalue)
  else:
    test = "chi-square with continuity correction"
    statistic = (abs(b - c) - 1.0) ** 2 / n_disc
    p = float(sps.chi2.sf(statistic, df=1))
  return {"b": b, "c": c, "n": int(a.size), "accuracy_a": float(a.mean()),
          "accuracy_b": float(bb.mean()), "test": test, "statistic": statistic,
          "p_value": min(p, 1.0)}


def paired_bootstrap(correct_a, correct_b, *, n_bootstrap: int = 10000, seed: int = 0,
                     confidence: float = 0.95) -> dict[str, Any]:
  """Accuracy difference B - A with a percentile bootstrap CI and a two-sided p-value.

  Test images are resampled with replacement, the same indices for both classifiers. The p-value
  is the shift method (Efron & Tibshirani, ch. 16): the share of resampled differences at least
  as far from the observed one as the observed is from 0, with +1 in numerator and denominator so
  it is never exactly 0.
  """
  a, b = _paired(correct_a, correct_b)
  if n_bootstrap < 1:
    raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
  d = b.astype(np.float64) - a.astype(np.float64)
  n = d.size
  observed = float(d.mean())
  rng = np.random.default_rng(seed)
  deltas = np.concatenate([
      d[rng.integers(0, n, size=(min(_CHUNK, n_bootstrap - i), n))].mean(1)
      for i in range(0, n_bootstrap, _CHUNK)])
  alpha = 100.0 * (1.0 - confidence) / 2.0
  lo, hi = np.percentile(deltas, [alpha, 100.0 - alpha])
  extreme = int(np.sum(np.abs(deltas - observed) >= abs(observed) - 1e-12))
  return {"difference": observed, "ci": [float(lo), float(hi)],
          "p_value": (extreme + 1) / (n_bootstrap + 1), "n": int(n),
          "accuracy_a": float(a.mean()), "accuracy_b": float(b.mean()),
          "n_bootstrap": int(n_bootstrap), "seed": int(seed), "confidence": float(confidence)}


def mean_std_ci(values: Sequence[float | None], *, confidence: float = 0.95) -> dict[str, Any]:
  """Mean, sample std (ddof=1) and Student-t CI of one metric over seeds.

  n = 1 has no spread: std and CI are None. None values (undefined metrics read back from
  metrics.json) count as NaN, so an undefined metric stays visibly undefined.
  """
  x = np.array([math.nan if v is None else float(v) for v in values], np.float64)
  n = int(x.size)
  if n == 0:
    raise ValueError("mean_std_ci needs at least one value")
  mean = float(x.mean())
  if n == 1:
    return {"n": 1, "mean": mean, "std": None, "ci": None, "confidence": float(confidence)}
  std = float(x.std(ddof=1))
  half = float(sps.t.ppf(0.5 + confidence / 2.0, df=n - 1)) * std / math.sqrt(n)
  return {"n": n, "mean": mean, "std": std, "ci": [mean - half, mean + half],
          "confidence": float(confidence)}
