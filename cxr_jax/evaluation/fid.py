"""Fréchet distance (FID) and Kernel Inception Distance (KID) between two sets of features.

The features are given by the caller. InceptionV3 weights are not available offline, so the
pipeline passes the pooled last-stage features (`ResNet.features`, spatially averaged) of the
ResNet-50 classifier trained on the original data: numbers are comparable between our runs but
not with published FID/KID values computed on Inception features.

FID follows the reference implementation (Heusel et al. 2017, pytorch-fid): Gaussian fit of each
set, ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), an eps*I offset when the product's square
root is not finite (singular covariances, fewer samples than dimensions) and the real part when
the imaginary part is numerical noise. KID is the unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3 averaged over random subsets (Binkowski et al. 2018): it has no bias in
the number of samples, which matters for a few hundred synthetic images.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg


def _features(x, name: str, min_rows: int = 2) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name} must be [N, D] features, got shape {x.shape}")
  if x.shape[0] < min_rows:
    raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or inf")
  return x


def frechet_distance_from_moments(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"moment shapes disagree: mu {mu1.shape} / {mu2.shape}, sigma "
                     f"{sigma1.shape} / {sigma2.shape}")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    imag = np.max(np.abs(np.diagonal(covmean).imag))
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: matrix square root has an imaginary component {imag:.3g}, more than "
                       "numerical noise; use more samples than feature dimensions")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance(feats_a, feats_b, *, eps: float = 1e-6) -> float:
  """FID between feature sets `[N, D]` and `[M, D]` (Gaussian fit, unbiased covariances)."""
  a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
  return frechet_distance_from_moments(a.mean(0), np.cov(a, rowvar=False),
                                       b.mean(0), np.cov(b, rowvar=False), eps=eps)


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_from_kernels(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
  """Unbiased MMD^2 from kernel matrices: diagonals of K_xx and K_yy left out."""
  m, n = k_xx.shape[0], k_yy.shape[0]
  return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
               + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
               - 2.0 * k_xy.sum() / (m * n))


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return _mmd2_from_kernels(_poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y))


_PRECOMPUTE_MAX = 30_000_000   # kernel entries (240 MB) up to which all pairs are computed once


def kernel_inception_distance(feats_a, feats_b, *, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
  """KID: mean and std (over `subsets`) of the unbiased polynomial MMD^2 on random subsets.

  Each subset draws min(subset_size, N, M) rows of each set without replacement, as in the
  reference implementation. Can be slightly negative when the sets match (unbiased estimator).
  When the sets are small enough the kernel matrices are computed once and each subset only
  indexes them (same numbers, far fewer matrix products on a CPU).
  """
  a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
  if subsets < 1:
    raise ValueError(f"subsets must be >= 1, got {subsets}")
  na, nb = a.shape[0], b.shape[0]
  m = min(subset_size, na, nb)
  if m < 2:
    raise ValueError(f"subset_size must be >= 2, got {subset_size}")
  rng = np.random.default_rng(seed)
  draws = [(rng.choice(na, m, replace=False), rng.choice(nb, m, replace=False))
           for _ in range(subsets)]
  if na * na + nb * nb + na * nb <= _PRECOMPUTE_MAX:
    k_aa, k_bb, k_ab = _poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b)
    mmds = [_mmd2_from_kernels(k_aa[np.ix_(i, i)], k_bb[np.ix_(j, j)], k_ab[np.ix_(i, j)])
            for i, j in draws]
  else:
    mmds = [polynomial_mmd2(a[i], b[j]) for i, j in draws]
  mmds = np.asarray(mmds)
  return float(mmds.mean()), float(mmds.std())
