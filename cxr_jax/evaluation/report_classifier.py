"""A trained classifier on the real test split: the numbers, the plots and where it looks."""

from __future__ import annotations

import csv
import json
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
from cxr_jax.evaluation import stats
from cxr_jax.models import build
from cxr_jax.training import augment
from cxr_jax.training import export
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


def _center_shares(net, spec: build.InputSpec, fraction: float, params, stats, images_u8, cls):
  """Each image's Grad-CAM share (class `cls`) inside the central `fraction` box."""
  features_fn = lambda x: net.apply(params, stats, x, train=False,  # noqa: E731
                                    method="features")[0]
  head_fn = lambda f: net.apply(params, stats, f, method="head")[0]  # noqa: E731
  heat = gradcam_lib.gradcam(features_fn, head_fn, export.network_input(spec, images_u8), cls)
  return gradcam_lib.center_share(heat, fraction)


# The smallest last feature map (cells a side) whose Grad-CAM can say where in the image it looked.
MIN_CAM_SIDE = 3


def gradcam_center_share(trained, images_u8: np.ndarray, class_index: np.ndarray,
                         fraction: float, batch_size: int = 64) -> dict:
  """Mean share of the Grad-CAM mass of `class_index` (e.g. the predicted class) inside the
  central `fraction` box of the network input, over `images_u8`: does the classifier look where
  the lungs are? Maps without mass (zero gradient) are left out and counted. Not measured
  (`mean` None, with a `note`) when the last feature map is under MIN_CAM_SIDE cells a side: a
  bilinearly upsampled 2 x 2 map puts exactly the box's share of the area in any centred box,
  whatever the network looked at."""
  size = trained.input_spec.image_size
  start, stop = augment.center_box(size, fraction)
  features_fn, _ = trained.feature_and_head_fns()
  fmap = jax.eval_shape(lambda x: features_fn(trained.network_input(x)),
                        jax.ShapeDtypeStruct((1, *images_u8.shape[1:]), jnp.uint8)).shape
  out = {"fraction": float(fraction), "feature_map": [int(fmap[1]), int(fmap[2])],
         # the share of a heatmap spread evenly: the box's share of the area
         "uniform": ((stop - start) / size) ** 2}
  if min(fmap[1:3]) < MIN_CAM_SIDE:
    return dict(out, mean=None, n=0, n_flat=0, note=(
        f"not measured: the last feature map is {fmap[1]} x {fmap[2]} cells (a larger "
        f"classifier.image_size gives {MIN_CAM_SIDE} x {MIN_CAM_SIDE} or more)"))

  values = trained.map(_center_shares, images_u8, np.asarray(class_index, np.int32),
                       batch_size=batch_size, static=(trained.input_spec, float(fraction)))
  ok = np.isfinite(values)
  return dict(out, mean=float(values[ok].mean()) if ok.any() else None, n=int(ok.sum()),
              n_flat=int((~ok).sum()))


def evaluate_on_test(trained, test, workdir: pathlib.Path, *, title: str, num_gradcam: int = 4,
                     n_bootstrap: int = 1000, train_hashes: Iterable[str] = (),
                     subgroups: Sequence[str] = (), saliency_center: float = 0.0) -> dict:
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
  if saliency_center > 0:
    report["gradcam_center_share"] = gradcam_center_share(
        trained, test.images, probs.argmax(-1), saliency_center)
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


def external_metrics(labels: np.ndarray, probs: np.ndarray, class_names) -> dict:
  """Accuracy and per-class recall (exact Clopper-Pearson intervals) on an external set, and how
  the images of each class were called (`called[true][predicted]`, shares); a class without
  external images has recall None and no `called` entry."""
  labels, pred = np.asarray(labels), np.asarray(probs).argmax(-1)
  k = len(class_names)
  cm = np.zeros((k, k), np.int64)
  np.add.at(cm, (labels, pred), 1)
  n, right = int(cm.sum()), int(np.trace(cm))
  out = {"n": n, "accuracy": {"value": right / n if n else None, "k": right, "n": n,
                              "ci": list(stats.clopper_pearson_interval(right, n)),
                              "ci_method": metrics_lib.CLOPPER_PEARSON},
         "per_class": {}, "called": {}, "confusion_matrix": cm.tolist()}
  for i, c in enumerate(class_names):
    n_c = int(cm[i].sum())
    out["per_class"][c] = {"n": n_c, "recall": {
        "value": cm[i, i] / n_c if n_c else None, "k": int(cm[i, i]), "n": n_c,
        "ci": list(stats.clopper_pearson_interval(int(cm[i, i]), n_c)) if n_c else None,
        "ci_method": metrics_lib.CLOPPER_PEARSON}}
    if n_c:
      out["called"][c] = {p: float(cm[i, j] / n_c) for j, p in enumerate(class_names)}
  return out


def evaluate_external(trained, external, workdir: pathlib.Path, *, batch_size: int = 64) -> dict:
  """The external test set through `trained` (its hidden centre included): writes
  external_predictions.csv and external_metrics.json into `workdir`; returns the metrics."""
  class_names = list(trained.meta["class_names"])
  if tuple(class_names) != tuple(external.class_names):
    raise DataError(f"the classifier's classes {class_names} are not the external set's "
                    f"{list(external.class_names)}")
  probs = trained.predict(external.images, batch_size)
  result = external_metrics(external.labels, probs, class_names)
  workdir = pathlib.Path(workdir)
  if workdir_lib.is_writer():
    write_predictions(workdir / "external_predictions.csv", external.files, external.labels,
                      probs, class_names)
    files_lib.write_text_atomic(workdir / "external_metrics.json",
                                json.dumps(result, indent=2, allow_nan=False) + "\n")
  logging.info("External test set: accuracy %.4f on %d images", result["accuracy"]["value"],
               result["n"])
  return result
