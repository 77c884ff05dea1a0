"""pix2pix normal -> COVID-19 translator.

  python main.py --config=configs/pix2pix.py --config.data.data_dir=/path/to/COVID-19_Radiography_Database
  python main.py --config=configs/pix2pix.py:cpu      # learns on the synthetic data on 2 CPU cores
  python main.py --config=configs/pix2pix.py:smoke    # seconds; used by the tests

Default: the paper's settings (256 px, batch 1, 100 epochs: 50 at constant learning rate, 50 of
linear decay to zero), on the real database when data.data_dir is set, else the synthetic default.
The keys every translator shares are configlib.translator_config()'s.
"""

import ml_collections

from cxr_jax import configlib


# The variants (`--config=...:<variant>`), the default first; `cxr-jax --help` lists them.
VARIANTS = ("", "cpu", "smoke")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = configlib.translator_config("pix2pix")
  config.model.generator = "unet"
  config.model.norm = "batch"          # or "instance"
  config.model.use_dropout = True      # dropout 0.5 in the three innermost decoder levels
  config.model.inference_norm = "instance"  # pix2pix test mode; "running" for running averages
  config.num_epochs = 100
  config.decay_epochs = 50
  config.gan_loss = "bce"              # or "lsgan"
  config.l1_weight = 100.0
  config.flat_optimizer = True         # Adam over one flat buffer: fewer, larger update kernels
  return configlib.translator_variant(config, variant, cpu={"steps_per_call": 25})
