"""The `classifier` task: train a classifier, then evaluate its best checkpoint on the test split.

Training (`cxr_jax.training.classifier`) knows nothing of the test split; this task layer joins
training and evaluation, so imports run one way (training <- evaluation <- pipeline).
"""

from __future__ import annotations

import json
import pathlib

import ml_collections
from absl import logging

from cxr_jax import console
from cxr_jax import workdir as workdir_lib
from cxr_jax.data import dataset
from cxr_jax.data import enhanced
from cxr_jax.data import external as external_lib
from cxr_jax.evaluation import plots
from cxr_jax.evaluation import report_classifier
from cxr_jax.evaluation import subgroups as subgroups_lib
from cxr_jax.training import classifier
from cxr_jax.training import fit
from cxr_jax.training import seeds as seeds_lib
from cxr_jax.training.summary import SummaryWriter
from cxr_jax.utils import files

EXTERNAL_SET = "external_set.json"   # what the external test set held, left out and skipped


def training_set(config: ml_collections.ConfigDict,
                 splits: dict[str, dataset.ImageSet]) -> dataset.ImageSet:
  """The real training split, plus the synthetic images for `enhanced` (leakage-checked)."""
  train = splits["train"]
  if config.train_data == "enhanced":
    synthetic = enhanced.load_synthetic_set(config.synthetic_dir, splits,
                                            image_size=config.data.image_size)
    logging.info("Enhanced training set: %d real + %d synthetic images (%s)", len(train),
                 len(synthetic), config.synthetic_dir)
    train = enhanced.concatenate(train, synthetic)
  return train


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """Trains, keeps the best checkpoint by validation macro-F1, evaluates it on the test split
  (metrics, plots, Grad-CAM, per-image predictions in `workdir`); returns the test report."""
  classifier.validate(config)
  workdir = pathlib.Path(workdir)
  mesh = fit.make_mesh(config, "batch_size", "eval_batch_size")
  splits = dataset.load_splits(config.data, workdir)
  subgroups_lib.check(config.get("subgroups", ()), splits["test"].metadata)
  train = training_set(config, splits)
  external = load_external(config, splits, workdir)
  trained = classifier.train(config, workdir, train, splits["val"], mesh)
  return _evaluate(config, workdir, trained, splits["test"], train_hashes=train.hashes,
                   external=external)


def load_external(config: ml_collections.ConfigDict, splits: dict[str, dataset.ImageSet],
                  workdir: pathlib.Path | None = None) -> external_lib.ExternalSet | None:
  """The external test set of `config.external_test_dir` (None when empty), without the images
  that are also in `splits`; its summary (counts, overlap, skipped files) in
  `<workdir>/external_set.json`."""
  if not config.get("external_test_dir", ""):
    return None
  external = external_lib.load_external(config.external_test_dir, config.data, splits)
  if workdir is not None and workdir_lib.is_writer():
    files.write_text_atomic(pathlib.Path(workdir) / EXTERNAL_SET,
                            json.dumps(external.summary(), indent=2))
  return external


def _evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path, trained, test, *,
              train_hashes, external: external_lib.ExternalSet | None = None) -> dict:
  """The test report of `trained` in `workdir` (and the external set's, when given), its test
  scalars in TensorBoard and the run's training-curves picture."""
  result = report_classifier.evaluate_on_test(
      trained, test, workdir, title=config.name, num_gradcam=config.num_gradcam,
      n_bootstrap=config.n_bootstrap, train_hashes=train_hashes,
      subgroups=subgroups_lib.check(config.get("subgroups", ()), test.metadata),
      saliency_center=float(config.get("saliency_center", 0.0)))
  if external is not None:
    result["external"] = report_classifier.evaluate_external(
        trained, external.images, workdir, batch_size=config.eval_batch_size)
  writer = SummaryWriter(workdir / "tensorboard")
  try:
    writer.scalars(trained.meta["final_step"],
                   {f"test/{k}": v for k, v in result["summary"].items()})
  finally:
    writer.close()
  plots.write_training_curves(workdir)
  return result


def train_and_evaluate_seeds(config: ml_collections.ConfigDict, seeds, workdirs, *,
                             splits: dict[str, dataset.ImageSet],
                             train_set: dataset.ImageSet,
                             external: external_lib.ExternalSet | None = None) -> list[dict]:
  """One row of the experiment: `config` trained once per seed (seed k in `workdirs[k]`, named
  `<config.name>-seed<k>`), in one compiled program when `config.seeds_in_one_program` says so
  (`training/seeds.py`), else one run after another; then each seed's best export is
  evaluated on `splits['test']` (and `external`) as `train_and_evaluate` does (the same files in
  each workdir).
  Returns the test reports, in the order of `seeds`."""
  classifier.validate(config)
  subgroups_lib.check(config.get("subgroups", ()), splits["test"].metadata)
  seeds, workdirs = list(seeds), [pathlib.Path(w) for w in workdirs]
  mesh = fit.make_mesh(config, "batch_size", "eval_batch_size")
  configs = [fit.seed_config(config, s) for s in seeds]
  for cfg, seed in zip(configs, seeds):
    cfg.name = f"{config.name}-seed{seed}"
  trained = seeds_lib.train_seeds(config, seeds, workdirs, train_set, splits["val"], mesh)
  results = []
  for cfg, workdir, model in zip(configs, workdirs, trained):
    logging.info("Evaluating %s on the test split", cfg.name, extra=console.FILE_ONLY)
    results.append(_evaluate(cfg, workdir, model, splits["test"], train_hashes=train_set.hashes,
                             external=external))
  return results
