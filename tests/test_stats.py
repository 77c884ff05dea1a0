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


# --- proportion intervals -------------------------------------------------------------------------

@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 10), (3, 10), (10, 10), (43, 44), (44, 44),
                                 (17, 153), (500, 1000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_intervals_match_scipy_binomtest(k, n, confidence):
  from scipy import stats as sps
  result = sps.binomtest(k, n)
  exact = result.proportion_ci(confidence_level=confidence, method="exact")
  wilson = result.proportion_ci(confidence_level=confidence, method="wilson")
  assert stats.clopper_pearson_interval(k, n, confidence) == pytest.approx(
      (exact.low, exact.high), abs=1e-10)
  assert stats.wilson_interval(k, n, confidence) == pytest.approx(
      (wilson.low, wilson.high), abs=1e-10)


def test_clopper_pearson_published_examples():
  # the worked example: 43/44 -> [88.0, 99.9] %, and 44/44 -> [92.0, 100] %
  lo, hi = stats.clopper_pearson_interval(43, 44)
  assert (round(lo, 3), round(hi, 3)) == (0.880, 0.999)
  lo, hi = stats.clopper_pearson_interval(44, 44)
  assert round(lo, 3) == 0.920 and hi == 1.0
  # k = n has the closed form (alpha / 2)^(1/n) for the lower bound
  assert lo == pytest.approx(0.025 ** (1 / 44))
  # k = 0: upper bound 1 - (alpha / 2)^(1/n)
  assert stats.clopper_pearson_interval(0, 44) == pytest.approx((0.0, 1 - 0.025 ** (1 / 44)))


def test_wilson_by_hand():
  # 8/10, z = 1.959964: centre (0.8 + z^2/20) / (1 + z^2/10), half z sqrt(0.016 + z^2/400) / (..)
  z = 1.959963984540054
  denom = 1 + z * z / 10
  centre = (0.8 + z * z / 20) / denom
  half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / denom
  assert stats.wilson_interval(8, 10) == pytest.approx((centre - half, centre + half))
  assert stats.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)


def test_intervals_undefined_and_bad_input():
  assert all(math.isnan(v) for v in stats.clopper_pearson_interval(0, 0))
  assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))
  for fn in (stats.clopper_pearson_interval, stats.wilson_interval):
    with pytest.raises(ValueError, match="k <= n"):
      fn(5, 4)
    with pytest.raises(ValueError, match="whole"):
      fn(1.5, 4)
    with pytest.raises(ValueError, match="confidence"):
      fn(1, 4, 1.0)


# --- pooled paired test over seeds ---------------------------------------------------------------

def test_cmh_pooled_by_hand():
  seeds = [_pairs(both=50, only_a=3, only_b=7, neither=5),
           _pairs(both=48, only_a=4, only_b=6, neither=7),
           _pairs(both=52, only_a=2, only_b=8, neither=3)]
  r = stats.cochran_mantel_haenszel_paired(seeds)
  # sum b = 9, sum c = 21: (|9 - 21| - 1)^2 / 30 = 121 / 30
  assert (r["b"], r["c"], r["n_seeds"]) == (9, 21, 3)
  assert r["tables"][0] == [[50, 3], [7, 5]]
  assert r["statistic"] == pytest.approx(121 / 30)
  assert r["p_value"] == pytest.approx(math.erfc(math.sqrt(121 / 60)))
  # exact: 2 P(X <= 9), X ~ Bin(30, 1/2)
  assert r["exact_p_value"] == pytest.approx(2 * sum(math.comb(30, k) for k in range(10)) / 2 ** 30)
  # Mantel-Haenszel OR over pair strata = 21 / 9, RGB variance 1/9 + 1/21
  assert r["odds_ratio"] == pytest.approx(21 / 9)
  half = 1.959963984540054 * math.sqrt(1 / 9 + 1 / 21)
  assert r["odds_ratio_ci"] == pytest.approx([21 / 9 * math.exp(-half), 21 / 9 * math.exp(half)])
  # per-seed differences (c - b) / n: 4/65, 2/65, 6/65; t-interval with 2 df
  d = np.array([4, 2, 6]) / 65
  assert r["per_seed_difference"] == pytest.approx(list(d))
  assert r["difference"] == pytest.approx(d.mean())
  half_t = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)
  assert r["difference_ci"] == pytest.approx([d.mean() - half_t, d.mean() + half_t])
  uncorrected = stats.cochran_mantel_haenszel_paired(seeds, correction=False)
  assert uncorrected["statistic"] == pytest.approx(144 / 30)
  import json
  json.dumps(r, allow_nan=False)


