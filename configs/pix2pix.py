"""pix2pix normal -> COVID-19 translator.

  python main.py --config=configs/pix2pix.py --config.data.data_dir=/path/to/COVID-19_Radiography_Database
  python main.py --config=configs/pix2pix.py:cpu      # learns on the synthetic data on 2 CPU cores
  python main.py --config=configs/pix2pix.py:smoke    # seconds; used by the tests

Default: the paper's settings (256 px, batch 1, 100 epochs: 50 at constant learning rate, 50 of
linear decay to zero), on the real database when data.data_dir is set, else the synthetic default.
"""

import ml_collections

from cxr_jax import configlib


# The variants (`--config=...:<variant>`), the default first; `cxr-jax --help` lists them.
VARIANTS = ("", "cpu", "smoke")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "pix2pix"
  config.name = "pix2pix"
  config.seed = 0
  config.data = configlib.data_config()
  config.source_class = "NORMAL"
  config.target_class = "COVID"

  config.model = ml_collections.ConfigDict()
  config.model.ngf = 64
  config.model.ndf = 64
  config.model.n_layers_d = 3
  config.model.norm = "batch"          # or "instance"
  config.model.use_dropout = True      # dropout 0.5 in the three innermost decoder levels
  config.model.inference_norm = "instance"  # pix2pix test mode; "running" for running averages
  config.compute_dtype = "float32"     # "bfloat16": bf16 compute, float32 parameters

  config.batch_size = 1                # global, split over all devices
  config.num_epochs = 100
  config.decay_epochs = 50
  config.learning_rate = 2e-4
  config.beta1 = 0.5
  config.beta2 = 0.999
  config.gan_loss = "bce"              # or "lsgan"
  config.l1_weight = 100.0
  config.flat_optimizer = True         # Adam over one flat buffer: fewer, larger update kernels

  # Mild on-device jitter (random crop-and-resize, small shift); no flips, no intensity changes.
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
    config.name = "pix2pix-cpu"
    config.data.image_size = 64
    config.data.synthetic_scale = 0.25
    config.model.ngf = 16
    config.model.ndf = 16
    config.batch_size = 4
    config.num_epochs = 20
    config.decay_epochs = 10
    config.steps_per_call = 25
    config.log_every = 100
    config.sample_every = 500
    config.checkpoint_every = 500
  elif variant == "smoke":
    config.name = "pix2pix-smoke"
    config.data.image_size = 32
    config.data.synthetic_scale = 0.02
    config.model.ngf = 4
    config.model.ndf = 4
    config.batch_size = 4
    config.num_epochs = 3
    config.decay_epochs = 1
    config.steps_per_call = 2
    config.log_every = 4
    config.sample_every = 4
    config.checkpoint_every = 4
    config.keep_checkpoints = 2
    config.num_samples = 2
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/pix2pix.py; use "
                     f"{', '.join(map(repr, VARIANTS))}")
  return config
