"""Is the classifier reading the lungs: the hidden centre on tiny images (hand-computed
pixel indices, in the training and the inference path), the Grad-CAM share of the centre, the
external test set's loader (its clear errors, skipped files, missing classes, duplicate checks)
and metrics, and the report's numbers and wording. The whole pipeline with an external set runs
in test_experiment.py's smoke test."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import jax
import jax.numpy as jnp

from cxr_jax import configlib
from cxr_jax.data import external as external_lib
from cxr_jax.data.dataset import ImageSet
from cxr_jax.data.images import pixel_hash
from cxr_jax.errors import DataError
from cxr_jax.evaluation import gradcam
from cxr_jax.evaluation import report_classifier
from cxr_jax.models import build
from cxr_jax.pipeline import shortcuts
from cxr_jax.training import augment
from cxr_jax.training import classifier
from cxr_jax.training import export
from cxr_jax.training import mesh as mesh_lib

from conftest import REPO_ROOT


# ------------------------------------------------------------------------------ hidden centre


def test_center_box_and_hide_center_hand_computed():
  assert augment.center_box(10, 0.8) == (1, 9)      # 8 pixels, one spare on each side
  assert augment.center_box(6, 0.5) == (1, 4)       # 3 pixels: rows 1, 2, 3
  assert augment.center_box(8, 0.5) == (2, 6)       # 4 pixels: columns 2..5
  assert augment.center_box(5, 0.5) == (1, 4)       # 2.5 rounds up to 3
  x = jnp.arange(2 * 6 * 8, dtype=jnp.int32).reshape(2, 6, 8, 1) + 1
  hidden = np.asarray(jax.jit(lambda v: augment.hide_center(v, 0.5))(x))
  want = np.asarray(x).copy()
  want[:, 1:4, 2:6, :] = 0
  np.testing.assert_array_equal(hidden, want)
  assert augment.hide_center(x, 0.0) is x           # 0: the images as they are


def _smoke_classifier_config(hide: float):
  config = configlib.load_config_file(REPO_ROOT / "configs/classifier.py", "smoke")
  config.data.hide_center = hide
  config.augment.update(crop_scale=(1.0, 1.0), max_rotate_deg=0.0, max_translate=0.0,
                        brightness=0.0, contrast=0.0)
  return config


def test_training_and_inference_inputs_hide_the_same_box():
  config = _smoke_classifier_config(0.5)
  mesh = mesh_lib.make_mesh()
  trainer = classifier.Classifier(config, class_names=("COVID", "NORMAL"), steps_per_epoch=1,
                                  total_steps=1, mesh=mesh)
  images = jnp.full((4, 32, 32, 1), 255, jnp.uint8)
  train_x = np.asarray(trainer.inputs(images, jax.random.key(0)))
  infer_x = np.asarray(export.network_input(trainer.input_spec, images))
  black, white = (0 - build.SCRATCH_MEAN) / build.SCRATCH_STD, (1 - build.SCRATCH_MEAN) / \
      build.SCRATCH_STD
  for x in (train_x, infer_x):
    np.testing.assert_allclose(x[:, 8:24, 8:24], black, atol=1e-5)      # rows / cols 8..23
    np.testing.assert_allclose(x[:, :8], white, atol=1e-5)
    np.testing.assert_allclose(x[:, :, 24:], white, atol=1e-5)
  # the export remembers the hidden box: a loaded model hides what training hid
  assert build.InputSpec.from_json(trainer.input_spec.to_json()).hide_center == 0.5
  assert build.InputSpec.from_json({"image_size": 32, "in_channels": 1}).hide_center == 0.0
  config.data.hide_center = 1.0
  with pytest.raises(Exception, match="config.data.hide_center"):
    classifier.validate(config)


def test_gradcam_center_share_hand_computed():
  heat = np.zeros((3, 4, 4), np.float32)
  heat[0] = 1.0                       # spread evenly: the box's share of the area, 4 / 16
  heat[1, 1:3, 1:3] = 2.0             # all inside the central 2 x 2
  heat[1, 0, 0] = 4.0                 # ... and 4 outside: 8 / 12
  share = np.asarray(gradcam.center_share(jnp.asarray(heat), 0.5))
  np.testing.assert_allclose(share[:2], [0.25, 8 / 12], rtol=1e-6)
  assert np.isnan(share[2])           # no mass: undefined, not 0


# ------------------------------------------------------------------------------ external set


CLASSES = ("COVID", "NORMAL", "VIRAL_PNEUMONIA")


def _png(path, seed: int, size: int = 32):
  rng = np.random.default_rng(seed)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)


def _data_cfg(tmp_path):
  return configlib.data_config(image_size=32, cache_dir=str(tmp_path / "cache"))


def _reference(images: np.ndarray) -> dict[str, ImageSet]:
  n = len(images)
  return {"train": ImageSet(images=images, labels=np.zeros(n, np.int32),
                            files=tuple(f"ref/{i}.png" for i in range(n)),
                            hashes=tuple(pixel_hash(im[..., 0]) for im in images),
                            class_names=CLASSES),
          "val": ImageSet(images=images[:0], labels=np.zeros(0, np.int32), files=(), hashes=(),
                          class_names=CLASSES)}


def test_external_set_skips_unreadable_names_missing_and_leaves_out_duplicates(tmp_path):
  root = tmp_path / "ext"
  for i in range(3):
    _png(root / "COVID" / f"c{i}.png", i)
    _png(root / "Normal" / f"n{i}.png", 10 + i)
  (root / "Normal" / "broken.png").write_bytes(b"not a png")
  _png(root / "Lung_Opacity" / "o.png", 20)                # a database class the run leaves out
  # The run's own data holds c0 exactly and a brightened copy of n1 (a near duplicate).
  same = np.asarray(Image.open(root / "COVID" / "c0.png"))[None, ..., None]
  near = np.clip(np.asarray(Image.open(root / "Normal" / "n1.png")).astype(int) + 12, 0, 255)
  reference = _reference(np.concatenate([same, near[None, ..., None].astype(np.uint8)]))
  ext = external_lib.load_external(root, _data_cfg(tmp_path), reference)
  s = ext.summary()
  assert s["found"] == {"COVID": 3, "NORMAL": 3, "VIRAL_PNEUMONIA": 0}
  assert s["missing_classes"] == ["VIRAL_PNEUMONIA"]
  assert s["ignored_classes"] == {"LUNG_OPACITY": 1}
  assert s["n_skipped"] == 1 and s["skipped"][0]["file"].endswith("broken.png")
  assert (s["n_exact_duplicates"], s["n_near_duplicates"]) == (1, 1)
  assert {(o["file"], o["kind"]) for o in s["overlap"]} == {("COVID/c0.png", "exact"),
                                                            ("Normal/n1.png", "near")}
  assert ext.images.counts() == {"COVID": 2, "NORMAL": 2, "VIRAL_PNEUMONIA": 0}
  assert "COVID/c0.png" not in ext.images.files and "Normal/n1.png" not in ext.images.files
  # a labels CSV in the project's format reads the same images; its split column is ignored
  csv = tmp_path / "ext.csv"
  csv.write_text("file,label,split\n" + "".join(
      f"{root}/COVID/c{i}.png,COVID,train\n" for i in range(3)))
  ext_csv = external_lib.load_external(csv, _data_cfg(tmp_path), reference)
  assert ext_csv.images.counts()["COVID"] == 2 and ext_csv.summary()["n_exact_duplicates"] == 1


@pytest.mark.parametrize("make, match", [
    (lambda r: _png(r / "Tuberculosis" / "t.png", 1), "TUBERCULOSIS"),
    (lambda r: (r / "COVID").mkdir(parents=True), "no class folder|no image"),
    (lambda r: (r / "COVID").mkdir(parents=True) or (r / "COVID" / "x.png").write_bytes(b"x"),
     "can be read"),
    (lambda r: None, "does not exist"),
])
def test_bad_external_folders_are_refused_naming_the_key(tmp_path, make, match):
  root = tmp_path / "bad"
  make(root)
  with pytest.raises(DataError, match=match) as e:
    external_lib.load_external(root, _data_cfg(tmp_path), _reference(
        np.zeros((1, 32, 32, 1), np.uint8)))
  assert "config.external_test_dir" in str(e.value)


def test_external_metrics_hand_computed():
  labels = np.array([0, 0, 0, 0, 1, 1])
  probs = np.eye(3)[[0, 0, 1, 1, 1, 0]]          # COVID: 2 right, 2 called NORMAL
  m = report_classifier.external_metrics(labels, probs, CLASSES)
  assert m["accuracy"]["k"] == 3 and m["accuracy"]["value"] == 0.5
  assert m["per_class"]["COVID"]["recall"]["value"] == 0.5
  assert m["per_class"]["NORMAL"]["recall"]["value"] == 0.5
  assert m["per_class"]["VIRAL_PNEUMONIA"]["recall"]["value"] is None
  assert m["called"]["NORMAL"] == {"COVID": 0.5, "NORMAL": 0.5, "VIRAL_PNEUMONIA": 0.0}
  assert "VIRAL_PNEUMONIA" not in m["called"]
  lo, hi = m["accuracy"]["ci"]
  assert 0.11 < lo < 0.12 and 0.88 < hi < 0.89    # Clopper-Pearson 3 / 6


# ------------------------------------------------------------------------------ report numbers


def _table(original: float, hidden: float, half_width: float = 0.05) -> dict:
  entry = lambda a: {"accuracy": {"mean": a}, "per_seed": [{"accuracy": {  # noqa: E731
      "value": a, "ci": [a - half_width, a + half_width]}}]}
  return {"original/scratch": entry(original), "lungs-hidden/scratch": entry(hidden),
          "original/transfer": {"skipped": "no weights"}}


def test_lungs_hidden_reading_and_wording():
  counts = {"test": {"COVID": 20, "NORMAL": 50, "VIRAL_PNEUMONIA": 30}}    # chance 50 %
  far = shortcuts.lungs_hidden(_table(0.90, 0.80), counts, 0.8)
  v = far["by_init"]["scratch"]
  assert far["chance"] == 0.5 and far["majority_class"] == "NORMAL"
  assert v["points_above_chance"] == pytest.approx(40.0)
  assert v["points_without_lungs"] == pytest.approx(30.0) and v["far_above_chance"]
  words = shortcuts.reading(far, None)
  assert words["measures_more_than_lungs"] is True
  assert "30.0 of the 40.0 points" in words["lines"][0]
  assert "measures more than lung findings" in words["lines"][0]
  # 30 points above chance on so few test images that the exact interval reaches chance: not far
  few = shortcuts.lungs_hidden(_table(0.90, 0.80, half_width=0.35), counts, 0.8)
  assert not few["by_init"]["scratch"]["far_above_chance"]
  near = shortcuts.lungs_hidden(_table(0.90, 0.52), counts, 0.8)
  assert near["by_init"]["scratch"]["points_without_lungs"] == pytest.approx(2.0)
  assert shortcuts.reading(near, None)["measures_more_than_lungs"] is False
  at_chance = shortcuts.lungs_hidden(_table(0.55, 0.50), counts, 0.8)
  assert shortcuts.reading(at_chance, None)["measures_more_than_lungs"] is None
  assert "Not measurable" in shortcuts.reading(at_chance, None)["lines"][0]
  # an external set far below the in-distribution accuracy says so too
  ext = {"set": {}, "rows": {"original/scratch": {
      "external_accuracy": {"mean": 0.55}, "in_distribution_accuracy": 0.9, "far_below": True}}}
  assert "measures more than lung findings" in shortcuts.reading(near, ext)["lines"][0]
  assert shortcuts.lungs_hidden({"original/scratch": {}}, counts, 0.8) is None


def test_gradcam_center_share_of_a_network_equals_gradcam_per_image():
  """The batched, compiled share over a data set equals Grad-CAM image by image (a network whose
  last feature map is too small to localise is not measured: test_experiment.py's smoke run)."""
  config = _smoke_classifier_config(0.0)
  config.data.image_size = config.image_size = 96              # a 3 x 3 last feature map
  trainer = classifier.Classifier(config, class_names=("COVID", "NORMAL"), steps_per_epoch=1,
                                  total_steps=1, mesh=mesh_lib.make_mesh())
  trained = trainer.exported.with_weights(*trainer._init)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 96, 96, 1), dtype=np.uint8)
  cls = np.array([0, 1, 1, 0, 1], np.int32)
  got = report_classifier.gradcam_center_share(trained, images, cls, 0.5, batch_size=4)
  features_fn, head_fn = trained.feature_and_head_fns()
  heat = gradcam.gradcam(features_fn, head_fn, trained.network_input(jnp.asarray(images)),
                         jnp.asarray(cls))
  want = np.asarray(gradcam.center_share(heat, 0.5))
  assert got["feature_map"] == [3, 3] and got["uniform"] == 0.25
  assert got["n"] + got["n_flat"] == 5 and got["n"] == np.isfinite(want).sum() > 0
  np.testing.assert_allclose(got["mean"], np.nanmean(want), rtol=1e-5)
