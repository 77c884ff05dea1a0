"""FID against the closed form for Gaussians, KID against a direct hand computation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cxr_jax.evaluation import fid


def test_fid_of_a_set_with_itself_is_zero():
  x = np.random.default_rng(0).normal(size=(300, 8))
  assert fid.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fid_exact_moments_diagonal_closed_form():
  mu1, s1 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])
  mu2, s2 = np.array([1.0, 1.0, 0.0]), np.array([4.0, 2.0, 0.5])
  # ||mu1 - mu2||^2 = 1 + 0 + 4; sum(s1 + s2 - 2 sqrt(s1 s2)) = (5 - 4) + (4 - 4) + (3.5 - 2 sqrt(1.5))
  expected = 5.0 + 1.0 + 0.0 + 3.5 - 2.0 * math.sqrt(1.5)
  got = fid.frechet_distance_from_moments(mu1, np.diag(s1), mu2, np.diag(s2))
  assert got == pytest.approx(expected, rel=1e-9)
  # a rotation of both Gaussians leaves the distance unchanged (full, non-diagonal covariances)
  q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
  rotated = fid.frechet_distance_from_moments(q @ mu1, q @ np.diag(s1) @ q.T,
                                              q @ mu2, q @ np.diag(s2) @ q.T)
  assert rotated == pytest.approx(expected, rel=1e-6)


def test_fid_from_samples_approaches_the_closed_form():
  rng = np.random.default_rng(2)
  mu1, s1 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])
  mu2, s2 = np.array([1.0, 1.0, 0.0]), np.array([4.0, 2.0, 0.5])
  a = mu1 + rng.normal(size=(20000, 3)) * np.sqrt(s1)
  b = mu2 + rng.normal(size=(20000, 3)) * np.sqrt(s2)
  expected = 6.0 + 3.5 - 2.0 * math.sqrt(1.5)
  assert fid.frechet_distance(a, b) == pytest.approx(expected, rel=0.03)


def test_fid_with_fewer_samples_than_dimensions_is_finite():
  rng = np.random.default_rng(3)
  got = fid.frechet_distance(rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 1.0)
  assert math.isfinite(got) and got > 0


def _kid_by_hand(x, y):
  """Unbiased MMD^2 with (x.y / d + 1)^3, written as plain loops."""
  d = len(x[0])
  k = lambda u, v: (sum(ui * vi for ui, vi in zip(u, v)) / d + 1.0) ** 3
  m, n = len(x), len(y)
  xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return xx + yy - 2.0 * xy


def test_kid_matches_hand_computation_on_a_tiny_example():
  x = [[0.0, 1.0, 2.0], [1.0, -1.0, 0.5], [2.0, 0.0, 0.0], [0.5, 0.5, 0.5]]
  y = [[1.0, 1.0, 1.0], [0.0, 2.0, -1.0], [3.0, 0.0, 1.0], [-1.0, 0.0, 2.0]]
  expected = _kid_by_hand(x, y)
  # subset_size 10 is capped to the 4 rows: every subset is all rows, in some order
  mean, std = fid.kernel_inception_distance(np.array(x), np.array(y), subsets=5, subset_size=10)
  assert mean == pytest.approx(expected, rel=1e-12)
  assert std == pytest.approx(0.0, abs=1e-12)
  # unequal sizes in the estimator itself
  assert fid.polynomial_mmd2(np.array(x), np.array(y[:3])) == pytest.approx(
      _kid_by_hand(x, y[:3]), rel=1e-12)


def test_kid_precomputed_kernels_match_per_subset_products(monkeypatch):
  rng = np.random.default_rng(5)
  a, b = rng.normal(size=(30, 6)), rng.normal(size=(25, 6)) + 0.2
  fast = fid.kernel_inception_distance(a, b, subsets=7, subset_size=10, seed=3)
  monkeypatch.setattr(fid, "_PRECOMPUTE_MAX", 0)
  slow = fid.kernel_inception_distance(a, b, subsets=7, subset_size=10, seed=3)
  assert fast == pytest.approx(slow, rel=1e-10)
  assert fast[1] > 0                                   # subsets of 10 differ


def test_kid_near_zero_for_same_distribution_positive_for_shifted():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
  same, same_std = fid.kernel_inception_distance(a, b, subsets=20, subset_size=200)
  shifted, _ = fid.kernel_inception_distance(a, b + 0.5, subsets=20, subset_size=200)
  assert abs(same) < 3 * same_std + 1e-3
  assert shifted > 10 * (abs(same) + same_std)


def test_shapes_are_checked():
  with pytest.raises(ValueError, match="dimensions differ"):
    fid.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
  with pytest.raises(ValueError, match="at least 2"):
    fid.kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))
