"""The one way to train an image translator, found by its name (`cxr_jax.training.<name>`): what
`main.py`'s `translator` task and the experiment call."""

from __future__ import annotations

import pathlib

import ml_collections

from cxr_jax.evaluation import plots
from cxr_jax.training import export
from cxr_jax.training import translator


def train_translator(name: str, config: ml_collections.ConfigDict,
                     workdir: str | pathlib.Path) -> export.Exported:
  """Trains translator `name` on `config` in `workdir` (resuming a run there), draws the run's
  `training_curves.png` and returns the exported generator."""
  exported = translator.train(translator.find(name), config, pathlib.Path(workdir))
  plots.write_training_curves(workdir)
  return exported


def translator_task(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> export.Exported:
  """The `translator` task: trains `config.translator` (configs/pix2pix.py, cyclegan.py, ...)."""
  return train_translator(config.translator, config, workdir)
