"""Paired significance tests between two classifiers on the same test images, and seed averages.

The paper's claim is that GAN-enhanced training beats the original data; both classifiers see the
same test images, so the comparison is paired. Across runs (seeds, splits) the test image is the
unit: a sign-flip permutation test of per-image differences with the interval that inverts it
(`sign_flip_test`), the power figure beside it, Holm for the secondary comparisons. Per run:
McNemar on the discordant images and a paired bootstrap; runs are summarised by a t-interval,
and the Cochran-Mantel-Haenszel statistic (the stratified McNemar) pools them as detail only: it
counts each image once per run. Proportions (accuracy,
recall, ...) get exact Clopper-Pearson or Wilson score intervals: a percentile bootstrap gives
44/44 the empty-width interval [1, 1].
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


def _check_proportion(k, n, confidence: float) -> tuple[int, int]:
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  if int(k) != k or int(n) != n:
    raise ValueError(f"k and n must be whole counts, got k={k}, n={n}")
  k, n = int(k), int(n)
  if n < 0 or not 0 <= k <= max(n, 0):
    raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
  return k, n


def clopper_pearson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
  """Exact (Clopper-Pearson, 1934) interval for a proportion k / n, from beta quantiles.

  Guarantees at least the nominal coverage for every true p (it is conservative), which is why the
  classification report uses it near 0 and 1, where the classes' recalls live: 43/44 gives
  [0.880, 0.999], 44/44 gives [0.920, 1]. n = 0: the proportion is undefined, (nan, nan).
  """
  k, n = _check_proportion(k, n, confidence)
  if n == 0:
    return math.nan, math.nan
  alpha = 1.0 - confidence
  lo = 0.0 if k == 0 else float(sps.beta.ppf(alpha / 2.0, k, n - k + 1))
  hi = 1.0 if k == n else float(sps.beta.ppf(1.0 - alpha / 2.0, k + 1, n - k))
  return lo, hi


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
  """Wilson (1927) score interval for k / n, without continuity correction.

  (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n): narrower than Clopper-Pearson, with
  coverage close to nominal on average but below it for some p near 0 or 1. n = 0: (nan, nan).
  """
  k, n = _check_proportion(k, n, confidence)
  if n == 0:
    return math.nan, math.nan
  z = float(sps.norm.ppf(0.5 + confidence / 2.0))
  p = k / n
  denom = 1.0 + z * z / n
  centre = (p + z * z / (2.0 * n)) / denom
  half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


def cochran_mantel_haenszel_paired(pairs: Sequence[tuple[Any, Any]], *, correction: bool = True,
                                   confidence: float = 0.95) -> dict[str, Any]:
  """Pooled paired test of classifiers A and B over seeds: the stratified McNemar.

  `pairs` holds one (correct_a, correct_b) per seed, per-image correctness on the same test images
  in the same order. Each seed gives a 2x2 table of A-correct x B-correct (`tables`, as [[both,
  only A], [only B, neither]]); b_s = only A, c_s = only B. Treating every (seed, image) pair as
  a stratum (classifier x correct), the Cochran-Mantel-Haenszel statistic reduces to
  (|sum b - sum c| - 1)^2 / sum(b + c) (the -1 is the continuity correction, `correction=False`
  drops it), chi-square with 1 df; with one seed it is McNemar's chi-square. `exact_p_value` is the
  conditional exact test: given the discordant pairs, sum c ~ Binomial(sum(b + c), 1/2) under H0.

  `odds_ratio` is the Mantel-Haenszel pooled odds ratio over those strata, sum c / sum b (> 1
  favours B), with the Robins-Breslow-Greenland interval exp(log OR +- z sqrt(1/sum b + 1/sum c));
  both None when sum b or sum c is 0.
  `difference` is the mean over seeds of the per-seed paired accuracy difference B - A, with a
  Student-t interval over seeds (`difference_ci`, None for one seed): it measures the spread across
  training runs, not the test set's sampling error. Test images are shared by all seeds, so the
  strata are not independent samples of images: the test answers "does B beat A on these images
  across training runs", not a population claim.
  """
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  if len(pairs) == 0:
    raise ValueError("cochran_mantel_haenszel_paired needs at least one seed")
  tables, diffs = [], []
  for correct_a, correct_b in pairs:
    a, bb = _paired(correct_a, correct_b)
    tables.append([[int(np.sum(a & bb)), int(np.sum(a & ~bb))],
                   [int(np.sum(~a & bb)), int(np.sum(~a & ~bb))]])
    diffs.append(float(bb.mean() - a.mean()))
  b = sum(t[0][1] for t in tables)
  c = sum(t[1][0] for t in tables)
  n_disc = b + c
  if n_disc == 0:
    statistic, p, exact_p = None, 1.0, 1.0
  else:
    statistic = max(abs(b - c) - (1.0 if correction else 0.0), 0.0) ** 2 / n_disc
    p = float(sps.chi2.sf(statistic, df=1))
    exact_p = float(sps.binomtest(c, n_disc, 0.5, alternative="two-sided").pvalue)
  z = float(sps.norm.ppf(0.5 + confidence / 2.0))
  if b > 0 and c > 0:
    odds = c / b
    half = z * math.sqrt(1.0 / b + 1.0 / c)
    odds_ci = [odds * math.exp(-half), odds * math.exp(half)]
  else:   # 0 or infinite: no finite log odds, so neither estimate nor interval (strict JSON)
    odds, odds_ci = None, None
  summary = mean_std_ci(diffs, confidence=confidence)
  return {"test": "Cochran-Mantel-Haenszel (stratified McNemar) over seeds"
                  + (", continuity corrected" if correction else ""),
          "statistic": statistic, "p_value": min(p, 1.0), "exact_p_value": min(exact_p, 1.0),
          "b": b, "c": c, "n_seeds": len(tables), "tables": tables,
          "odds_ratio": odds, "odds_ratio_ci": odds_ci,
          "difference": summary["mean"], "difference_ci": summary["ci"],
          "difference_method": "mean over seeds of per-seed accuracy B - A, t-interval over seeds",
          "per_seed_difference": diffs, "confidence": float(confidence)}


# --------------------------------------------------------------- the test image as the unit

_FLIP_CHUNK = 2000   # sign-flip resamples drawn per block, to bound memory at large N


def _sign_matrices(n: int, n_resamples: int, seed: int):
  """Blocks of sign vectors [b, n]: all 2^n when 2^n <= n_resamples (exact), else the identity
  followed by `n_resamples` seeded random flips (the observed labelling counts once, Phipson &
  Smyth 2010, so a p-value is never 0). Yields (signs, exact)."""
  exact = n < 63 and 2 ** n <= n_resamples
  if exact:
    codes = np.arange(2 ** n, dtype=np.int64)
    for i in range(0, codes.size, _FLIP_CHUNK):
      bits = (codes[i:i + _FLIP_CHUNK, None] >> np.arange(n)) & 1
      yield 1.0 - 2.0 * bits, True
    return
  yield np.ones((1, n)), False
  rng = np.random.default_rng(seed)
  for i in range(0, n_resamples, _FLIP_CHUNK):
    bits = rng.integers(0, 2, size=(min(_FLIP_CHUNK, n_resamples - i), n), dtype=np.int8)
    yield 1.0 - 2.0 * bits, False


def sign_flip_test(differences, *, n_resamples: int = 20000, seed: int = 0,
                   confidence: float = 0.95) -> dict[str, Any]:
  """Paired sign-flip permutation test of the mean of per-unit differences, with the confidence
  interval that inverts the same test.

  `differences[i]` is one test image's difference B - A (e.g. its mean correctness over seeds
  under row B minus under row A). Under H0 each difference is symmetric about 0, so its sign is
  exchangeable: p = share of sign vectors s with |mean(s d)| >= |mean(d)| (two-sided), over all
  2^n vectors when 2^n <= n_resamples (exact), else over the identity and `n_resamples` seeded
  random flips. This is `scipy.stats.permutation_test(..., permutation_type='samples')` for one
  sample (tests/test_stats.py checks it), written out because the interval needs the flips.

  The interval is the set of shifts delta whose test of d - delta keeps p >= 1 - confidence,
  with the same sign vectors. For each vector the shifts it counts for form one interval
  containing mean(d) (a concave quadratic in delta is >= 0 there), so that set is an interval
  too, read off the vectors' roots, and it excludes 0 exactly when p < 1 - confidence.
  """
  d = np.asarray(differences, np.float64).ravel()
  if d.size == 0:
    raise ValueError("sign_flip_test needs at least one difference")
  if not np.all(np.isfinite(d)):
    raise ValueError("differences contain NaN or inf")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  n = d.size
  mean = float(d.mean())
  tol = 1e-9 * max(1.0, float(np.abs(d).max()))    # equal statistics count as equal (ties)
  lows, highs, counts, total, exact = [], [], 0, 0, False
  for signs, exact in _sign_matrices(n, n_resamples, seed):
    m = signs @ d / n                 # the flipped mean
    s = signs.mean(1)                 # the flipped mean of a constant: shifts move m by -delta s
    hit = np.abs(m) >= abs(mean) - tol
    counts += int(hit.sum())
    total += signs.shape[0]
    # |m - delta s| >= |mean - delta|  <=>  a delta^2 + b delta + c >= 0, a = s^2 - 1 <= 0
    a, b, c = s * s - 1.0, 2.0 * (mean - m * s), m * m - mean * mean
    with np.errstate(divide="ignore", invalid="ignore"):
      root = np.sqrt(np.maximum(b * b - 4.0 * a * c, 0.0))
      r1 = np.where(a < -1e-12, (-b + root) / (2.0 * a), -np.inf)
      r2 = np.where(a < -1e-12, (-b - root) / (2.0 * a), np.inf)
    # The vectors that hit at delta = 0 contain 0 in their interval, the others do not: the
    # comparison above decides, not the roots' rounding.
    r1 = np.where(hit, np.minimum(r1, 0.0), np.where(r1 <= 0.0, np.where(mean > 0, 1e-300, r1),
                                                     r1))
    r2 = np.where(hit, np.maximum(r2, 0.0), np.where(r2 >= 0.0, np.where(mean < 0, -1e-300, r2),
                                                     r2))
    lows.append(r1)
    highs.append(r2)
  alpha = 1.0 - confidence
  p = counts / total
  needed = max(1, math.ceil(alpha * total - 1e-9))   # vectors that keep p(delta) >= alpha
  lo = float(np.sort(np.concatenate(lows))[needed - 1])
  hi = float(np.sort(np.concatenate(highs))[::-1][needed - 1])
  return {"difference": mean, "ci": [lo, hi], "p_value": float(min(p, 1.0)), "n": int(n),
          "exact": bool(exact), "n_resamples": int(total), "seed": int(seed),
          "confidence": float(confidence),
          "test": "paired sign-flip permutation test, test image as the unit"
                  + (" (exact)" if exact else f" ({total - 1} seeded random flips)"),
          "ci_method": "inversion of the same sign-flip test"}


def minimum_detectable_difference(differences, *, alpha: float = 0.05,
                                  power: float = 0.8) -> float | None:
  """The smallest true mean difference a two-sided test at `alpha` detects with `power`, at this
  number of units and their observed spread: (z_{1-alpha/2} + z_power) sd(d) / sqrt(n) (normal
  approximation of the paired test). None when it is undefined (n < 2 or no spread)."""
  d = np.asarray(differences, np.float64).ravel()
  if d.size < 2:
    return None
  sd = float(d.std(ddof=1))
  if sd == 0.0:
    return None
  z = float(sps.norm.ppf(1.0 - alpha / 2.0) + sps.norm.ppf(power))
  return z * sd / math.sqrt(d.size)


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm's step-down adjusted p-values (Holm 1979): controls the family-wise error rate."""
  p = np.asarray(p_values, np.float64)
  m = p.size
  if m == 0:
    return []
  order = np.argsort(p, kind="stable")
  adjusted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
  out = np.empty(m)
  out[order] = adjusted
  return [float(v) for v in out]
