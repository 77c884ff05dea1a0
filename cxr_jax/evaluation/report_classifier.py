"""A trained classifier on the real test split: the numbers, the plots and where it looks."""

from __future__ import annotations

import csv
import pathlib
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cxr_jax import workdir as workdir_lib
from cxr_jax.errors import DataError
from cxr_jax.evaluation import gradcam as gradcam_lib
from cxr_jax.evaluation import metrics as metrics_lib
from cxr_jax.evaluation import plots
from cxr_jax.evaluation import subgroups as subgroups_lib
from cxr_jax.utils import files as files_lib


def refuse_leaks(test, train_hashes: Iterable[str]) -> None:
  """A test image that is also a training (or synthetic) image would inflate every number."""
  leaked = sorted(set(test.hashes) & set(train_hashes))
  if leaked:
    files = [f for f, h in zip(test.files, test.hashes) if h in set(leaked)]
    raise DataError(f"{len(files)} test image(s) also appear in the training data, e.g. "
                    f"{files[:3]}; refusing to evaluate on a leaked test set")


def write_predictions(path: pathlib.Path, files, labels, probs, class_names) -> None:
  """Per-image class probabilities as CSV (the experiment's paired tests read these)."""
  if not workdir_lib.is_writer():
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  files_lib.write_csv_atomic(
      path, ["file", "label", "predicted"] + [f"p_{c}" for c in class_names],
      ([file, "" if labels is None else class_names[int(labels[i])],
        class_names[int(np.argmax(p))]] + [f"{v:.6f}" for v in p]
       for i, (file, p) in enumerate(zip(files, probs))))


def read_predictions(path: pathlib.Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
  """(files, label indices, probabilities [N, K], class names) from a test_predictions.csv."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    names = [c[len("p_"):] for c in reader.fieldnames or [] if c.startswith("p_")]
    rows = list(reader)
  index = {name: i for i, name in enumerate(names)}
  labels = np.array([index[r["label"]] for r in rows], np.int64)
  probs = np.array([[float(r[f"p_{c}"]) for c in names] for r in rows], np.float64).reshape(
      len(rows), len(names))
  return [r["file"] for r in rows], labels, probs, names


def read_correct(path: pathlib.Path) -> tuple[list[str], np.ndarray]:
  """(files, whether each prediction was right) from a test_predictions.csv."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  return [r["file"] for r in rows], np.array([r["label"] == r["predicted"] for r in rows])


def gradcam_figure(trained, images_u8: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                   class_names, path: pathlib.Path, per_class: int) -> None:
  """Grad-CAM of the predicted class over the first `per_class` test images of each class.
  Every process computes (the networks are global arrays); process 0 writes."""
  picks = np.concatenate([np.flatnonzero(labels == c)[:per_class]
                          for c in range(len(class_names))]).astype(int)
  if picks.size == 0:
    return
  images = images_u8[picks]
  x = trained.network_input(jnp.asarray(images))
  features_fn, head_fn = trained.feature_and_head_fns()
  probs = probs[picks]
  pred = probs.argmax(-1)
  heat = np.asarray(gradcam_lib.gradcam(features_fn, head_fn, x, jnp.asarray(pred)))
  size = images.shape[1]
  if heat.shape[1] != size:  # the network may see a smaller view than the stored image
    heat = np.asarray(jax.image.resize(jnp.asarray(heat), (len(heat), size, size), "linear"))
  titles = [f"{class_names[labels[i]]} -> {class_names[p]} ({probs[j, p]:.2f})"
            for j, (i, p) in enumerate(zip(picks, pred))]
  if workdir_lib.is_writer():
    gradcam_lib.overlay_png(path, images, heat, titles, cols=max(1, per_class))


def evaluate_on_test(trained, test, workdir: pathlib.Path, *, title: str, num_gradcam: int = 4,
                     n_bootstrap: int = 1000, train_hashes: Iterable[str] = (),
                     subgroups: Sequence[str] = ()) -> dict:
  """Writes metrics.json / metrics.md, confusion_matrix.png, roc_curves.png, pr_curves.png,
  gradcam.png and test_predictions.csv into `workdir`; returns the report with a flat `summary`.
  `subgroups`: metadata columns (config.subgroups) whose subgroups get their own accuracy and
  recall (`report['subgroups']`, a section of metrics.md)."""
  refuse_leaks(test, train_hashes)
  class_names = list(trained.meta["class_names"])
  probs = trained.predict(test.images)
  report = metrics_lib.classification_report(test.labels, probs, class_names,
                                             n_bootstrap=n_bootstrap)
  if subgroups:
    report["subgroups"] = subgroups_lib.subgroup_table(
        test.files, test.labels, probs.argmax(-1), class_names, test.metadata, subgroups,
        confidence=report["confidence"])
  workdir = pathlib.Path(workdir)
  if workdir_lib.is_writer():
    metrics_lib.write_metrics(workdir, report, title=title)
    plots.confusion_matrix_png(workdir / "confusion_matrix.png",
                               np.asarray(report["confusion_matrix"]), class_names, title=title)
    plots.roc_curves_png(workdir / "roc_curves.png", test.labels, probs, class_names, title=title)
    plots.pr_curves_png(workdir / "pr_curves.png", test.labels, probs, class_names, title=title)
    write_predictions(workdir / "test_predictions.csv", test.files, test.labels, probs,
                      class_names)
  if num_gradcam > 0:
    gradcam_figure(trained, test.images, test.labels, probs, class_names,
                   workdir / "gradcam.png", num_gradcam)
  summary = {"accuracy": report["accuracy"]["value"], "macro_f1": report["macro_f1"]["value"],
             "macro_roc_auc": report["macro_roc_auc"]["value"]}
  logging.info("Test: accuracy %.4f, macro-F1 %.4f, macro ROC-AUC %s", summary["accuracy"],
               summary["macro_f1"], summary["macro_roc_auc"])
  return dict(report, summary=summary, probs=probs.tolist())
