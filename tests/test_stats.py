"""Paired tests and seed summaries against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxr_jax.evaluation import stats


def _pairs(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-image correctness of A and B with the given concordant / discordant counts."""
  a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
  b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
  return np.array(a), np.array(b)


def test_mcnemar_exact_binomial_by_hand():
  a, b = _pairs(both=20, only_a=1, only_b=6, neither=3)
  r = stats.mcnemar(a, b)
  assert (r["b"], r["c"], r["n"]) == (1, 6, 30)
  assert r["test"] == "exact binomial"
  # p = 2 * sum_{k<=1} C(7, k) / 2^7 = 2 * (1 + 7) / 128 = 0.125
  assert r["p_value"] == pytest.approx(0.125)
  assert r["accuracy_a"] == pytest.approx(21 / 30) and r["accuracy_b"] == pytest.approx(26 / 30)


def test_mcnemar_chi_square_with_continuity_by_hand():
  a, b = _pairs(both=50, only_a=10, only_b=20, neither=5)
  r = stats.mcnemar(a, b)
  assert r["test"] == "chi-square with continuity correction"
  # (|10 - 20| - 1)^2 / 30 = 81 / 30 = 2.7; chi2(1) survival = erfc(sqrt(2.7 / 2))
  assert r["statistic"] == pytest.approx(2.7)
  assert r["p_value"] == pytest.approx(math.erfc(math.sqrt(1.35)))


def test_mcnemar_switches_test_at_25_discordant():
  assert stats.mcnemar(*_pairs(0, 12, 12, 0))["test"] == "exact binomial"
  assert stats.mcnemar(*_pairs(0, 12, 13, 0))["test"].startswith("chi-square")
  # no discordant pair: nothing to tell the classifiers apart
  assert stats.mcnemar(*_pairs(5, 0, 0, 5))["p_value"] == 1.0
  # b = c: exact p-value capped at 1
  assert stats.mcnemar(*_pairs(5, 3, 3, 5))["p_value"] == 1.0


def test_paired_bootstrap_identical_classifiers():
  a = np.array([True, False, True, True] * 10)
  r = stats.paired_bootstrap(a, a, n_bootstrap=500)
  assert r["difference"] == 0.0 and r["ci"] == [0.0, 0.0] and r["p_value"] == 1.0


def test_paired_bootstrap_clear_difference():
  a, b = _pairs(both=40, only_a=2, only_b=30, neither=28)
  r = stats.paired_bootstrap(a, b, n_bootstrap=2000, seed=1)
  assert r["difference"] == pytest.approx((30 - 2) / 100)        # B - A
  lo, hi = r["ci"]
  assert 0.0 < lo < r["difference"] < hi
  assert r["p_value"] < 0.01
  assert r["p_value"] >= 1 / 2001                                 # never exactly 0
  # the other direction is symmetric
  assert stats.paired_bootstrap(b, a, n_bootstrap=2000, seed=1)["difference"] == pytest.approx(-0.28)


def test_paired_bootstrap_small_difference_not_significant():
  a, b = _pairs(both=40, only_a=5, only_b=6, neither=9)
  r = stats.paired_bootstrap(a, b, n_bootstrap=2000)
  assert r["ci"][0] < 0.0 < r["ci"][1]
  assert r["p_value"] > 0.5


def test_paired_inputs_must_match():
  with pytest.raises(ValueError, match="equal length"):
    stats.mcnemar(np.ones(3, bool), np.ones(4, bool))


def test_mean_std_ci_by_hand():
  r = stats.mean_std_ci([1.0, 2.0, 3.0])
  # mean 2, std (ddof=1) 1, t_{0.975, 2} = 4.302653, half width 4.302653 / sqrt(3)
  assert r["n"] == 3 and r["mean"] == pytest.approx(2.0) and r["std"] == pytest.approx(1.0)
  half = 4.302653 / math.sqrt(3)
  assert r["ci"] == pytest.approx([2.0 - half, 2.0 + half], abs=1e-5)


def test_mean_std_ci_single_seed_and_undefined():
  assert stats.mean_std_ci([0.9]) == {"n": 1, "mean": 0.9, "std": None, "ci": None,
                                      "confidence": 0.95}
  assert math.isnan(stats.mean_std_ci([0.9, None])["mean"])
  with pytest.raises(ValueError):
    stats.mean_std_ci([])
