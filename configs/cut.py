"""CUT (contrastive unpaired translation) normal -> COVID-19 translator; FastCUT as `:fast`.

  python main.py --config=configs/cut.py --config.data.data_dir=/path/to/COVID-19_Radiography_Database
  python main.py --config=configs/cut.py:fast     # FastCUT: no identity NCE, PatchNCE weight 10
  python main.py --config=configs/cut.py:cpu      # 64 px, 20 epochs (10 decaying), 2 blocks
  python main.py --config=configs/cut.py:smoke    # seconds; used by the tests

Default: the authors' CUT settings (taesungp/contrastive-unpaired-translation: 256 px, batch 1,
ResNet 9-block generator ngf 64, 70x70 PatchGAN ndf 64, instance norm, no dropout, LSGAN weight 1,
PatchNCE weight 1 on 256 patches of 5 encoder layers through 256-wide MLPs at temperature 0.07,
identity NCE, no history pool, Adam 2e-4 beta1 0.5, 200 epochs constant + 200 of linear decay):
configlib.translator_config() and the keys below. `nce_layers` number the encoder's tensors as
`ResnetGenerator.encode` does: 0 the padded input, 4 and 7 the stride-2 convolutions, 10 + i
residual block i; (0, 4, 7, 10, 14) are the points of the authors' '0,4,8,12,16'.
"""

import ml_collections

from cxr_jax import configlib


# The variants (`--config=...:<variant>`), the default first; `cxr-jax --help` lists them.
VARIANTS = ("", "cpu", "smoke", "fast")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = configlib.translator_config("cut")
  config.model.n_blocks = 9            # residual blocks of the ResNet generator (resnet_9blocks)
  config.model.nce_mlp_dim = 256       # width of the patch MLP head (the authors' netF_nc)
  config.num_epochs = 400              # the authors' n_epochs 200 + n_epochs_decay 200
  config.decay_epochs = 200
  config.lambda_gan = 1.0
  config.lambda_nce = 1.0              # each layer's PatchNCE weight
  config.nce_idt = True                # identity PatchNCE on target images (CUT; FastCUT: False)
  config.nce_layers = (0, 4, 7, 10, 14)
  config.num_patches = 256             # patch positions per layer and image
  config.nce_t = 0.07                  # the contrastive temperature
  return configlib.translator_variant(
      config, variant,
      fast={"nce_idt": False, "lambda_nce": 10.0, "num_epochs": 200, "decay_epochs": 50},
      cpu={"model.n_blocks": 2, "nce_layers": (0, 4, 7, 10, 11), "steps_per_call": 10},
      smoke={"model.n_blocks": 1, "nce_layers": (0, 4, 7, 10), "num_patches": 16,
             "model.nce_mlp_dim": 8})
