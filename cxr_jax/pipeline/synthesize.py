"""Synthetic COVID-19 radiographs from normal training images, with provenance and quality figures.

Only training-split normal images are translated (never validation or test), so the enhanced set
cannot carry held-out anatomy into training. Every PNG is listed in `manifest.csv` with its source
file and pixel hash and the generator it came from (see `cxr_jax.data.enhanced`).

Whatever the translator (pix2pix, CycleGAN, ...), synthesis writes `quality.json` and the labelled
grid `grid.png` (source | translated | difference) by `evaluation.quality.translation_quality`:
input dependence, diversity relative to the real target-class training images, and, with a
classifier trained on the original data, KID against real target-class images (the training ones,
which the generator saw, and the validation ones, which it did not, when there are enough) and the
share of translations the classifier calls the target class.
"""

from __future__ import annotations

import json
import pathlib

import ml_collections
import numpy as np
from absl import logging

from cxr_jax import configlib
from cxr_jax import workdir as workdir_lib
from cxr_jax.data import classes as classes_lib
from cxr_jax.data import dataset
from cxr_jax.data import enhanced
from cxr_jax.data.images import pixel_hash
from cxr_jax.errors import ConfigError, UserError
from cxr_jax.evaluation import fid
from cxr_jax.evaluation import quality as quality_lib
from cxr_jax.training import export
from cxr_jax.utils import grid

SYNTHETIC_DIR = "synthetic"
QUALITY_FILE = "quality.json"
GRID_FILE = "grid.png"
# Fewest real images of a split for a KID against them (validation sets can be tiny).
MIN_KID_IMAGES = 10


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


def translation_figures(sources: np.ndarray, translated: np.ndarray, splits, *, target_class: str,
                        classifier: export.Exported | None = None, seed: int = 0,
                        grid_rows: int = 6) -> tuple[dict, np.ndarray]:
  """(the quality figures, the labelled grid) of translations of training `sources`.

  Real target-class images: the training split's (the generator saw them: GANs see the target
  class in training) for diversity and KID, and the validation split's (never seen) for a second
  KID when it has at least MIN_KID_IMAGES. KID and the target share need `classifier` (its pooled
  features and its predictions): figures in this project's own feature space, not comparable
  with Inception-based KIDs published elsewhere.
  """
  real_train = splits["train"].of_class(target_class).images
  if len(real_train) < 2:
    raise UserError(f"the training split has {len(real_train)} {target_class} image(s); the "
                    "quality figures need at least 2")
  probs = target_index = features = None
  if classifier is not None:
    names = [classes_lib.canonical(n) for n in classifier.meta["class_names"]]
    if target_class not in names:
      raise UserError(f"the quality classifier knows the classes {names}, not {target_class}")
    target_index = names.index(target_class)
    probs = classifier.predict(translated)
    features = classifier.features
  figures = quality_lib.translation_quality(sources, translated, real_train,
                                            features_fn=features, probs=probs,
                                            target_index=target_index, seed=seed)
  figures["target_class"] = target_class
  figures["real_target"] = {"diversity_and_kid": "train",
                            "train": {"n": len(real_train), "seen_by_generator": True}}
  if classifier is not None:
    figures["features"] = (f"pooled last-stage ResNet features of the classifier "
                           f"{classifier.meta.get('workdir', '')} (trained on the original data)")
    figures["kid_train"] = {"mean": figures["kid"], "std": figures["kid_std"],
                            "n_real": len(real_train), "seen_by_generator": True}
    # The report's spelling of the share.
    figures["share_called_" + target_class] = figures["target_share"]
    real_val = splits["val"].of_class(target_class).images if "val" in splits else real_train[:0]
    if len(real_val) >= MIN_KID_IMAGES and len(translated) >= 2:
      mean, std = fid.kernel_inception_distance(features(translated), features(real_val),
                                                seed=seed)
      figures["kid_val"] = {"mean": mean, "std": std, "n_real": len(real_val),
                            "seen_by_generator": False}
    else:
      figures["kid_val"] = {"n_real": len(real_val), "seen_by_generator": False,
                            "note": f"not computed: fewer than {MIN_KID_IMAGES} validation "
                                    f"{target_class} images"}
  else:
    figures["note"] = "no quality classifier given: KID and the target share not computed"
  picture = quality_lib.labelled_grid(sources, translated, n=min(grid_rows, len(translated)))
  return figures, picture


def write_quality(out_dir: pathlib.Path, figures: dict, picture: np.ndarray) -> None:
  if workdir_lib.is_writer():
    grid.save_png(pathlib.Path(out_dir) / GRID_FILE, picture)
    (pathlib.Path(out_dir) / QUALITY_FILE).write_text(json.dumps(figures, indent=2))


