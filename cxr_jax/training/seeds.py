"""A classifier row's seeds trained as one compiled program (`fit.SeedStack`), or one run after
another: per-seed exports, metrics and TensorBoard scalars in each seed's own workdir, one
checkpoint of the stacked state (docs/performance.md, "A row's seeds in one program")."""

from __future__ import annotations

import pathlib

import jax
import ml_collections
from absl import logging

from cxr_jax.data import records
from cxr_jax.data.dataset import ImageSet
from cxr_jax.errors import ConfigError
from cxr_jax.training import classifier
from cxr_jax.training import export
from cxr_jax.training import fit
from cxr_jax.training import loop


def checkpoint_dir(workdirs: list[pathlib.Path], seeds: list[int]) -> pathlib.Path:
  """Where the checkpoints of a row's seeds trained together live: `<first seed's
  workdir>/seeds-<s0>-<s1>-.../checkpoints` (one checkpoint holds every seed)."""
  return pathlib.Path(workdirs[0]) / ("seeds-" + "-".join(str(int(s)) for s in seeds))


def train_seeds(config: ml_collections.ConfigDict, seeds: list[int],
                workdirs: list[pathlib.Path], train_set: ImageSet, val_set: ImageSet,
                mesh: jax.sharding.Mesh, *, mode: str | None = "config") -> list[export.Exported]:
  """Trains `config` once per seed (seed k exports to `workdirs[k]/classifier`, with its
  TensorBoard scalars in `workdirs[k]/tensorboard`), all seeds in one compiled program
  (`fit.SeedStack`) when `mode` (default: `config.seeds_in_one_program`) is 'map' or 'vmap',
  else one run after another. A seed axis that does not fit in device memory falls back to one
  run after another (logged). Returns each seed's best export, in the order of `seeds`."""
  seeds, workdirs = [int(s) for s in seeds], [pathlib.Path(w) for w in workdirs]
  if len(seeds) != len(workdirs) or not seeds:
    raise ValueError(f"{len(seeds)} seeds for {len(workdirs)} workdirs")
  if len(set(seeds)) != len(seeds):
    raise ConfigError(f"seeds: {seeds} repeats a seed")
  mode = fit.seeds_mode(config) if mode == "config" else mode
  if mode is not None and records.is_lazy(train_set.images):
    # One program of N seeds reads N batches a step; a stream gives one run's batches.
    if config.get("seeds_in_one_program") in fit.SEED_MODES:
      raise ConfigError(f"config.seeds_in_one_program={config.seeds_in_one_program!r} needs the "
                        "training images on the devices; this run streams them "
                        "(config.data.placement): use 'auto' or 'off'")
    logging.info("classifier: the training images stream from disk, so seeds %s train one "
                 "after another", seeds)
    mode = None

  def one_after_another() -> list[export.Exported]:
    return [classifier.train(fit.seed_config(config, s), w, train_set, val_set, mesh)
            for s, w in zip(seeds, workdirs)]

  if mode is None or len(seeds) == 1:
    return one_after_another()
  setup = classifier.run_setup(config, train_set)
  trainers = [classifier.make_trainer(fit.seed_config(config, s), w, train_set, val_set, mesh,
                                      setup) for s, w in zip(seeds, workdirs)]
  stack = fit.SeedStack(trainers, mode=mode, best_metric="macro_f1", export_dirs=workdirs,
                        writer_dirs=workdirs)
  stack_dir = checkpoint_dir(workdirs, seeds)
  logging.info("classifier: seeds %s in one program (%s over the seed axis); checkpoints in %s",
               seeds, mode, stack_dir / "checkpoints")
  try:
    classifier.fit_trainer(config, stack, stack_dir, train_set, setup, seeds=len(seeds),
                           best_metric=None)
  except loop.OutOfDeviceMemory as e:
    logging.warning("classifier: the %d seeds do not fit in device memory as one program (%s); "
                    "training them one after another instead.", len(seeds), e)
    return one_after_another()
  return [export.load_classifier(w / classifier.CLASSIFIER_DIR, mesh) for w in workdirs]
