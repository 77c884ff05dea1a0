"""CycleGAN normal -> COVID-19 translator (unpaired; pix2pix's random pairs cannot translate).

  python main.py --config=configs/cyclegan.py --config.data.data_dir=/path/to/COVID-19_Radiography_Database
  python main.py --config=configs/cyclegan.py:cpu      # 64 px, about 6-11 minutes on 2 CPU cores
  python main.py --config=configs/cyclegan.py:smoke    # seconds; used by the tests

Default: the reference's CycleGAN settings (junyanz/pytorch-CycleGAN-and-pix2pix: 256 px, batch 1,
ResNet 9-block generators ngf 64, 70x70 PatchGANs ndf 64, instance norm, no dropout, LSGAN, cycle
weight 10 each way, identity 0.5, history pool of 50, Adam 2e-4 beta1 0.5, 100 epochs constant +
100 of linear decay to zero). A = source_class, B = target_class (see cxr_jax/training/cyclegan.py).
"""

import ml_collections

from cxr_jax import configlib


# The variants (`--config=...:<variant>`), the default first; `cxr-jax --help` lists them.
VARIANTS = ("", "cpu", "smoke")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "cyclegan"
  config.name = "cyclegan"
  config.seed = 0
  config.data = configlib.data_config()
  config.source_class = "NORMAL"       # domain A
  config.target_class = "COVID"        # domain B

  config.model = ml_collections.ConfigDict()
  config.model.generator = "resnet"    # the reference's resnet_9blocks; or "unet" (unet_256 style)
  config.model.n_blocks = 9            # residual blocks of the ResNet generator
  config.model.ngf = 64
  config.model.ndf = 64
  config.model.n_layers_d = 3          # 70x70 PatchGAN
  config.model.norm = "instance"       # or "batch"
  config.model.use_dropout = False     # the reference's CycleGAN default (--no_dropout)
  config.compute_dtype = "float32"     # "bfloat16": bf16 compute, float32 parameters

  config.batch_size = 1                # global, split over all devices
  config.num_epochs = 200              # in all: num_epochs - decay_epochs constant, then decay
  config.decay_epochs = 100
  config.learning_rate = 2e-4
  config.beta1 = 0.5
  config.beta2 = 0.999
  config.gan_loss = "lsgan"            # or "bce"
  config.lambda_a = 10.0               # cycle A -> B -> A
  config.lambda_b = 10.0               # cycle B -> A -> B
  config.lambda_identity = 0.5         # identity terms weigh lambda_identity * lambda_{a,b}
  config.pool_size = 50                # generated images each discriminator draws from; 0: none

  # Mild on-device jitter, as configs/pix2pix.py (the reference's resize-and-crop + flip is not
  # used: chest radiographs are not left-right symmetric).
  config.augment = ml_collections.ConfigDict(dict(
      enabled=True, crop_scale=(0.85, 1.0), max_rotate_deg=0.0, max_translate=0.03,
      brightness=0.0, contrast=0.0, hflip=False))

  config.num_devices = 0               # 0: all devices
  config.multihost = False
  config.steps_per_call = 100          # steps per compiled call (lax.scan)
  config.log_every = 1000
  config.sample_every = 5000
  config.checkpoint_every = 10000
  config.keep_checkpoints = 3
  config.num_samples = 4

  if variant == "cpu":
    # 20 epochs, 10 of them decaying: 1,160 steps on the synthetic default at scale 0.25 (~234
    # normal training images, 58 steps an epoch), 2,100 on ../shared/data/cxr-real-dev's 420
    # normals, where 4 epochs had G translate only part of the way (docs/translation.md). A step
    # (both generators and discriminators, 2 residual blocks) takes about 0.3 s on 2 cores.
    config.name = "cyclegan-cpu"
    config.data.image_size = 64
    config.data.synthetic_scale = 0.25
    config.model.ngf = 16
    config.model.ndf = 16
    config.model.n_blocks = 2
    config.batch_size = 4
    config.num_epochs = 20
    config.decay_epochs = 10
    config.steps_per_call = 10
    config.log_every = 100
    config.sample_every = 500
    config.checkpoint_every = 500
  elif variant == "smoke":
    config.name = "cyclegan-smoke"
    config.data.image_size = 32
    config.data.synthetic_scale = 0.02
    config.model.ngf = 4
    config.model.ndf = 4
    config.model.n_blocks = 1
    config.batch_size = 4
    config.num_epochs = 3
    config.decay_epochs = 1
    config.pool_size = 6
    config.steps_per_call = 2
    config.log_every = 4
    config.sample_every = 4
    config.checkpoint_every = 4
    config.keep_checkpoints = 2
    config.num_samples = 2
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/cyclegan.py; use "
                     f"{', '.join(map(repr, VARIANTS))}")
  return config
