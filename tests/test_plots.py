"""Precision-recall curves (`evaluation/plots.pr_curves_png`) on constructed cases."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from cxr_jax.evaluation import plots

CLASSES = ("COVID", "NORMAL", "VIRAL_PNEUMONIA")


def test_perfect_classifier_has_ap_one(tmp_path):
  labels = np.array([0, 0, 1, 1, 1, 2, 2, 0])
  probs = np.full((len(labels), 3), 0.1)
  probs[np.arange(len(labels)), labels] = 0.8  # the true class always scores highest
  aps = plots.pr_curves_png(tmp_path / "pr.png", labels, probs, CLASSES)
  assert aps == {"COVID": 1.0, "NORMAL": 1.0, "VIRAL_PNEUMONIA": 1.0}
  with Image.open(tmp_path / "pr.png") as im:
    assert im.size[0] > 300 and im.size[1] > 300


def test_ap_agrees_with_sklearn_and_hand_computation(tmp_path):
  # COVID scores, ranked: +, -, +, -, - (labels 0 = COVID): precision 1, 1/2, 2/3, ...; recall
  # steps at ranks 1 and 3, so AP = 0.5 * 1 + 0.5 * 2/3 = 5/6.
  labels = np.array([0, 1, 0, 2, 1])
  covid = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
  probs = np.stack([covid, (1 - covid) / 2, (1 - covid) / 2], axis=1)
  aps = plots.pr_curves_png(tmp_path / "pr.png", labels, probs, CLASSES, title="t")
  assert aps["COVID"] == pytest.approx(5 / 6)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 200)
  probs = rng.dirichlet(np.ones(3), 200) + 0.3 * np.eye(3)[labels]
  probs[:50] = np.round(probs[:50], 1)  # ties: the curve's steps must still match sklearn's
  aps = plots.pr_curves_png(tmp_path / "pr2.png", labels, probs, CLASSES)
  for c, name in enumerate(CLASSES):
    want = skm.average_precision_score(labels == c, probs[:, c])
    assert aps[name] == pytest.approx(want, abs=1e-12)
    assert 0.3 < aps[name] < 1.0


def test_a_class_absent_from_the_labels_has_no_ap(tmp_path):
  labels = np.array([0, 1, 0, 1])
  probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1], [0.5, 0.4, 0.1]])
  aps = plots.pr_curves_png(tmp_path / "pr.png", labels, probs, CLASSES)
  assert aps["VIRAL_PNEUMONIA"] is None and aps["COVID"] == pytest.approx(
      skm.average_precision_score(labels == 0, probs[:, 0]))
  with pytest.raises(ValueError, match="probs"):
    plots.pr_curves_png(tmp_path / "x.png", labels, probs[:, :2], CLASSES)
