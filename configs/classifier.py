"""ResNet-50 classifier (COVID / normal / viral pneumonia) on original or enhanced data.

  python main.py --config=configs/classifier.py                      # from scratch (default)
  python main.py --config=configs/classifier.py:transfer --config.pretrained=/path/resnet50.safetensors
  python main.py --config=configs/classifier.py --config.train_data=enhanced \
      --config.synthetic_dir=runs/synthesize/synthetic
  python main.py --config=configs/classifier.py:smoke               # seconds; used by the tests

Transfer learning reads ImageNet weights from the user's disk only: torchvision / timm ResNet-50
(`.safetensors`, or `.pth` with torch installed) or the Keras application weights (`.h5`).
"""

import ml_collections

from cxr_jax import configlib


# The variants (`--config=...:<variant>`), the default first; `cxr-jax --help` lists them.
VARIANTS = ("scratch", "transfer", "smoke")


def get_config(variant: str = "scratch") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "classifier"
  config.name = "classifier"
  config.seed = 0
  config.data = configlib.data_config()

  config.train_data = "original"       # or "enhanced"
  config.synthetic_dir = ""            # the synthesize task's output, for "enhanced"
  config.pretrained = ""               # ImageNet ResNet-50 weights file, for transfer learning

  config.model = ml_collections.ConfigDict()
  config.model.stage_sizes = (3, 4, 6, 3)   # ResNet-50
  config.model.width = 64
  config.model.variant = "v1.5"        # for scratch; transfer follows the weights file
  config.model.in_channels = 1         # grayscale; with weights, the first conv is summed over RGB
  config.compute_dtype = "bfloat16"    # bf16 compute, float32 parameters and losses

  config.image_size = 224              # network input, cropped / resized from data.image_size
  config.batch_size = 64
  config.eval_batch_size = 128
  config.num_epochs = 30
  config.train_steps = 0               # the budget in optimizer steps; 0: num_epochs passes
  config.optimizer = "sgd"             # or "adamw"
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.warmup_epochs = 2
  config.label_smoothing = 0.0
  config.class_weighted_loss = False   # classical imbalance baseline
  config.freeze_backbone_epochs = 0    # linear probe first, then fine-tune
  config.augment = ml_collections.ConfigDict(dict(
      crop_scale=(0.75, 1.0), max_rotate_deg=10.0, max_translate=0.05, brightness=0.1,
      contrast=0.1, hflip=False))

  # A row's seeds (the experiment) trained as one compiled program: 'auto' (vmap over the seed axis
  # on GPUs / TPUs; on a CPU one run after another, as fast there), 'map' (lax.map: bitwise the
  # runs alone), 'vmap', or 'off'. docs/performance.md has the measurement behind the default.
  config.seeds_in_one_program = "auto"
  config.num_devices = 0
  config.multihost = False
  config.steps_per_call = 10
  config.log_every = 50
  config.keep_checkpoints = 2
  config.num_gradcam = 4               # test images per class shown with Grad-CAM
  # Share of Grad-CAM mass inside this central fraction of the image, averaged over the test
  # images (metrics.json: gradcam_center_share; docs/shortcuts.md); 0: not measured.
  config.saliency_center = 0.8
  # Radiographs from elsewhere (a folder / zip / labels CSV in any layout config.data.data_dir
  # takes), with the run's classes: only predicted (external_metrics.json), never split, trained
  # on or used to choose anything; images also in the run's data are left out. Empty: none.
  config.external_test_dir = ""
  config.n_bootstrap = 1000
  # Metadata columns whose subgroups get their own accuracy and recall with exact CIs in the test
  # report, e.g. ("sex", "age_band", "view", "source"); age_band is age by decade.
  config.subgroups = ()

  if variant == "scratch":
    pass
  elif variant == "transfer":
    config.name = "classifier-transfer"
    config.learning_rate = 0.01
    config.num_epochs = 15
    config.freeze_backbone_epochs = 1
  elif variant == "smoke":
    config.name = "classifier-smoke"
    config.data.image_size = 32
    config.data.synthetic_scale = 0.02
    config.model.stage_sizes = (1, 1, 1, 1)
    config.model.width = 4
    config.compute_dtype = "float32"
    config.image_size = 32
    config.batch_size = 8
    config.eval_batch_size = 16
    config.num_epochs = 2
    config.warmup_epochs = 1
    config.learning_rate = 0.01
    config.steps_per_call = 2
    config.log_every = 2
    config.num_gradcam = 1
    config.n_bootstrap = 50
  else:
    raise ValueError(f"unknown variant {variant!r} of configs/classifier.py; use "
                     f"{', '.join(map(repr, VARIANTS))}")
  return config
