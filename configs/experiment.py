"""The paper's whole experiment: split, pix2pix, synthesis, classifiers, report.

  python main.py --config=configs/experiment.py:demo     # synthetic data, small; <= 15 min on 2 CPU cores
  python main.py --config=configs/experiment.py:paper --config.data.data_dir=/data/COVID-19_Radiography_Database \
      --config.pretrained=/weights/resnet50-11ad3fa6.safetensors     # GPU / TPU
  python main.py --config=configs/experiment.py:smoke    # seconds; used by the tests

Re-running the same command skips finished stages and resumes an interrupted one.
The report is <workdir>/report.md (and report.json, report.csv); docs/experiment.md explains the
rows, the controls and the statistics.

Keys of its own (the stage blocks synthesize / classifier and one block per translator config file
-- configs/<name>.py built on configlib.translator_config() -- are those of their config files,
without their data block: every stage uses config.data):
  seeds                classifier seeds of every row (what else varies: translator_per_seed)
  translators          translators whose enhanced rows are run (any translator config's name, e.g.
                       --config.translators='("pix2pix","cyclegan","cut")'), each trained in
                       translators/<name> and synthesising into synthesize/<name>
  translator_per_seed  False: one translator, one synthesis and one set of augmented copies for
                       all seeds; True: re-trained and re-synthesised per seed (translators/
                       <name>-seed<s>), so the GAN's own variance counts in the spread
  pretrained           ImageNet ResNet-50 weights file: enables the transfer rows (else skipped)
  transfer             what the transfer rows change relative to the scratch rows
  synthesize.num_synthetic  "balance" (default in every variant: the target class topped up to
                       the largest class, the paper's stated aim) or a count, e.g. the paper's
                       literal --config.synthesize.num_synthetic=1100; the oversampled control
                       adds as many augmented copies
"""

import pathlib

import ml_collections

from cxr_jax import configlib


def _sibling(name: str, variant: str) -> ml_collections.ConfigDict:
  return configlib.load_config_file(pathlib.Path(__file__).with_name(f"{name}.py"), variant)


def _translator_blocks(variant: str) -> dict[str, ml_collections.ConfigDict]:
  """configs/<name>.py's `variant` for every translator config file in this folder."""
  blocks = {}
  for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
    if path.stem != "experiment" and configlib.load_config_file(path).get("task") == "translator":
      blocks[path.stem] = configlib.load_config_file(path, variant)
  return blocks


def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
  base = {"paper": "", "demo": "", "smoke": "smoke"}
  if variant not in base:
    raise ValueError(f"unknown variant {variant!r} of configs/experiment.py; use 'paper', 'demo' "
                     "or 'smoke'")
  config = ml_collections.ConfigDict()
  config.task = "experiment"
  config.name = f"experiment-{variant}"
  config.multihost = False
  config.data = configlib.data_config()
  config.seeds = (0, 1, 2)
  config.pretrained = ""               # ImageNet ResNet-50 weights: enables the transfer rows
  config.translators = ("pix2pix", "cyclegan")   # one enhanced row each (cxr_jax/training/<name>)
  config.translator_per_seed = False   # True: re-train each translator and re-synthesise per seed
  translator_blocks = _translator_blocks({"paper": "", "demo": "cpu", "smoke": "smoke"}[variant])
  config.update(translator_blocks)
  config.synthesize = _sibling("synthesize", base[variant])
  config.synthesize.num_synthetic = "balance"   # the paper's aim; its literal count: "1100"
  config.classifier = _sibling("classifier", "smoke" if variant == "smoke" else "scratch")
  transfer = _sibling("classifier", "transfer")
  # What the transfer rows change relative to the scratch rows.
  config.transfer = ml_collections.ConfigDict(dict(
      learning_rate=transfer.learning_rate, num_epochs=transfer.num_epochs,
      freeze_backbone_epochs=transfer.freeze_backbone_epochs))
  for block in (*(config[name] for name in translator_blocks), config.synthesize,
                config.classifier):
    del block["data"]                  # every stage uses config.data

  if variant == "paper":
    config.data.drop_near_duplicates = True   # near copies across train / test inflate accuracy
  elif variant == "demo":
    # Every row on 2 CPU cores in <= 15 minutes (README): 64 px data (the U-Net needs a power of
    # two), 48 px classifier input, small networks, few epochs.
    config.data.image_size = 64
    config.data.synthetic_scale = 0.25
    config.seeds = (0, 1, 2)
    p = config.pix2pix
    p.model.ngf, p.model.ndf = 16, 16
    p.batch_size, p.num_epochs, p.decay_epochs = 4, 8, 4
    p.steps_per_call, p.log_every, p.sample_every, p.checkpoint_every = 25, 100, 200, 200
    # config.cyclegan is configs/cyclegan.py:cpu as it stands (20 epochs, 1,160 steps here): fewer
    # epochs translate only part of the way on real radiographs (docs/translation.md).
    c = config.classifier
    c.model.stage_sizes, c.model.width = (1, 1, 1, 1), 16
    c.compute_dtype = "float32"
    c.image_size, c.batch_size, c.eval_batch_size = 48, 32, 128
    c.num_epochs, c.warmup_epochs, c.learning_rate = 6, 1, 0.05
    c.steps_per_call, c.log_every = 10, 50
    c.n_bootstrap, c.num_gradcam = 300, 2
    config.transfer.num_epochs = 4
  elif variant == "smoke":
    config.data.image_size = 32
    config.data.synthetic_scale = 0.02
    config.seeds = (0,)
    config.transfer.num_epochs = 2
  return config
