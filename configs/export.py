"""Export a trained generator or classifier as `.safetensors` for the PyTorch world.

  python main.py --config=configs/export.py --config.model_dir=runs/pix2pix/generator \
      --workdir=runs/export

A generator is written with the PyTorch reference's key names (junyanz/pytorch-CycleGAN-and-pix2pix
`netG.load_state_dict` reads it), a classifier with torchvision's ResNet key names. Writes
<workdir>/<output_name>.safetensors and <output_name>.json (what it is, how to load it).
"""

import ml_collections


# The variants (`--config=...:<variant>`), the default first; `cxr-jax --help` lists them.
VARIANTS = ("",)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "export"
  config.name = "export"
  config.model_dir = ""      # <run>/generator or <run>/classifier
  config.output_name = ""    # '' = 'generator' or 'classifier'
  if variant:
    raise ValueError(f"unknown variant {variant!r} of configs/export.py; use "
                     f"{', '.join(map(repr, VARIANTS))}")
  return config
