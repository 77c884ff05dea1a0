"""Tests of the embedded synthetic database: determinism, counts, layout on disk, idempotence, and
that each class shows its finding where radiology puts it (so the classifier has something real to
learn). Small renders (32-64 px) keep the file fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cxr_jax.data import synthetic
from cxr_jax.data import synthetic_cache
from cxr_jax.errors import DataError

from conftest import REPO_ROOT

S = 64  # render size for the statistical tests
N = 10  # images per class for the statistical tests


def _stack(class_name: str, seed: int = 0, n: int = N, size: int = S) -> np.ndarray:
  images = [synthetic.render(class_name, seed, i, size) for i in range(n)]
  return np.stack(images).astype(np.float64)


def _layers(class_name: str, n: int = N, seed: int = 0):
  """Rendered images with the renderer's own anatomy masks, to measure inside the lung zones."""
  layers = synthetic._render_layers  # pylint: disable=protected-access
  return [layers(class_name, seed, i, S, with_masks=True) for i in range(n)]


def _zone_mean(image: np.ndarray, mask: np.ndarray) -> float:
  assert mask.sum() >= 10, "zone too small to measure: the anatomy masks changed?"
  return float(image[mask].mean())


def _open_lung(m: dict) -> np.ndarray:
  """Lung not overlapped by the heart / mediastinum."""
  return (m["lung"] > 0.9) & (m["solid"] < 0.1)


# ------------------------------------------------------------------------------------------------
# Counts and determinism.


def test_class_counts():
  assert synthetic.class_counts() == {"COVID": 219, "NORMAL": 1341, "VIRAL_PNEUMONIA": 1345}
  assert synthetic.class_counts(1.0) == synthetic.CLASS_COUNTS
  # Rounded half up, at least one image per class.
  assert synthetic.class_counts(0.1) == {"COVID": 22, "NORMAL": 134, "VIRAL_PNEUMONIA": 135}
  assert synthetic.class_counts(2) == {"COVID": 438, "NORMAL": 2682, "VIRAL_PNEUMONIA": 2690}
  assert synthetic.class_counts(1e-6) == {"COVID": 1, "NORMAL": 1, "VIRAL_PNEUMONIA": 1}
  for bad in (0, -1.0, float("nan"), float("inf")):
    with pytest.raises(ValueError):
      synthetic.class_counts(bad)


def test_folder_names_are_first_release():
  assert synthetic.FOLDER_NAMES == {"COVID": "COVID", "NORMAL": "NORMAL",
                                    "VIRAL_PNEUMONIA": "Viral Pneumonia"}
  assert set(synthetic.FOLDER_NAMES) == set(synthetic.CLASS_COUNTS)


def test_render_is_deterministic_and_seeded_per_image():
  a = synthetic.render("COVID", 3, 5, S)
  assert a.dtype == np.uint8 and a.shape == (S, S)
  assert synthetic.render("COVID", 3, 5, S).tobytes() == a.tobytes()
  # Rendering others in between does not change it (no shared generator state).
  synthetic.render("NORMAL", 3, 0, S)
  assert synthetic.render("COVID", 3, 5, S).tobytes() == a.tobytes()
  others = [synthetic.render("COVID", 4, 5, S), synthetic.render("COVID", 3, 6, S),
            synthetic.render("NORMAL", 3, 5, S), synthetic.render("VIRAL_PNEUMONIA", 3, 5, S)]
  for other in others:
    assert np.abs(other.astype(int) - a).mean() > 5.0


@pytest.mark.parametrize("size", [32, 64, 97])
def test_render_sizes(size):
  image = synthetic.render("VIRAL_PNEUMONIA", 0, 1, size)
  assert image.shape == (size, size) and image.dtype == np.uint8


def test_render_rejects_bad_arguments():
  with pytest.raises(ValueError, match="LUNG_OPACITY"):
    synthetic.render("LUNG_OPACITY", 0, 0, S)
  with pytest.raises(ValueError, match="image_size"):
    synthetic.render("COVID", 0, 0, 16)
  with pytest.raises(ValueError, match="image_size"):
    synthetic.render("COVID", 0, 0, 2048)
  with pytest.raises(ValueError, match="index"):
    synthetic.render("COVID", 0, -1, S)


# ------------------------------------------------------------------------------------------------
# Radiograph-like values.


def test_value_range_and_contrast():
  images = np.concatenate([_stack(c, n=4) for c in synthetic.CLASS_COUNTS])
  for image in images:
    lo, hi = np.percentile(image, [1, 99])
    assert hi - lo >= 150, "an image should use a good part of 0..255"
    corners = np.concatenate([image[:3, :3].ravel(), image[:3, -3:].ravel()]).mean()
    mediastinum = image[int(0.35 * S):int(0.5 * S), int(0.47 * S):int(0.53 * S)].mean()
    assert corners < 60 and mediastinum > corners + 100, "air outside the body is dark"
  # Exposure varies between images (the same way in every class).
  means = images.mean(axis=(1, 2))
  assert means.std() > 5.0


