"""The image translators by name, and the one way to train one: what `main.py`'s `pix2pix` and
`cyclegan` tasks and the experiment call."""

from __future__ import annotations

import pathlib
from typing import Callable

import ml_collections

from cxr_jax.errors import ConfigError
from cxr_jax.evaluation import plots
from cxr_jax.training import cyclegan
from cxr_jax.training import export
from cxr_jax.training import pix2pix

# translator name -> its trainer task: (config, workdir) -> the exported generator.
TRANSLATORS: dict[str, Callable[[ml_collections.ConfigDict, pathlib.Path], export.Exported]] = {
    "pix2pix": pix2pix.train_and_evaluate,
    "cyclegan": cyclegan.train_and_evaluate,
}


def train_translator(name: str, config: ml_collections.ConfigDict,
                     workdir: str | pathlib.Path) -> export.Exported:
  """Trains translator `name` on `config` in `workdir` (resuming a run there), draws the run's
  `training_curves.png` and returns the exported generator."""
  train = TRANSLATORS.get(name)
  if train is None:
    raise ConfigError(f"unknown translator {name!r}; known: {', '.join(TRANSLATORS)}")
  exported = train(config, pathlib.Path(workdir))
  plots.write_training_curves(workdir)
  return exported


def pix2pix_task(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> export.Exported:
  """The `pix2pix` task."""
  return train_translator("pix2pix", config, workdir)


def cyclegan_task(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> export.Exported:
  """The `cyclegan` task."""
  return train_translator("cyclegan", config, workdir)
