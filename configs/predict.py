"""Classify a folder of chest X-rays (or one image) with a trained classifier.

  python main.py --config=configs/predict.py --config.classifier_dir=runs/classifier/classifier \
      --config.input=/path/to/images --workdir=runs/predict

Writes <workdir>/predictions-<slug of input>.csv (file, predicted class, one probability per
class) and prints it. Another --config.input in the same workdir adds its own file beside it.
"""

import ml_collections

from cxr_jax import configlib


# The variants (`--config=...:<variant>`), the default first; `cxr-jax --help` lists them.
VARIANTS = ("", "smoke")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "predict"
  config.name = "predict"
  config.data = configlib.data_config()   # data.image_size: the size images are decoded at
  config.classifier_dir = ""
  config.input = ""
  if variant == "smoke":
    config.name = "predict-smoke"
    config.data.image_size = 32
    config.data.synthetic_scale = 0.02
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/predict.py; use "
                     f"{', '.join(map(repr, VARIANTS))}")
  return config
