"""Translation-quality figures on constructed translators, SSIM against hand values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_jax.evaluation import fid
from cxr_jax.evaluation import quality


def _smooth_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
  """uint8 [n, size, size]: random blobs, so SSIM between different images is low but not 0."""
  from scipy import ndimage
  rng = np.random.default_rng(seed)
  x = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 2, 2))
  x = (x - x.min()) / (x.max() - x.min())
  return np.round(255 * x).astype(np.uint8)


def test_ssim_of_an_image_with_itself_is_one():
  x = _smooth_images(1)[0]
  assert quality.ssim(x, x) == pytest.approx(1.0)
  assert quality.ssim(x.astype(np.float32) / 255, x.astype(np.float32) / 255,
                      data_range=1.0) == pytest.approx(1.0)


def test_ssim_of_flat_images_by_hand():
  # flat images: variances and covariance 0, SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
  # times C2 / C2, with C1 = (0.01 * 255)^2
  a, b = np.full((16, 16), 100, np.uint8), np.full((16, 16), 150, np.uint8)
  c1 = (0.01 * 255) ** 2
  assert quality.ssim(a, b) == pytest.approx((2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1))


def test_ssim_matches_scipy_gaussian_formula():
  # independent re-computation of Wang et al.'s map with scipy's Gaussian filter (sigma 1.5,
  # truncated at 3.5 sigma = 11x11 window), averaged without the 5-pixel border
  from scipy import ndimage
  a, b = _smooth_images(2, size=24, seed=3).astype(np.float64)
  f = lambda x: ndimage.gaussian_filter(x, 1.5, truncate=3.5, mode="reflect")
  mu_a, mu_b = f(a), f(b)
  var_a, var_b = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2
  cov = f(a * b) - mu_a * mu_b
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
      (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  assert quality.ssim(a.astype(np.uint8), b.astype(np.uint8), data_range=255) == pytest.approx(
      s[5:-5, 5:-5].mean())


def test_ssim_rejects_float_without_range_and_bad_shapes():
  with pytest.raises(ValueError, match="data_range"):
    quality.ssim(np.zeros((16, 16)), np.zeros((16, 16)))
  with pytest.raises(ValueError, match="one shape"):
    quality.ssim(np.zeros((16, 16), np.uint8), np.zeros((16, 15), np.uint8))


def test_derangement_has_no_fixed_point_and_is_seeded():
  for n in (2, 3, 10):
    j = quality.derangement(n, seed=1)
    assert sorted(j) == list(range(n)) and np.all(j != np.arange(n))
  np.testing.assert_array_equal(quality.derangement(20, 5), quality.derangement(20, 5))
  with pytest.raises(ValueError):
    quality.derangement(1, 0)


def test_identity_translation_has_large_input_dependence():
  src = _smooth_images(12)
  own, other = quality.ssim_to_sources(src, src, seed=0)
  assert own == pytest.approx(1.0)
  dep = quality.input_dependence(src, src, seed=0)
  assert dep == pytest.approx(1.0 - other)
  assert dep > 0.5


def test_constant_output_has_no_input_dependence_and_no_diversity():
  src = _smooth_images(40, seed=1)
  out = np.repeat(_smooth_images(1, seed=2), 40, axis=0)   # ignores its input
  assert abs(quality.input_dependence(src, out, seed=0)) < 0.05
  assert quality.diversity(out) == pytest.approx(0.0, abs=1e-12)
  flat = np.full((5, 16, 16), 128, np.uint8)                # one flat picture, repeated
  assert quality.diversity(flat) == pytest.approx(0.0)


def test_diversity_of_independent_noise_is_about_one():
  noise = np.random.default_rng(0).integers(0, 256, size=(50, 32, 32), dtype=np.uint8)
  assert quality.diversity(noise) == pytest.approx(1.0, abs=0.01)
  # anti-correlated pair: correlation -1, diversity 2
  x = noise[0].astype(np.float64)
  assert quality.diversity(np.stack([x, -x])) == pytest.approx(2.0)


def test_diversity_subsamples_large_sets_by_seed():
  noise = np.random.default_rng(1).normal(size=(30, 8, 8))
  a = quality.diversity(noise, max_images=10, seed=0)
  assert a == quality.diversity(noise, max_images=10, seed=0)
  assert a != quality.diversity(noise, max_images=10, seed=1)
  assert a == pytest.approx(1.0, abs=0.15)


def test_relative_diversity_and_target_share():
  real = np.random.default_rng(2).integers(0, 256, size=(20, 16, 16), dtype=np.uint8)
  same = np.repeat(real[:1], 20, axis=0)
  assert quality.relative_diversity(same, real) == pytest.approx(0.0, abs=1e-12)
  assert quality.relative_diversity(real, real) == pytest.approx(1.0)
  probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9], [0.3, 0.7]])
  assert quality.target_share(probs, 1) == 0.75
  with pytest.raises(ValueError, match="target_index"):
    quality.target_share(probs, 2)


def test_labelled_grid_layout_and_difference():
  src = _smooth_images(3, size=16)
  out = np.clip(src.astype(int) + 10, 0, 255).astype(np.uint8)
  g = quality.labelled_grid(src, out, n=2)
  header = quality._HEADER + 2
  assert g.dtype == np.uint8 and g.shape == (header + 2 * 16 + 2, 3 * 16 + 2 * 2)
  assert (g[:quality._HEADER] < 128).any()                  # the labels are drawn
  np.testing.assert_array_equal(g[header:header + 16, :16], src[0])
  np.testing.assert_array_equal(g[header:header + 16, 18:34], out[0])
  diff = g[header:header + 16, 36:52]
  expected = np.minimum(np.abs(out[0].astype(int) - src[0]) * 4, 255)
  np.testing.assert_array_equal(diff, expected)
  # float images in [-1, 1] need their range
  with pytest.raises(ValueError, match="data_range"):
    quality.labelled_grid(src / 127.5 - 1, out / 127.5 - 1)
  f = quality.labelled_grid(src / 127.5 - 1, out / 127.5 - 1, data_range=2.0, value_min=-1.0)
  np.testing.assert_array_equal(f, quality.labelled_grid(src, out))


def test_translation_quality_dict():
  src = _smooth_images(10, size=16, seed=4)
  real = _smooth_images(12, size=16, seed=5)
  out = src[:, ::-1]                                        # a fixed function of the input
  features = lambda x: np.asarray(x, np.float64).reshape(len(x), -1)[:, :32] / 255
  probs = np.tile([[0.3, 0.7]], (10, 1))
  q = quality.translation_quality(src[..., None], out[..., None], real, features_fn=features,
                                  probs=probs, target_index=1, seed=3)
  json.dumps(q, allow_nan=False)
  assert q["input_dependence"] == pytest.approx(quality.input_dependence(src, out, seed=3))
  assert q["diversity"] == pytest.approx(quality.diversity(out, seed=3))
  assert q["relative_diversity"] == pytest.approx(q["diversity"] / quality.diversity(real, seed=3))
  kid = fid.kernel_inception_distance(features(out), features(real), seed=3)
  assert (q["kid"], q["kid_std"]) == pytest.approx(kid)
  assert q["target_share"] == 1.0 and q["n_translated"] == 10 and q["n_real_target"] == 12
  bare = quality.translation_quality(src, out, real)
  assert "kid" not in bare and "target_share" not in bare
  with pytest.raises(ValueError, match="target_index"):
    quality.translation_quality(src, out, real, probs=probs)