def test_normal_lungs_are_darker_than_their_surroundings():
  for image, m in _layers("NORMAL"):
    image = image.astype(np.float64)
    lung = _zone_mean(image, _open_lung(m))
    assert lung < _zone_mean(image, m["solid"] > 0.9) - 50, "lungs vs mediastinum / heart"
    assert lung < _zone_mean(image, (m["below"] > 0.9) & (m["body"] > 0.9)) - 40, "vs abdomen"
    assert lung < _zone_mean(image, (m["body"] > 0.9) & (m["lung"] < 0.05)) - 30, "vs body"
  # Fixed boxes, no masks: the mean image has dark lung fields beside a bright mediastinum.
  mean = _stack("NORMAL").mean(axis=0)
  lungs = np.concatenate([mean[int(0.3 * S):int(0.6 * S), int(0.2 * S):int(0.35 * S)],
                          mean[int(0.3 * S):int(0.6 * S), int(0.65 * S):int(0.8 * S)]])
  assert lungs.mean() < mean[int(0.3 * S):int(0.6 * S), int(0.47 * S):int(0.53 * S)].mean() - 60


# ------------------------------------------------------------------------------------------------
# Class findings where radiology puts them.


def _lower_peripheral(m: dict) -> np.ndarray:
  return _open_lung(m) & (m["t"] > 0.55) & (m["lateral"] > 0.2)


def _upper_central(m: dict) -> np.ndarray:
  return _open_lung(m) & (m["t"] < 0.5) & (m["lateral"] < 0.2)


def test_covid_opacities_are_peripheral_and_lower_zone():
  stats = {}
  for c in ("COVID", "NORMAL"):
    lp, diff = [], []
    for image, m in _layers(c):
      image = image.astype(np.float64)
      lp.append(_zone_mean(image, _lower_peripheral(m)))
      diff.append(lp[-1] - _zone_mean(image, _upper_central(m)))
    stats[c] = np.array(lp), np.array(diff)
  covid, normal = stats["COVID"], stats["NORMAL"]
  assert covid[0].mean() > normal[0].mean() + 25, "lower peripheral zones opacified"
  assert covid[1].mean() > normal[1].mean() + 20, "more so than the upper central lung"
  assert (covid[0] > np.median(normal[0])).mean() >= 0.8, "in most COVID images, not a few"
  # Severity varies: not every COVID image is equally opaque.
  sev = [m["severity"] for _, m in _layers("COVID")]
  assert min(sev) < 0.6 < max(sev)
  # Fixed boxes, no masks: the lower lateral chest is brighter on average.
  boxes = lambda x: np.concatenate([x[:, int(0.55 * S):int(0.7 * S), int(0.12 * S):int(0.28 * S)],
                                    x[:, int(0.55 * S):int(0.7 * S), int(0.72 * S):int(0.88 * S)]],
                                   axis=2).mean()
  assert boxes(_stack("COVID")) > boxes(_stack("NORMAL")) + 20


def test_viral_pneumonia_is_perihilar_and_reticular():
  def high_pass(x):
    neighbours = np.roll(x, 1, 0) + np.roll(x, -1, 0) + np.roll(x, 1, 1) + np.roll(x, -1, 1)
    return np.abs(x - neighbours / 4)
  stats = {}
  for c in ("VIRAL_PNEUMONIA", "NORMAL"):
    ph, diff, texture = [], [], []
    for image, m in _layers(c):
      image = image.astype(np.float64)
      perihilar = _open_lung(m) & (m["hilar"] > 0.4)
      ph.append(_zone_mean(image, perihilar))
      diff.append(ph[-1] - _zone_mean(image, _open_lung(m) & (m["hilar"] < 0.05)))
      texture.append(_zone_mean(high_pass(image), perihilar))
    stats[c] = np.array(ph), np.array(diff), np.array(texture)
  viral, normal = stats["VIRAL_PNEUMONIA"], stats["NORMAL"]
  assert viral[0].mean() > normal[0].mean() + 20, "perihilar opacities"
  assert viral[1].mean() > normal[1].mean() + 15, "more than in the periphery"
  assert viral[2].mean() > normal[2].mean() * 1.15, "with reticular texture"
  # Fixed boxes, no masks: the perihilar regions are brighter on average.
  boxes = lambda x: np.concatenate([x[:, int(0.3 * S):int(0.5 * S), int(0.3 * S):int(0.4 * S)],
                                    x[:, int(0.3 * S):int(0.5 * S), int(0.6 * S):int(0.7 * S)]],
                                   axis=2).mean()
  assert boxes(_stack("VIRAL_PNEUMONIA")) > boxes(_stack("NORMAL")) + 20