def test_cmh_one_seed_is_mcnemar():
  a, b = _pairs(both=50, only_a=10, only_b=20, neither=5)
  r = stats.cochran_mantel_haenszel_paired([(a, b)])
  m = stats.mcnemar(a, b)
  assert r["statistic"] == pytest.approx(m["statistic"])
  assert r["p_value"] == pytest.approx(m["p_value"])
  assert r["difference_ci"] is None and r["difference"] == pytest.approx(10 / 85)


def test_cmh_degenerate_cases():
  no_disc = stats.cochran_mantel_haenszel_paired([_pairs(5, 0, 0, 5), _pairs(4, 0, 0, 6)])
  assert no_disc["p_value"] == 1.0 and no_disc["statistic"] is None
  assert no_disc["odds_ratio"] is None
  one_sided = stats.cochran_mantel_haenszel_paired([_pairs(5, 0, 4, 5), _pairs(4, 0, 3, 6)])
  assert one_sided["odds_ratio"] is None and one_sided["odds_ratio_ci"] is None
  assert one_sided["statistic"] == pytest.approx(36 / 7)
  with pytest.raises(ValueError, match="at least one seed"):
    stats.cochran_mantel_haenszel_paired([])
  with pytest.raises(ValueError, match="equal length"):
    stats.cochran_mantel_haenszel_paired([(np.ones(3, bool), np.ones(4, bool))])


def test_cmh_matches_statsmodels_stratified_table():
  sm = pytest.importorskip("statsmodels.stats.contingency_tables")
  rng = np.random.default_rng(0)
  seeds = []
  for _ in range(4):
    a = rng.random(120) < 0.85
    b = np.where(rng.random(120) < 0.15, ~a, a)
    seeds.append((a, b))
  r = stats.cochran_mantel_haenszel_paired(seeds)
  # one stratum per (seed, image): rows classifier A / B, columns correct / wrong
  strata = [np.array([[x, 1 - x], [y, 1 - y]], float)
            for a, b in seeds for x, y in zip(a.astype(int), b.astype(int)) if x != y]
  table = sm.StratifiedTable(np.stack(strata, -1))
  for correction in (True, False):
    ref = table.test_null_odds(correction=correction)
    got = stats.cochran_mantel_haenszel_paired(seeds, correction=correction)
    assert got["statistic"] == pytest.approx(ref.statistic)
    assert got["p_value"] == pytest.approx(ref.pvalue)
  # statsmodels' odds are A-correct odds: the inverse of ours (B favoured > 1)
  assert r["odds_ratio"] == pytest.approx(1 / table.oddsratio_pooled)
  lo, hi = table.oddsratio_pooled_confint()
  assert r["odds_ratio_ci"] == pytest.approx([1 / hi, 1 / lo])


# --- the test image as the unit: sign-flip test, its interval, power, Holm ----------------------

def test_sign_flip_exact_by_hand():
  # differences 1, 1, 1, -1 (four images, observed sum 2): over the 16 sign vectors the sum is
  # 4, 2, 0, -2, -4 with counts 1, 4, 6, 4, 1, so p = P(|sum| >= 2) = (1 + 4 + 4 + 1) / 16.
  r = stats.sign_flip_test([1.0, 1.0, 1.0, -1.0])
  assert r["exact"] and r["n_resamples"] == 16
  assert r["difference"] == 0.5 and r["p_value"] == pytest.approx(10 / 16)
  # all four positive: only the identity and the full flip reach |mean| = 1: p = 2 / 16
  assert stats.sign_flip_test([1.0] * 4)["p_value"] == pytest.approx(2 / 16)
  # nothing differs: p = 1 and the interval is the point 0
  r = stats.sign_flip_test(np.zeros(30))
  assert r["p_value"] == 1.0 and r["ci"] == [0.0, 0.0]


