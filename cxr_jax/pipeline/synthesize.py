"""Synthetic COVID-19 radiographs from normal training images, with provenance and quality figures.

Only training-split normal images are translated (never validation or test), so the enhanced set
cannot carry held-out anatomy into training. Every PNG is listed in `manifest.csv` with its source
file and pixel hash and the generator it came from (see `cxr_jax.data.enhanced`).
"""

from __future__ import annotations

import json
import pathlib

import ml_collections
import numpy as np
from absl import logging

from cxr_jax import configlib
from cxr_jax import workdir as workdir_lib
from cxr_jax.data import dataset
from cxr_jax.data import enhanced
from cxr_jax.data.images import pixel_hash
from cxr_jax.errors import ConfigError, UserError
from cxr_jax.evaluation import fid
from cxr_jax.training import export
from cxr_jax.utils import grid

SYNTHETIC_DIR = "synthetic"
QUALITY_FILE = "quality.json"


def number_to_make(spec: str, counts: dict[str, int], target: str) -> int:
  """'balance': top the target class up to the largest class; else an integer count."""
  spec = str(spec).strip().lower()
  if spec == "balance":
    return max(0, max(counts.values()) - counts.get(target, 0))
  try:
    n = int(spec)
  except ValueError:
    raise ConfigError(f"config.num_synthetic: {spec!r} is neither 'balance' nor an integer") from None
  if n < 0:
    raise ConfigError(f"config.num_synthetic: must be >= 0, got {n}")
  return n


def synthesize(generator_dir: str | pathlib.Path, splits, out_dir: pathlib.Path, *,
               num_synthetic: str, seed: int, batch_size: int, source_class: str = "NORMAL",
               target_class: str = "COVID", grid_rows: int = 6) -> dict:
  """Translates training normals into `out_dir`; returns a summary (also `synthesis.json`)."""
  gen = export.load_generator(generator_dir)
  made_for = (gen.meta.get("source_class", source_class), gen.meta.get("target_class", target_class))
  if made_for != (source_class, target_class):
    raise UserError(f"{generator_dir}: the generator translates {made_for[0]} -> {made_for[1]}, "
                    f"not {source_class} -> {target_class} (config.source_class / target_class)")
  train = splits["train"]
  sources = train.of_class(source_class)
  size = gen.meta["image_size"]
  if sources.images.shape[1] != size:
    raise UserError(f"{generator_dir}: the generator works at {size} px, the data at "
                    f"{sources.images.shape[1]} px; set config.data.image_size={size}")
  n = number_to_make(num_synthetic, train.counts(), target_class)
  if len(sources) == 0:
    raise UserError(f"the training split has no {source_class} images to translate")
  # Each normal image is used once before any is used twice; repeats get fresh dropout noise.
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(len(sources)) for _ in range(-(-n // len(sources)))])
  picks = order[:n].astype(int)
  out_dir = pathlib.Path(out_dir)
  image_dir = out_dir / target_class
  image_dir.mkdir(parents=True, exist_ok=True)
  fakes = gen.translate(sources.images[picks], seed=seed, batch_size=batch_size) if n else \
      np.zeros((0,) + sources.images.shape[1:], np.uint8)
  rows = []
  if workdir_lib.is_writer():
    for i, (src, fake) in enumerate(zip(picks, fakes)):
      name = f"{target_class}/synthetic-{i + 1:05d}.png"
      grid.save_png(out_dir / name, fake)
      rows.append({"file": name, "sha256": pixel_hash(fake[..., 0]), "class": target_class,
                   "source_file": sources.files[src], "source_sha256": sources.hashes[src],
                   "generator": str(pathlib.Path(generator_dir).absolute()),
                   "generator_step": gen.meta.get("step", ""), "seed": seed})
    enhanced.write_manifest(out_dir, rows)
    if n:
      k = min(grid_rows, n)
      grid.save_png(out_dir / "grid.png",
                    grid.tile(np.stack([sources.images[picks[:k]], fakes[:k]], axis=1)))
  summary = {"num_synthetic": int(n), "num_sources": int(len(np.unique(picks))),
             "source_class": source_class, "target_class": target_class, "seed": seed,
             "generator": str(generator_dir), "image_size": size,
             "train_counts": train.counts()}
  if workdir_lib.is_writer():
    (out_dir / "synthesis.json").write_text(json.dumps(summary, indent=2))
  logging.info("Wrote %d synthetic %s images to %s", n, target_class, out_dir)
  return summary


def synthesis_quality(synthetic_dir: pathlib.Path, classifier_dir: str | pathlib.Path, splits, *,
                      target_class: str = "COVID", kid_subset: int = 1000) -> dict:
  """FID / KID between synthetic and real training COVID images, and the share of synthetic images
  that a classifier trained on the original data calls COVID.

  Features: globally pooled last-stage ResNet features of that classifier, a network available
  offline and trained on radiographs (an ImageNet Inception network is not at hand here), so the
  figures compare like with like within this project, not with FIDs published elsewhere.
  """
  trained = export.load_classifier(classifier_dir)
  size = splits["train"].images.shape[1]
  synthetic = enhanced.load_synthetic_set(synthetic_dir, splits, image_size=size)
  real = splits["train"].of_class(target_class)
  quality = {"features": f"pooled ResNet features of the classifier in {classifier_dir}",
             "num_synthetic": len(synthetic), "num_real": len(real)}
  if len(synthetic) >= 2 and len(real) >= 2:
    f_syn, f_real = trained.features(synthetic.images), trained.features(real.images)
    try:
      quality["fid"] = fid.frechet_distance(f_syn, f_real)
    except ValueError as e:  # too few images for the feature dimension: covariance is singular
      quality["note"] = f"FID not computed: {e}"
    kid_mean, kid_std = fid.kernel_inception_distance(f_syn, f_real, subset_size=kid_subset)
    quality["kid"], quality["kid_std"] = kid_mean, kid_std
  else:
    quality["note"] = "fewer than 2 images on a side: FID and KID not computed"
  if len(synthetic):
    probs = trained.predict(synthetic.images)
    names = list(trained.meta["class_names"])
    quality["share_called_" + target_class] = float(np.mean(probs.argmax(-1) ==
                                                            names.index(target_class)))
  if workdir_lib.is_writer():
    (pathlib.Path(synthetic_dir) / QUALITY_FILE).write_text(json.dumps(quality, indent=2))
  return quality


def synthesize_task(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """The `synthesize` task."""
  configlib.require(bool(config.generator_dir), "generator_dir",
                    "set it to an exported generator (<pix2pix workdir>/generator)")
  configlib.require_positive_int(config, "batch_size")
  splits = dataset.load_splits(config.data, workdir)
  out = pathlib.Path(workdir) / SYNTHETIC_DIR
  summary = synthesize(config.generator_dir, splits, out, num_synthetic=config.num_synthetic,
                       seed=config.seed, batch_size=config.batch_size,
                       source_class=config.source_class, target_class=config.target_class)
  if config.quality_classifier_dir:
    summary["quality"] = synthesis_quality(out, config.quality_classifier_dir, splits,
                                           target_class=config.target_class)
  return summary