def quality_sources(sources: np.ndarray, seed: int, max_images: int) -> np.ndarray:
  """Indices of the source images the quality figures translate: each once, at most `max_images`,
  in a seeded order (independent of how many synthetic images are written: 'balance' may ask for
  none)."""
  order = np.random.default_rng([seed, 0x9A11]).permutation(len(sources))
  return np.sort(order[:max_images])


def synthesize(generator_dir: str | pathlib.Path, splits, out_dir: pathlib.Path, *,
               num_synthetic: str, seed: int, batch_size: int, source_class: str = "NORMAL",
               target_class: str = "COVID", grid_rows: int = 6,
               quality_classifier_dir: str | pathlib.Path | None = None,
               quality_images: int = 500) -> dict:
  """Translates training normals into `out_dir` and measures the translation (`quality.json`,
  `grid.png`, see `translation_figures`); returns a summary (also `synthesis.json`)."""
  names = splits["train"].class_names
  source_class = classes_lib.member(source_class, names, "source_class")
  target_class = classes_lib.member(target_class, names, "target_class")
  gen = export.load_generator(generator_dir)
  made_for = tuple(classes_lib.canonical(gen.meta.get(k, d)) for k, d in
                   (("source_class", source_class), ("target_class", target_class)))
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
  summary = {"num_synthetic": int(n), "num_sources": int(len(np.unique(picks))),
             "source_class": source_class, "target_class": target_class, "seed": seed,
             "generator": str(generator_dir), "translator": gen.meta.get("translator", ""),
             "image_size": size, "train_counts": train.counts()}
  n_real = len(train.of_class(target_class))
  if len(sources) < 2 or n_real < 2:
    summary["quality"] = {"note": f"not measured: {len(sources)} {source_class} and {n_real} "
                                  f"{target_class} training images (at least 2 of each needed)"}
    if workdir_lib.is_writer():
      (out_dir / QUALITY_FILE).write_text(json.dumps(summary["quality"], indent=2))
  else:
    q_idx = quality_sources(sources.images, seed, quality_images)
    q_src = sources.images[q_idx]
    q_fake = gen.translate(q_src, seed=seed, batch_size=batch_size)
    classifier = (export.load_classifier(quality_classifier_dir) if quality_classifier_dir
                  else None)
    figures, picture = translation_figures(q_src, q_fake, splits, target_class=target_class,
                                           classifier=classifier, seed=seed, grid_rows=grid_rows)
    figures.update(translator=gen.meta.get("translator", ""), generator=str(generator_dir),
                   sources=f"{len(q_idx)} {source_class} training images, each translated once")
    write_quality(out_dir, figures, picture)
    summary["quality"] = figures
  if workdir_lib.is_writer():
    (out_dir / "synthesis.json").write_text(json.dumps(
        {k: v for k, v in summary.items() if k != "quality"}, indent=2))
  logging.info("Wrote %d synthetic %s images to %s", n, target_class, out_dir)
  return summary


def synthesis_quality(synthetic_dir: pathlib.Path, classifier_dir: str | pathlib.Path, splits, *,
                      target_class: str = "COVID", seed: int = 0) -> dict:
  """The quality figures (`translation_figures`) of the synthetic images already written in
  `synthetic_dir`, each beside the training image it was made from, with the classifier in
  `classifier_dir` (trained on the original data); rewrites `quality.json` and `grid.png`."""
  names = splits["train"].class_names
  target_class = classes_lib.member(target_class, names, "target_class")
  train = splits["train"]
  synthetic = enhanced.load_synthetic_set(synthetic_dir, splits, image_size=train.images.shape[1])
  index = {h: i for i, h in enumerate(train.hashes)}
  rows = enhanced.read_manifest(pathlib.Path(synthetic_dir))
  sources = train.images[[index[r["source_sha256"]] for r in rows]]
  if len(synthetic) < 2:
    raise UserError(f"{synthetic_dir}: {len(synthetic)} synthetic image(s); the quality figures "
                    "need at least 2")
  figures, picture = translation_figures(sources, synthetic.images, splits,
                                         target_class=target_class,
                                         classifier=export.load_classifier(classifier_dir),
                                         seed=seed)
  figures["sources"] = f"the {len(rows)} synthetic images in {synthetic_dir} and their sources"
  write_quality(pathlib.Path(synthetic_dir), figures, picture)
  return figures


def synthesize_task(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """The `synthesize` task."""
  configlib.require(bool(config.generator_dir), "generator_dir",
                    "set it to an exported generator (<pix2pix or cyclegan workdir>/generator)")
  configlib.require_positive_int(config, "batch_size")
  configlib.require_positive_int(config, "quality_images")
  splits = dataset.load_splits(config.data, workdir)
  out = pathlib.Path(workdir) / SYNTHETIC_DIR
  return synthesize(config.generator_dir, splits, out, num_synthetic=config.num_synthetic,
                    seed=config.seed, batch_size=config.batch_size,
                    source_class=config.source_class, target_class=config.target_class,
                    quality_classifier_dir=config.quality_classifier_dir or None,
                    quality_images=config.quality_images)
