"""The `classifier` task: train a classifier, then evaluate its best checkpoint on the test split.

Training (`cxr_jax.training.classifier`) knows nothing of the test split; this task layer joins
training and evaluation, so imports run one way (training <- evaluation <- pipeline).
"""

from __future__ import annotations

import pathlib

import ml_collections

from cxr_jax.data import dataset
from cxr_jax.evaluation import plots
from cxr_jax.evaluation import report_classifier
from cxr_jax.training import classifier
from cxr_jax.training import fit
from cxr_jax.training.summary import SummaryWriter


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """Trains, keeps the best checkpoint by validation macro-F1, evaluates it on the test split
  (metrics, plots, Grad-CAM, per-image predictions in `workdir`); returns the test report."""
  classifier.validate(config)
  workdir = pathlib.Path(workdir)
  mesh = fit.make_mesh(config, "batch_size", "eval_batch_size")
  splits = dataset.load_splits(config.data, workdir)
  train = classifier.training_set(config, splits)
  trained = classifier.train(config, workdir, train, splits["val"], mesh)
  result = report_classifier.evaluate_on_test(
      trained, splits["test"], workdir, title=config.name, num_gradcam=config.num_gradcam,
      n_bootstrap=config.n_bootstrap, train_hashes=train.hashes)
  writer = SummaryWriter(workdir / "tensorboard")
  try:
    writer.scalars(trained.meta["final_step"],
                   {f"test/{k}": v for k, v in result["summary"].items()})
  finally:
    writer.close()
  plots.write_training_curves(workdir)
  return result
