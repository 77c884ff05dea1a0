"""The paper's experiment in one command.

split -> pix2pix -> synthesis -> ResNet-50 classifiers for {original, enhanced} x {scratch,
transfer} over several seeds, each evaluated on the same real test split -> report.

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
from cxr_jax.errors import ConfigError
from cxr_jax.pipeline import classify
from cxr_jax.pipeline import report
from cxr_jax.pipeline import synthesize
from cxr_jax.training import classifier
from cxr_jax.training import pix2pix
from cxr_jax.utils import files

ROWS = (("original", "scratch"), ("original", "transfer"), ("enhanced", "scratch"),
        ("enhanced", "transfer"))


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
    logging.info("Stage %s: starting", name)
    t0 = time.perf_counter()
    result = fn()
    record = {"stage": name, "seconds": time.perf_counter() - t0, "result": result}
    if workdir_lib.is_writer():
      files.write_text_atomic(self.dir / f"{name}.json",
                              json.dumps(record, indent=2, default=str))
    logging.info("Stage %s: done in %.0f s", name, record["seconds"])
    return record


def sub_config(config: ml_collections.ConfigDict, key: str, **overrides) -> ml_collections.ConfigDict:
  """A stage's own config: the experiment's `config.<key>` block with the shared data block."""
  sub = ml_collections.ConfigDict(config[key].to_dict())
  sub.data = ml_collections.ConfigDict(config.data.to_dict())
  sub.multihost = config.multihost
  sub.update(overrides)
  return sub


def classifier_runs(config: ml_collections.ConfigDict) -> list[dict]:
  runs = []
  for seed in config.seeds:
    for train_data, init in ROWS:
      runs.append({"name": f"{train_data}-{init}-seed{seed}", "train_data": train_data,
                   "init": init, "seed": seed})
  return runs


def run_experiment(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """The `experiment` task."""
  configlib.require(len(config.seeds) > 0, "seeds", "list at least one seed")
  # Every stage's config is checked now, not hours later when the stage starts.
  pix2pix.validate(sub_config(config, "pix2pix"))
  for train_data in ("original", "enhanced"):
    classifier.validate(sub_config(config, "classifier", train_data=train_data,
                                   synthetic_dir="<synthesized>"))
  if config.pretrained and not pathlib.Path(config.pretrained).is_file():
    raise ConfigError(f"config.pretrained: {config.pretrained} is not a file")
  workdir = pathlib.Path(workdir)
  stages = Stages(workdir)
  splits = dataset.load_splits(config.data, workdir)
  stages.run("split", lambda: {name: s.counts() for name, s in splits.items()})

  p2p_cfg = sub_config(config, "pix2pix")
  p2p_dir = workdir_lib.prepare(workdir / "pix2pix", p2p_cfg)

  def train_generator():
    pix2pix.train_and_evaluate(p2p_cfg, p2p_dir)
    return {"generator": str(p2p_dir / pix2pix.GENERATOR_DIR)}

  stages.run("pix2pix", train_generator)

  syn_cfg = sub_config(config, "synthesize",
                       generator_dir=str(p2p_dir / pix2pix.GENERATOR_DIR))
  syn_dir = workdir_lib.prepare(workdir / "synthesize", syn_cfg)
  synthetic_dir = syn_dir / synthesize.SYNTHETIC_DIR
  stages.run("synthesize", lambda: synthesize.synthesize(
      syn_cfg.generator_dir, splits, synthetic_dir, num_synthetic=syn_cfg.num_synthetic,
      seed=syn_cfg.seed, batch_size=syn_cfg.batch_size, source_class=syn_cfg.source_class,
      target_class=syn_cfg.target_class))

  skipped = {}
  for run in classifier_runs(config):
    if run["init"] == "transfer" and not config.pretrained:
      skipped[run["name"]] = ("no ImageNet weights configured (set --config.pretrained to a "
                              "local ResNet-50 weights file)")
      continue
    cfg = sub_config(config, "classifier", seed=run["seed"], train_data=run["train_data"],
                     name=f"classifier-{run['name']}",
                     pretrained=config.pretrained if run["init"] == "transfer" else "",
                     synthetic_dir=str(synthetic_dir) if run["train_data"] == "enhanced" else "")
    if run["init"] == "transfer":
      for key, value in config.transfer.items():
        cfg[key] = value
    run_dir = workdir_lib.prepare(workdir / "classifiers" / run["name"], cfg)
    stages.run(f"classifier-{run['name']}",
               lambda cfg=cfg, run_dir=run_dir: classify.train_and_evaluate(cfg, run_dir)[
                   "summary"])

  first_original = workdir / "classifiers" / f"original-scratch-seed{config.seeds[0]}"
  stages.run("quality", lambda: synthesize.synthesis_quality(
      synthetic_dir, first_original / classifier.CLASSIFIER_DIR, splits))
  return report.write_report(workdir, config, splits=splits, skipped=skipped,
                             stages=stages, synthetic_dir=synthetic_dir)
