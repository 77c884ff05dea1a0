"""Synthesis with any translator on a user's own class names, and the quality figures it writes
(input dependence, diversity, KID against seen and unseen real target images, the share a
classifier calls the target class)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from cxr_jax import configlib
from cxr_jax import workdir as workdir_lib
from cxr_jax.data import dataset
from cxr_jax.errors import ConfigError
from cxr_jax.evaluation import quality
from cxr_jax.pipeline import synthesize
from cxr_jax.pipeline import translators
from cxr_jax.training import classifier
from cxr_jax.training import export
from cxr_jax.training import mesh as mesh_lib

from conftest import REPO_ROOT

S = 32


def _image(seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  low = np.kron(rng.normal(size=(4, 4)), np.ones((S // 4, S // 4)))
  return np.clip(128 + 50 * low + 6 * rng.normal(size=(S, S)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
  """pix2pix (the cheaper translator to compile) trained a few steps on Healthy/ and
  Tuberculosis/ folders, with the classes spelt as a user might: 'healthy' -> 'TuberCulosis'."""
  root = tmp_path_factory.mktemp("own")
  data = root / "mydata"
  for k, folder in enumerate(("Tuberculosis", "Healthy")):
    (data / folder).mkdir(parents=True)
    for i in range(16):
      Image.fromarray(_image(100 * k + i)).save(data / folder / f"{folder.lower()}-{i}.png")
  config = configlib.load_config_file(REPO_ROOT / "configs/pix2pix.py", "smoke")
  config.data.data_dir = str(data)
  config.data.cache_dir = str(root / "cache")
  config.data.classes = ("Tuberculosis", "Healthy")
  config.data.split_fractions = (0.5, 0.25, 0.25)
  config.source_class, config.target_class = "healthy", "TuberCulosis"
  config.num_epochs, config.decay_epochs = 1, 0
  run = workdir_lib.prepare(root / "pix2pix", config)
  gen = translators.train_translator("pix2pix", config, run)
  splits = dataset.load_splits(config.data, root / "syn")
  return root, config, run, gen, splits


def test_translator_and_synthesis_on_own_class_names(own_run):
  root, config, run, gen, splits = own_run
  assert (run / "training_curves.png").exists()
  assert (gen.meta["source_class"], gen.meta["target_class"]) == ("HEALTHY", "TUBERCULOSIS")
  out = root / "syn" / synthesize.SYNTHETIC_DIR
  summary = synthesize.synthesize(run / "generator", splits, out, num_synthetic="3", seed=0,
                                  batch_size=4, source_class="Healthy",
                                  target_class="tuberculosis")
  assert (summary["source_class"], summary["target_class"]) == ("HEALTHY", "TUBERCULOSIS")
  assert len(list((out / "TUBERCULOSIS").glob("*.png"))) == 3
  with open(out / "manifest.csv", newline="") as f:
    assert {r["class"] for r in csv.DictReader(f)} == {"TUBERCULOSIS"}
  figures = json.loads((out / synthesize.QUALITY_FILE).read_text())
  n_healthy = len(splits["train"].of_class("HEALTHY"))
  assert figures["n_translated"] == n_healthy and figures["translator"] == "pix2pix"
  assert figures["real_target"]["train"] == {
      "n": len(splits["train"].of_class("TUBERCULOSIS")), "seen_by_generator": True}
  assert "kid" not in figures and "no quality classifier" in figures["note"]
  assert (out / synthesize.GRID_FILE).exists()
  # 'balance' with equal classes makes no image, and the translation is still measured.
  summary = synthesize.synthesize(run / "generator", splits, root / "bal", num_synthetic="balance",
                                  seed=0, batch_size=4, source_class="HEALTHY",
                                  target_class="Tuberculosis")
  assert summary["num_synthetic"] == 0
  assert summary["quality"]["n_translated"] == n_healthy
  with pytest.raises(ConfigError, match="config.source_class"):
    synthesize.synthesize(run / "generator", splits, root / "bad", num_synthetic="1", seed=0,
                          batch_size=4, source_class="NORMAL", target_class="Tuberculosis")


def test_quality_with_a_classifier_kid_on_seen_and_unseen_images(own_run, monkeypatch):
  """A classifier export (the classifier trainer's, untrained): KID against the training target
  images (seen by the generator) and the validation ones (unseen), the target share as the
  classifier's own argmax on the translated images, by one implementation for the synthesis and
  for an existing synthetic folder."""
  root, config, run, gen, splits = own_run
  c_cfg = configlib.load_config_file(REPO_ROOT / "configs/classifier.py", "smoke")
  names = splits["train"].class_names
  mesh = mesh_lib.make_mesh(1)
  trainer = classifier.Classifier(c_cfg, class_names=names, steps_per_epoch=1, total_steps=1,
                                  mesh=mesh)
  trainer.export(root / "clf", trainer.init_state(), 0)
  clf_dir = root / "clf" / classifier.CLASSIFIER_DIR
  monkeypatch.setattr(synthesize, "MIN_KID_IMAGES", 2)
  out = root / "q" / synthesize.SYNTHETIC_DIR
  summary = synthesize.synthesize(run / "generator", splits, out, num_synthetic="5", seed=1,
                                  batch_size=4, source_class="healthy",
                                  target_class="tuberculosis", quality_classifier_dir=clf_dir,
                                  quality_images=4)
  q = summary["quality"]
  sources = splits["train"].of_class("HEALTHY").images
  picked = sources[synthesize.quality_sources(sources, 1, 4)]
  translated = gen.translate(picked, seed=1, batch_size=4)
  clf = export.load_classifier(clf_dir)
  share = np.mean(clf.predict(translated).argmax(-1) == names.index("TUBERCULOSIS"))
  assert q["n_translated"] == 4
  assert q["target_share"] == pytest.approx(share) == q["share_called_TUBERCULOSIS"]
  assert q["input_dependence"] == pytest.approx(quality.input_dependence(picked, translated, 1))
  real_val = splits["val"].of_class("TUBERCULOSIS").images
  assert q["kid_train"]["seen_by_generator"] and not q["kid_val"]["seen_by_generator"]
  assert q["kid_val"]["n_real"] == len(real_val) >= 2 and "mean" in q["kid_val"]
  assert q["kid_train"]["mean"] == q["kid"]
  # The same figures of the written synthetic folder (the experiment's path).
  again = synthesize.synthesis_quality(out, clf_dir, splits, target_class="Tuberculosis", seed=1)
  assert again["n_translated"] == 5 and "kid_val" in again
  assert json.loads((out / synthesize.QUALITY_FILE).read_text())["n_translated"] == 5