@pytest.mark.parametrize("n", [6, 11, 14])
def test_sign_flip_exact_equals_scipy_permutation_test(n):
  from scipy import stats as sps
  rng = np.random.default_rng(n)
  d = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=n, p=[0.1, 0.1, 0.4, 0.2, 0.2])
  ref = sps.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=2 ** n)
  r = stats.sign_flip_test(d, n_resamples=2 ** n)
  assert r["exact"] and r["p_value"] == pytest.approx(ref.pvalue)


def test_sign_flip_random_agrees_with_scipy_within_monte_carlo_error():
  from scipy import stats as sps
  rng = np.random.default_rng(3)
  d = rng.choice([-1.0, -1 / 3, 0.0, 1 / 3, 2 / 3, 1.0], size=200,
                 p=[0.06, 0.04, 0.7, 0.05, 0.05, 0.1])
  r = stats.sign_flip_test(d, n_resamples=20000, seed=5)
  ref = sps.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=20000,
                             rng=np.random.default_rng(6))
  assert not r["exact"] and r["n_resamples"] == 20001
  sd = math.sqrt(ref.pvalue * (1 - ref.pvalue) / 20000)
  assert abs(r["p_value"] - ref.pvalue) < 5 * math.sqrt(2) * sd + 1e-4
  assert stats.sign_flip_test(d, n_resamples=20000, seed=5) == r        # seeded


def test_sign_flip_interval_is_the_inverted_test():
  # The interval holds exactly the shifts delta whose test of d - delta keeps p >= 0.05, with
  # the same flips; so it excludes 0 exactly when p < 0.05.
  rng = np.random.default_rng(0)
  for trial in range(40):
    n = int(rng.integers(16, 60))
    d = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=n, p=[0.08, 0.05, 0.6, 0.12, 0.15])
    r = stats.sign_flip_test(d, n_resamples=1000, seed=trial)
    lo, hi = r["ci"]
    assert (lo <= 0.0 <= hi) == (r["p_value"] >= 0.05)
    assert lo <= r["difference"] <= hi
    for delta in (lo - 1e-6, lo + 1e-6, hi - 1e-6, hi + 1e-6, (lo + hi) / 2):
      p = stats.sign_flip_test(d - delta, n_resamples=1000, seed=trial)["p_value"]
      assert (lo <= delta <= hi) == (p >= 0.05), (trial, delta, lo, hi, p)


def test_sign_flip_bad_input():
  with pytest.raises(ValueError, match="at least one"):
    stats.sign_flip_test([])
  with pytest.raises(ValueError, match="NaN"):
    stats.sign_flip_test([0.1, math.nan])


def test_minimum_detectable_difference_matches_statsmodels_power():
  power = pytest.importorskip("statsmodels.stats.power")
  d = np.array([1.0] * 6 + [-1.0] * 2 + [0.0] * 92)
  mdd = stats.minimum_detectable_difference(d)
  # one-sample normal power (ratio=0): the effect size in sd units detected with 80 % power
  effect = power.NormalIndPower().solve_power(nobs1=100, alpha=0.05, power=0.8, ratio=0)
  assert mdd == pytest.approx(effect * d.std(ddof=1), rel=1e-4)
  # by hand: (1.959964 + 0.841621) sd / sqrt(n)
  assert mdd == pytest.approx(2.801585 * d.std(ddof=1) / 10, rel=1e-5)
  assert stats.minimum_detectable_difference(np.zeros(10)) is None
  assert stats.minimum_detectable_difference([0.5]) is None


def test_holm_by_hand_and_against_statsmodels():
  # Holm (1979): sorted 0.01, 0.02, 0.03, 0.04 times 4, 3, 2, 1 -> 0.04, 0.06, 0.06, 0.06
  assert stats.holm([0.04, 0.01, 0.03, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
  assert stats.holm([]) == [] and stats.holm([0.7, 0.6]) == pytest.approx([1.0, 1.0])
  multitest = pytest.importorskip("statsmodels.stats.multitest")
  p = np.random.default_rng(0).random(12) ** 3
  ref = multitest.multipletests(p, method="holm")[1]
  assert stats.holm(p) == pytest.approx(list(ref))
