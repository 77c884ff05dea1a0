"""Translate normal training images into synthetic COVID-19 images with a trained generator.

  python main.py --config=configs/synthesize.py --config.generator_dir=runs/pix2pix/generator
  # (or runs/cyclegan/generator: any translator's export). Always writes synthetic/quality.json
  # and grid.png (input dependence, diversity); KID against real COVID images and the share
  # called COVID need a classifier trained on the original data:
  #   --config.quality_classifier_dir=runs/classifier/classifier

The data config must be the one the generator was trained with (same split): the enhanced set is
refused otherwise.
"""

import ml_collections

from cxr_jax import configlib


# The variants (`--config=...:<variant>`), the default first; `cxr-jax --help` lists them.
VARIANTS = ("", "smoke")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "synthesize"
  config.name = "synthesize"
  config.seed = 0
  config.data = configlib.data_config()
  config.generator_dir = ""
  config.num_synthetic = "1100"        # the paper's 1,100; or "balance": COVID up to the largest class
  config.batch_size = 32
  config.source_class = "NORMAL"
  config.target_class = "COVID"
  config.quality_classifier_dir = ""
  config.quality_images = 500          # training normals translated (once each) for quality.json
  if variant == "smoke":
    config.name = "synthesize-smoke"
    config.data.image_size = 32
    config.data.synthetic_scale = 0.02
    config.num_synthetic = "balance"
    config.batch_size = 8
    config.quality_images = 50
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/synthesize.py; use "
                     f"{', '.join(map(repr, VARIANTS))}")
  return config
