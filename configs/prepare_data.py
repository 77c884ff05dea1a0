"""Prepare the radiographs once (array_record cache) and write the split manifest.

  python main.py --config=configs/prepare_data.py --config.data.data_dir=/data/COVID-19_Radiography_Database
  python main.py --config=configs/prepare_data.py          # the embedded synthetic default
"""

import ml_collections

from cxr_jax import configlib


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant:
    raise ValueError(f"configs/prepare_data.py has no variant {variant!r}")
  config = ml_collections.ConfigDict()
  config.task = "prepare_data"
  config.name = "prepare_data"
  config.data = configlib.data_config()
  return config
