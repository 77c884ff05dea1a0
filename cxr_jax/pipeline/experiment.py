"""The paper's experiment in one command, with the controls that say what a gain is due to.

split -> each translator (pix2pix, CycleGAN) -> synthesis -> ResNet-50 classifiers for every row x
{scratch, transfer} x seeds, each evaluated on the same test split -> report. Rows:

- `original`: the training split as it is;
- `balanced-loss`: the same data, class-weighted loss: changes only the class prior;
- `oversampled`: the target class topped up with classical augmented copies of its own training
  images, as many as the synthetic images: the prior and the count, without a GAN;
- `enhanced-<translator>`: the training split plus that translator's synthetic images;
- `lungs-hidden`: the original row's data and recipe with the central
  `config.lungs_hidden` of every image blacked out (`config.data.hide_center`), training and test:
  what the classifier scores without lung pixels (docs/shortcuts.md).

All of it runs once per split (`config.splits` stratified splits, seeds `data.split_seed + k`;
with one split in the workdir itself, else in `<workdir>/split<k>/`), every classifier of one
initialisation for the same number of optimizer steps (the original training split's budget).

Each stage runs in its own sub-workdir and records its completion in `<workdir>/stages/`; running
the same command again skips finished stages and resumes an interrupted one from its last
checkpoint, so a preempted job loses at most one checkpoint interval.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Callable

import ml_collections
from absl import logging

from cxr_jax import configlib
from cxr_jax import workdir as workdir_lib
from cxr_jax.data import dataset
from cxr_jax.data import enhanced
from cxr_jax.data.dataset import ImageSet
from cxr_jax.errors import ConfigError
from cxr_jax.pipeline import controls
from cxr_jax.pipeline import report
from cxr_jax.pipeline import results
from cxr_jax.pipeline import shortcuts
from cxr_jax.pipeline import classify
from cxr_jax.pipeline import synthesize
from cxr_jax.pipeline import translators
from cxr_jax.training import classifier
from cxr_jax.training import fit
from cxr_jax.training import translator
from cxr_jax.utils import files

CONTROL_ROWS = ("original", "balanced-loss", "oversampled")
LUNGS_HIDDEN = shortcuts.LUNGS_HIDDEN
# Rows trained on the training split as it is: one training set for all seeds.
SPLIT_ROWS = ("original", "balanced-loss", LUNGS_HIDDEN)
INITS = ("scratch", "transfer")


class Stages:
  """Completion records: `<workdir>/stages/<name>.json` holds the stage's summary and duration."""

  def __init__(self, workdir: pathlib.Path):
    self.dir = pathlib.Path(workdir) / "stages"
    self.dir.mkdir(parents=True, exist_ok=True)

  def record(self, name: str) -> dict | None:
    path = self.dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None

  def run(self, name: str, fn: Callable[[], Any]) -> dict:
    done = self.record(name)
    if done is not None:
      logging.info("Stage %s: already done (%.0f s), skipped", name, done["seconds"])
      return done
    # Each stage's own work logs its first line; the console keeps one line per stage (done).
    logging.debug("Stage %s: starting", name)
    t0 = time.perf_counter()
    result = fn()
    record = {"stage": name, "seconds": time.perf_counter() - t0, "result": result}
    if workdir_lib.is_writer():
      files.write_text_atomic(self.dir / f"{name}.json",
                              json.dumps(record, indent=2, default=str))
    logging.info("Stage %s: done in %.0f s", name, record["seconds"])
    return record

  def seconds(self) -> dict[str, float]:
    """Each finished stage's duration, in the order the stages finished."""
    paths = sorted(self.dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
    return {p.stem: json.loads(p.read_text())["seconds"] for p in paths}


def sub_config(config: ml_collections.ConfigDict, key: str,
               **overrides) -> ml_collections.ConfigDict:
  """A stage's own config: the experiment's `config.<key>` block with the shared data block."""
  sub = ml_collections.ConfigDict(config[key].to_dict())
  sub.data = ml_collections.ConfigDict(config.data.to_dict())
  sub.multihost = config.multihost
  sub.update(overrides)
  return sub


def rows(config: ml_collections.ConfigDict) -> list[str]:
  """The training-data rows of the results table, controls first (`lungs-hidden` when
  `config.lungs_hidden` > 0)."""
  hidden = [LUNGS_HIDDEN] if config.get("lungs_hidden", 0.0) else []
  return [*CONTROL_ROWS, *hidden, *(f"enhanced-{t}" for t in config.translators)]


def seed_groups(config: ml_collections.ConfigDict, row: str) -> list[tuple[int, ...]]:
  """Seeds that share one training set: all of them, or each alone when the row's training set
  is re-made per seed (`translator_per_seed`: the GAN rows and the oversampled row's copies)."""
  if config.translator_per_seed and row not in SPLIT_ROWS:
    return [(int(s),) for s in config.seeds]
  return [tuple(int(s) for s in config.seeds)]


def translator_tag(name: str, seed: int | None) -> str:
  """Folder / stage name of one trained translator: `pix2pix`, or `pix2pix-seed1` per seed."""
  return name if seed is None else f"{name}-seed{seed}"


def num_target_images(config: ml_collections.ConfigDict, train: ImageSet) -> int:
  """How many synthetic (and so augmented) target images a row adds."""
  return synthesize.number_to_make(config.synthesize.num_synthetic, train.counts(),
                                   config.synthesize.target_class)


def row_training_set(row: str, splits: dict[str, ImageSet], *, count: int, target_class: str,
                     seed: int, synthetic_dir: str | pathlib.Path | None = None) -> ImageSet:
  """The training set of one row. `count` augmented copies for `oversampled` (seeded by `seed`,
  copied only from training images of `target_class`, refused if one equals a held-out image);
  the synthetic images of `synthetic_dir` for `enhanced-*` (leakage-checked on loading)."""
  train = splits["train"]
  if row in SPLIT_ROWS:
    return train
  if row == "oversampled":
    return controls.oversampled_training_set(train, target_class, count, seed,
                                             held_out=[splits["val"], splits["test"]])
  if row.startswith("enhanced-"):
    if synthetic_dir is None:
      raise ValueError(f"row {row} needs its synthetic_dir")
    synthetic = enhanced.load_synthetic_set(synthetic_dir, splits,
                                            image_size=train.images.shape[1])
    return enhanced.concatenate(train, synthetic)
  raise ValueError(f"unknown row {row!r}")


def train_translator(name: str, config: ml_collections.ConfigDict,
                     workdir: pathlib.Path) -> dict:
  """Trains (or resumes) translator `name`; its stage record names the exported generator."""
  translators.train_translator(name, config, workdir)
  return {"generator": str(pathlib.Path(workdir) / translator.GENERATOR_DIR)}


# --------------------------------------------------------------------------------- the task


def validate(config: ml_collections.ConfigDict) -> None:
  """Every stage's config is checked now, not hours later when the stage starts."""
  configlib.require(len(config.seeds) > 0, "seeds", "list at least one seed")
  configlib.require(len(set(config.seeds)) == len(config.seeds), "seeds", "seeds repeat")
  hidden = config.get("lungs_hidden", 0.0)
  configlib.require(isinstance(hidden, (int, float)) and not isinstance(hidden, bool)
                    and 0.0 <= hidden < 1.0, "lungs_hidden",
                    f"must be a fraction in [0, 1) (0: no lungs-hidden row), got {hidden!r}")
  names = tuple(config.translators)
  configlib.require(len(set(names)) == len(names), "translators", f"{names} repeats a name")
  for name in names:
    cls = translator.find(name, key="translators")
    configlib.require(name in config, name, f"translator {name!r} needs its config block")
    cls.check_config(sub_config(config, name))
  synthesize.number_to_make(config.synthesize.num_synthetic, {"a": 1}, "a")
  configlib.require_positive_int(config, "splits")
  primary = tuple(config.primary_comparison)
  configlib.require(len(primary) == 2 and primary[0] != primary[1], "primary_comparison",
                    f"{primary} must name two different rows (A, B)")
  for name in primary:
    configlib.require(name in rows(config), "primary_comparison",
                      f"{name!r} is not a row of this experiment; the rows are {rows(config)}")
  for train_data in ("original", "enhanced"):
    classifier.validate(sub_config(config, "classifier", train_data=train_data,
                                   synthetic_dir="<synthesized>"))
  if config.pretrained and not pathlib.Path(config.pretrained).expanduser().exists():
    raise ConfigError(f"config.pretrained: {config.pretrained} is neither a weights file nor a "
                      f"classifier export folder")


def split_config(config: ml_collections.ConfigDict, k: int) -> ml_collections.ConfigDict:
  """The experiment's config for split k: `data.split_seed + k`."""
  cfg = config.copy_and_resolve_references()
  cfg.data.split_seed = int(config.data.split_seed) + k
  return cfg


def run_experiment(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """The `experiment` task: every split, then the report over all of them."""
  validate(config)
  workdir = pathlib.Path(workdir)
  stages = Stages(workdir)
  n_splits = int(config.splits)
  split_runs, skipped = [], {}
  for k in range(n_splits):
    prefix = "" if n_splits == 1 else f"split{k}-"
    split_run, split_skipped = run_split(split_config(config, k),
                                         results.split_root(workdir, k, n_splits), stages, prefix)
    split_runs.append(split_run)
    skipped.update(split_skipped)
  return report.write_report(
      workdir, config, rows=rows(config), class_names=split_runs[0].class_names,
      splits=split_runs, skipped=skipped, stage_seconds=stages.seconds())


def run_split(config: ml_collections.ConfigDict, workdir: pathlib.Path, stages: Stages,
              prefix: str) -> tuple[results.SplitRun, dict[str, str]]:
  """Split, translators, synthesis, classifiers and translation quality of one split, in
  `workdir` (its stages named `<prefix><stage>`)."""
  workdir.mkdir(parents=True, exist_ok=True)
  splits = dataset.load_splits(config.data, workdir)
  stages.run(f"{prefix}split", lambda: {name: s.counts() for name, s in splits.items()})
  external = classify.load_external(config, splits, workdir)   # None without external_test_dir
  target = config.synthesize.target_class
  per_seed = bool(config.translator_per_seed)
  translator_seeds = [int(s) for s in config.seeds] if per_seed else [None]

  synthetic_dirs: dict[str, pathlib.Path] = {}     # translator tag -> synthesis folder
  for name in config.translators:
    for seed in translator_seeds:
      tag = translator_tag(name, seed)
      t_cfg = sub_config(config, name) if seed is None else sub_config(config, name, seed=seed)
      t_dir = workdir_lib.prepare(workdir / "translators" / tag, t_cfg)
      stages.run(f"{prefix}translator-{tag}",
                 lambda n=name, c=t_cfg, d=t_dir: train_translator(n, c, d))
      generator_dir = stages.record(f"{prefix}translator-{tag}")["result"]["generator"]
      syn_seed = config.synthesize.seed if seed is None else seed
      syn_cfg = sub_config(config, "synthesize", generator_dir=generator_dir, seed=syn_seed)
      syn_dir = (workdir_lib.prepare(workdir / "synthesize" / tag, syn_cfg)
                 / synthesize.SYNTHETIC_DIR)
      stages.run(f"{prefix}synthesize-{tag}", lambda c=syn_cfg, d=syn_dir: synthesize.synthesize(
          c.generator_dir, splits, d, num_synthetic=c.num_synthetic, seed=c.seed,
          batch_size=c.batch_size, source_class=c.source_class, target_class=c.target_class,
          quality_images=c.quality_images))
      synthetic_dirs[tag] = syn_dir

  count = num_target_images(config, splits["train"])
  skipped: dict[str, str] = {}
  train_counts: dict[str, dict[str, int]] = {}
  for row in rows(config):
    for group in seed_groups(config, row):
      seed_key = group[0] if per_seed and row not in SPLIT_ROWS else None
      counts_key = row if seed_key is None else f"{row}/seed{seed_key}"
      syn_dir = None
      if row.startswith("enhanced-"):
        syn_dir = synthetic_dirs[translator_tag(row[len("enhanced-"):], seed_key)]
      aug_seed = config.synthesize.seed if seed_key is None else seed_key
      train_set = None
      for init in INITS:
        stage = (f"{prefix}classifier-{row}-{init}"
                 + ("" if seed_key is None else f"-seed{seed_key}"))
        if init == "transfer" and not config.pretrained:
          skipped[f"{row}/{init}"] = ("no ImageNet weights configured (set --config.pretrained "
                                      "to a local ResNet-50 weights file)")
          continue
        if stages.record(stage) is None and train_set is None:
          train_set = row_training_set(row, splits, count=count, target_class=target,
                                       seed=aug_seed, synthetic_dir=syn_dir)
        cfg = sub_config(config, "classifier", name=f"classifier-{row}-{init}",
                         train_data="enhanced" if syn_dir else "original",
                         synthetic_dir=str(syn_dir) if syn_dir else "",
                         class_weighted_loss=row == "balanced-loss",
                         pretrained=config.pretrained if init == "transfer" else "")
        if init == "transfer":
          for key, value in config.transfer.items():
            cfg[key] = value
        if row == LUNGS_HIDDEN:
          cfg.data.hide_center = float(config.lungs_hidden)
        # One budget for every row of this initialisation: the original training split's.
        cfg.train_steps = classifier.budget_steps(cfg, len(splits["train"]))
        run_dirs = [workdir_lib.prepare(results.run_dir(workdir, row, init, seed),
                                        fit.seed_config(cfg, seed)) for seed in group]
        record = stages.run(stage, lambda c=cfg, g=group, d=run_dirs, t=train_set: {
            "train_counts": t.counts(), "train_steps": c.train_steps,
            "seeds": {str(s): r["summary"] for s, r in zip(g, classify.train_and_evaluate_seeds(
                c, g, d, splits=splits, train_set=t, external=external))}})
        train_counts[counts_key] = record["result"]["train_counts"]

  # Translation quality, with the features of a classifier trained on the original data.
  for tag, syn_dir in synthetic_dirs.items():
    seed = int(tag.rsplit("-seed", 1)[1]) if per_seed else int(config.seeds[0])
    quality_classifier = results.run_dir(workdir, "original", "scratch", seed) / \
        classifier.CLASSIFIER_DIR
    stages.run(f"{prefix}quality-{tag}", lambda d=syn_dir, q=quality_classifier:
               synthesize.synthesis_quality(d, q, splits, target_class=target))

  return results.SplitRun(
      root=workdir, split_seed=int(config.data.split_seed),
      split_counts={name: s.counts() for name, s in splits.items()}, train_counts=train_counts,
      synthetic_dirs=synthetic_dirs, class_names=tuple(splits["train"].class_names)), skipped
