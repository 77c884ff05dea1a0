"""The paper's whole experiment: split, pix2pix, synthesis, classifiers, report.

  python main.py --config=configs/experiment.py:demo     # synthetic data, small; <= 15 min on 2 CPU cores
  python main.py --config=configs/experiment.py:paper --config.data.data_dir=/data/COVID-19_Radiography_Database \
      --config.pretrained=/weights/resnet50-11ad3fa6.safetensors     # GPU / TPU
  python main.py --config=configs/experiment.py:smoke    # seconds; used by the tests
  python main.py --config=configs/experiment.py:matched --config.data.data_dir=../shared/data/cxr-real-dev
      # one population per comparison: :demo with only COVID and NORMAL (docs/shortcuts.md)

Re-running the same command skips finished stages and resumes an interrupted one.
The report is <workdir>/report.md (and report.json, report.csv); docs/experiment.md explains the
rows, the controls and the statistics.

Keys of its own (the stage blocks synthesize / classifier and one block per translator config file
-- configs/<name>.py built on configlib.translator_config() -- are those of their config files,
without their data block: every stage uses config.data):
  seeds                classifier seeds of every row (what else varies: translator_per_seed)
  splits               number of stratified splits (seeds data.split_seed + k), each with its own
                       translators and classifiers; with more than one, split k runs in
                       <workdir>/split<k>/ and the report pools the test images of all of them
  primary_comparison   (A, B): the two rows whose comparison answers the question, declared
                       before the run; every other comparison is Holm-corrected
  classifier.train_steps  0 (default): every row of one initialisation trains the optimizer steps
                       of num_epochs passes over the original training split; or a fixed count
  translators          translators whose enhanced rows are run (any translator config's name, e.g.
                       --config.translators='("pix2pix","cyclegan","cut")'), each trained in
                       translators/<name> and synthesising into synthesize/<name>
  translator_per_seed  False: one translator, one synthesis and one set of augmented copies for
                       all seeds; True: re-trained and re-synthesised per seed (translators/
                       <name>-seed<s>), so the GAN's own variance counts in the spread
  pretrained           ImageNet ResNet-50 weights file: enables the transfer rows (else skipped)
  lungs_hidden         the lungs-hidden control row: the original row with this central fraction
                       of width and height blacked out in every training and test image
                       (data.hide_center); 0: no such row (docs/shortcuts.md)
  external_test_dir    radiographs from elsewhere (folder, zip or labels CSV, the run's classes):
                       every row's classifiers are also evaluated on them (report: "external");
                       never split, trained on or used to choose anything
  classifier.saliency_center  the central fraction whose Grad-CAM share each row reports
  classifier.subgroups  metadata columns (e.g. ("sex", "age_band")) whose subgroups get their own
                       accuracy per row in the report (labels CSV / DICOM metadata)
  transfer             what the transfer rows change relative to the scratch rows
  synthesize.num_synthetic  "balance" (default in every variant: the target class topped up to
                       the largest class, the paper's stated aim) or a count, e.g. the paper's
                       literal --config.synthesize.num_synthetic=1100; the oversampled control
                       adds as many augmented copies
"""

import pathlib

import ml_collections

from cxr_jax import configlib


# The variants (`--config=...:<variant>`), the default first; `cxr-jax --help` lists them.
VARIANTS = ("paper", "demo", "smoke", "matched")


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
  base = {"paper": "", "demo": "", "smoke": "smoke", "matched": ""}
  if variant not in base:
    raise ValueError(f"unknown variant {variant!r} of configs/experiment.py; use "
                     f"{', '.join(map(repr, VARIANTS))}")
  config = ml_collections.ConfigDict()
  config.task = "experiment"
  config.name = f"experiment-{variant}"
  config.multihost = False
  config.data = configlib.data_config()
  config.seeds = (0, 1, 2)
  config.splits = 5 if variant == "paper" else 1
  config.primary_comparison = ("original", "enhanced-cyclegan")
  config.pretrained = ""               # ImageNet ResNet-50 weights: enables the transfer rows
  config.translators = ("pix2pix", "cyclegan")   # one enhanced row each (cxr_jax/training/<name>)
  config.translator_per_seed = False   # True: re-train each translator and re-synthesise per seed
  config.lungs_hidden = 0.8            # the lungs-hidden row's hidden central fraction; 0: no row
  config.external_test_dir = ""        # an external test set (docs/shortcuts.md); empty: none
  translator_blocks = _translator_blocks({"paper": "", "demo": "cpu", "smoke": "smoke",
                                          "matched": "cpu"}[variant])
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
  del config.classifier["external_test_dir"]    # config.external_test_dir, loaded once

  if variant == "paper":
    config.data.drop_near_duplicates = True   # near copies across train / test inflate accuracy
  elif variant in ("demo", "matched"):
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
    if variant == "matched":
      # One population per comparison: only classes whose images come from the same population
      # (e.g. cxr-real-dev: adult COVID and adult RSNA normals; its pediatric viral pneumonia
      # is left out), so the translator changes the lungs, not the age. Which classes qualify
      # is the data's to say: nothing here can check it (docs/shortcuts.md).
      config.data.classes = ("COVID", "NORMAL")
  elif variant == "smoke":
    config.data.image_size = 32
    config.data.synthetic_scale = 0.02
    config.seeds = (0,)
    config.transfer.num_epochs = 2
  return config
