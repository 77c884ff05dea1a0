"""Grad-CAM on hand-built linear feature/head pairs whose heatmaps are known analytically."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cxr_jax.evaluation import gradcam as gc

W = jnp.array([2.0, -1.0, 0.0])   # class weights of the linear head


def _images(n=3, size=8, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 1))


def _identity_features(images):
  return images                                         # [N, H, W, 1]: the image is the map


def _mean_head(fmap):
  return jnp.mean(fmap, axis=(1, 2, 3))[:, None] * W    # logit_k = w_k * mean(fmap)


def _normalise(cam):
  cam = np.asarray(cam, np.float64)
  lo = cam.min(axis=(1, 2), keepdims=True)
  hi = cam.max(axis=(1, 2), keepdims=True)
  return (cam - lo) / (hi - lo)


def test_linear_head_gives_the_analytic_map():
  images = _images()
  # d logit_k / d fmap = w_k / (H W) everywhere, so cam = relu(w_k / (H W) * image):
  # class 0 (w = 2) highlights the positive pixels, class 1 (w = -1) the negative ones.
  x = np.asarray(images[..., 0], np.float64)
  got0 = gc.gradcam(_identity_features, _mean_head, images, jnp.zeros(3, jnp.int32))
  np.testing.assert_allclose(got0, _normalise(np.maximum(x, 0)), atol=1e-5)
  got1 = gc.gradcam(_identity_features, _mean_head, images, 1)
  np.testing.assert_allclose(got1, _normalise(np.maximum(-x, 0)), atol=1e-5)


def test_channel_weights_combine_with_their_gradients():
  images = _images(n=2, seed=1)
  features = lambda im: jnp.concatenate([im, im ** 2], axis=-1)   # C = 2
  a, b = jnp.array([1.0, -3.0]), jnp.array([0.5, 1.0])
  head = lambda f: jnp.mean(f[..., 0], (1, 2))[:, None] * a + jnp.mean(f[..., 1], (1, 2))[:, None] * b
  x = np.asarray(images[..., 0], np.float64)
  got = gc.gradcam(features, head, images, jnp.array([0, 1]))
  # weights (a_k, b_k) / (H W): cam_k = relu(a_k x + b_k x^2) up to a positive scale
  expected = np.stack([_normalise(np.maximum(1.0 * x + 0.5 * x ** 2, 0))[0],
                       _normalise(np.maximum(-3.0 * x + 1.0 * x ** 2, 0))[1]])
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_zero_gradient_gives_zeros_not_nan():
  got = gc.gradcam(_identity_features, _mean_head, _images(), 2)   # w_2 = 0
  assert not np.any(np.isnan(got))
  np.testing.assert_array_equal(got, 0.0)


def test_low_resolution_map_is_upsampled_to_the_image():
  images = jnp.abs(_images(n=2, size=16, seed=2))
  pool = lambda im: im.reshape(2, 4, 4, 4, 4, 1).mean(axis=(2, 4))   # [2, 4, 4, 1]
  got = gc.gradcam(pool, _mean_head, images, 0)
  assert got.shape == (2, 16, 16)
  low = pool(images)[..., 0]
  expected = _normalise(jax.image.resize(low, (2, 16, 16), "bilinear"))
  np.testing.assert_allclose(got, expected, atol=1e-5)
  assert float(got.min()) == 0.0 and float(got.max()) == pytest.approx(1.0)


def test_jit_and_predicted_class_default():
  images = _images()
  fn = jax.jit(functools.partial(gc.gradcam, _identity_features, _mean_head))
  got = fn(images, jnp.array([0, 1, 2]))
  assert got.shape == (3, 8, 8) and got.dtype == jnp.float32
  np.testing.assert_allclose(got[0], gc.gradcam(_identity_features, _mean_head, images, 0)[0],
                             atol=1e-6)
  np.testing.assert_array_equal(got[2], 0.0)
  # None: the argmax class, here 0 where the mean is positive and 1 where it is negative
  predicted = jnp.argmax(_mean_head(images), -1)
  np.testing.assert_allclose(gc.gradcam(_identity_features, _mean_head, images, None),
                             gc.gradcam(_identity_features, _mean_head, images, predicted))


def test_overlay_png_writes_a_grid(tmp_path):
  images = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[None, None, :, None], (3, 16, 1, 1))
  heat = np.zeros((3, 16, 16), np.float32)
  heat[1] = 1.0
  tiles = gc.overlay(images, heat)
  assert tiles.shape == (3, 16, 16, 3) and tiles.dtype == np.uint8
  assert not np.array_equal(tiles[0], tiles[1])                   # heat changes the colour
  path = tmp_path / "gradcam.png"
  gc.overlay_png(path, images, heat, titles=["COVID 0.91", "NORMAL 0.80", "VIRAL 0.55"])
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size[0] > 16
  assert [p.name for p in tmp_path.iterdir()] == ["gradcam.png"]   # no temporary left behind
  with pytest.raises(ValueError, match="same size"):
    gc.overlay(images, heat[:, :8])
