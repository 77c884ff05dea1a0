"""Prepare the radiographs once (array_record cache) and write the split manifest.

  python main.py --config=configs/prepare_data.py --config.data.data_dir=/data/COVID-19_Radiography_Database
  python main.py --config=configs/prepare_data.py          # the embedded synthetic default
"""

import ml_collections

from cxr_jax import configlib


# The variants (`--config=...:<variant>`), the default first; `cxr-jax --help` lists them.
VARIANTS = ("", "smoke")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "prepare_data"
  config.name = "prepare_data"
  config.data = configlib.data_config()
  if variant == "smoke":
    config.name = "prepare_data-smoke"
    config.data.image_size = 32
    config.data.synthetic_scale = 0.02
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/prepare_data.py; use "
                     f"{', '.join(map(repr, VARIANTS))}")
  return config
