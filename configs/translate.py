"""Translate a folder of radiographs (or one image) with a generator: the reference's `test.py`.

  python main.py --config=configs/translate.py --config.generator=runs/pix2pix/generator \
      --config.input=/path/to/images --workdir=runs/translate
  # a generator trained with the PyTorch reference (junyanz/pytorch-CycleGAN-and-pix2pix):
  python main.py --config=configs/translate.py --config.generator=checkpoints/x/latest_net_G.pth \
      --config.image_size=256 --config.input=/path/to/images --workdir=runs/translate-ref

Writes <workdir>/translated/<input's relative path>.png and <workdir>/manifest.csv (input file,
output file, source and output pixel sha256, generator, seed). The same seed gives the same PNGs.
"""

import ml_collections


# The variants (`--config=...:<variant>`), the default first; `cxr-jax --help` lists them.
VARIANTS = ("", "smoke")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "translate"
  config.name = "translate"
  config.seed = 0
  config.generator = ""      # <run>/generator, or a reference latest_net_G.pth / .safetensors
  config.input = ""          # an image file or a folder (PNG, JPEG, ..., DICOM), read recursively
  config.batch_size = 16
  # What a reference file cannot tell (0 / '': the generator's own; for a reference file 256 px,
  # the reference's --crop_size). For an export of ours, given values must agree with it.
  config.image_size = 0
  config.channels = 0
  config.architecture = ""   # '', 'unet' or 'resnet' (checked against the file)
  # '' = the export's own mode (a reference file: 'instance', the reference's test.py default:
  # normalisation by each image's statistics, dropout on); 'eval' = the reference's --eval.
  config.inference = ""
  if variant == "smoke":
    config.name = "translate-smoke"
    config.batch_size = 4
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/translate.py; use "
                     f"{', '.join(map(repr, VARIANTS))}")
  return config
