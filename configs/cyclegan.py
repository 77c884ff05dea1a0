"""CycleGAN normal -> COVID-19 translator (unpaired; pix2pix's random pairs cannot translate).

  python main.py --config=configs/cyclegan.py --config.data.data_dir=/path/to/COVID-19_Radiography_Database
  python main.py --config=configs/cyclegan.py:cpu      # 64 px, 20 epochs (10 decaying), 2 blocks
  python main.py --config=configs/cyclegan.py:smoke    # seconds; used by the tests

Default: the reference's CycleGAN settings (junyanz/pytorch-CycleGAN-and-pix2pix: 256 px, batch 1,
ResNet 9-block generators ngf 64, 70x70 PatchGANs ndf 64, instance norm, no dropout, LSGAN, cycle
weight 10 each way, identity 0.5, history pool of 50, Adam 2e-4 beta1 0.5, 100 epochs constant +
100 of linear decay to zero): configlib.translator_config() and the keys below. A = source_class,
B = target_class (see cxr_jax/training/cyclegan.py).
"""

import ml_collections

from cxr_jax import configlib


# The variants (`--config=...:<variant>`), the default first; `cxr-jax --help` lists them.
VARIANTS = ("", "cpu", "smoke")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = configlib.translator_config("cyclegan")
  config.model.n_blocks = 9            # residual blocks of the ResNet generator (resnet_9blocks)
  config.lambda_a = 10.0               # cycle A -> B -> A
  config.lambda_b = 10.0               # cycle B -> A -> B
  config.lambda_identity = 0.5         # identity terms weigh lambda_identity * lambda_{a,b}
  config.pool_size = 50                # generated images each discriminator draws from; 0: none
  return configlib.translator_variant(
      config, variant,
      cpu={"model.n_blocks": 2, "steps_per_call": 10},
      smoke={"model.n_blocks": 1, "pool_size": 6})