def test_findings_are_bilateral():
  for c, zone in (("COVID", _lower_peripheral),
                  ("VIRAL_PNEUMONIA", lambda m: _open_lung(m) & (m["hilar"] > 0.4))):
    for _, m in _layers(c, n=4):
      cols = np.arange(S)[None, :].repeat(S, 0)
      left = zone(m) & (cols >= S // 2)
      right = zone(m) & (cols < S // 2)
      # The disease replaces air (fill) or adds interstitial density in both lungs.
      effect = m["fill"] + m["interstitial"]
      assert effect[left].mean() > 0.05 and effect[right].mean() > 0.05, c


# ------------------------------------------------------------------------------------------------
# The database on disk.


def _tree(root):
  return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(root) for f in files}


def test_generate_database_layout(tmp_path):
  root = synthetic_cache.generate_database(tmp_path / "db", image_size=32, scale=0.01, seed=0)
  assert root == (tmp_path / "db").absolute()
  counts = {"COVID": 2, "NORMAL": 13, "VIRAL_PNEUMONIA": 13}
  assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["COVID", "NORMAL",
                                                                    "Viral Pneumonia"]
  for c, n in counts.items():
    folder = synthetic.FOLDER_NAMES[c]
    names = sorted(p.name for p in (root / folder).iterdir())
    assert names == sorted(f"{folder} ({i}).png" for i in range(1, n + 1))
    with Image.open(root / folder / f"{folder} (2).png") as im:
      assert im.format == "PNG" and im.mode == "L" and im.size == (32, 32)
      np.testing.assert_array_equal(np.asarray(im), synthetic.render(c, 0, 1, 32))
  marker = json.loads((root / synthetic_cache.MARKER).read_text())
  assert marker["counts"] == counts and marker["image_size"] == 32 and marker["seed"] == 0
  # Nothing left behind next to it (temporary folders).
  assert [p.name for p in tmp_path.iterdir()] == ["db"]


def test_generate_database_is_idempotent(tmp_path, monkeypatch):
  root = synthetic_cache.generate_database(tmp_path / "db", image_size=32, scale=0.005)
  before = _tree(root)

  def fail(*args, **kwargs):
    raise AssertionError("re-rendered an existing database")
  monkeypatch.setattr(synthetic, "render", fail)   # what the cached writer renders with
  assert synthetic_cache.generate_database(tmp_path / "db", image_size=32, scale=0.005) == root
  assert _tree(root) == before
  monkeypatch.undo()
  # Other parameters replace it; a deleted image is noticed and regenerated.
  synthetic_cache.generate_database(tmp_path / "db", image_size=32, scale=0.005, seed=1)
  assert json.loads((root / synthetic_cache.MARKER).read_text())["seed"] == 1
  os.remove(root / "NORMAL" / "NORMAL (3).png")
  synthetic_cache.generate_database(tmp_path / "db", image_size=32, scale=0.005, seed=1)
  assert (root / "NORMAL" / "NORMAL (3).png").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]


def test_generate_database_scale_does_not_reshuffle(tmp_path):
  # Every class count differs between the two (1 / 2 COVID): no image may depend on another's.
  small = synthetic_cache.generate_database(tmp_path / "a", image_size=32, scale=0.005)
  large = synthetic_cache.generate_database(tmp_path / "b", image_size=32, scale=0.01)
  assert len(list((large / "COVID").iterdir())) == 2
  for name in ("COVID/COVID (1).png", "NORMAL/NORMAL (4).png",
               "Viral Pneumonia/Viral Pneumonia (4).png"):
    assert (small / name).read_bytes() == (large / name).read_bytes()


def test_generate_database_refuses_foreign_folder(tmp_path):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(DataError, match="mine"):
    synthetic_cache.generate_database(tmp_path / "mine", image_size=32, scale=0.003)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
  (tmp_path / "empty").mkdir()  # an empty folder is fine to fill
  synthetic_cache.generate_database(tmp_path / "empty", image_size=32, scale=0.003)
  assert (tmp_path / "empty" / synthetic_cache.MARKER).exists()


def test_sample_figure_script(tmp_path):
  out = tmp_path / "grid.png"
  result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "synthetic_figure.py"),
                           "--out", str(out), "--per_class", "2", "--size", "64", "--cell", "48"],
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0 and "wrote" in result.stdout, result.stderr
  with Image.open(out) as im:
    assert im.mode == "L" and im.width > 2 * 48 and im.height == 3 * 48 + 2 * 4
