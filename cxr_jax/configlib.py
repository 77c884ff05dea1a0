"""Config blocks shared by every config file, and the checks that turn bad values into clear errors.

Config files in `configs/` build their `ConfigDict` from these blocks so that every task reads the
data the same way and a split made by one task is the split every other task sees.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import types
from typing import Any

import ml_collections

from cxr_jax.errors import ConfigError

# The paper's three classes. `LUNG_OPACITY` (later releases) can be added with
# --config.data.classes; a user's own class folders are named there too (any names, see
# cxr_jax/data/classes.py).
PAPER_CLASSES = ("COVID", "NORMAL", "VIRAL_PNEUMONIA")


def data_config(**overrides: Any) -> ml_collections.ConfigDict:
  """The `config.data` block: where the radiographs come from and how they are split."""
  cfg = ml_collections.ConfigDict()
  # Folder or Kaggle zip of the COVID-19 Radiography Database. Empty: the embedded synthetic set.
  cfg.data_dir = ""
  # Where prepared (array_record) datasets and the generated synthetic set are cached.
  # Empty: $CXR_JAX_CACHE, else ~/.cache/cxr_jax.
  cfg.cache_dir = ""
  cfg.image_size = 256
  # Class names (order = label ids): the database's spellings map to its classes, any other name
  # is a class of its own, read from the folder of that name (or the labels CSV's label column).
  # "auto": every class folder (or CSV label) found, sorted by name.
  cfg.classes = PAPER_CLASSES
  # A CSV with header file,label then any of split, patient_id (or group), age, sex, view, source
  # and other metadata columns (file relative to data_dir, or absolute): labels, metadata and the
  # split when given come from it instead of class folders and the seeded split. Empty: folders.
  # With patient ids (or DICOM PatientID) the split keeps each patient in one split.
  cfg.labels_csv = ""
  # True: a patient's images must all carry one label (a second label is an error naming the line).
  cfg.labels_per_patient = False
  # Views kept when an image says its view (DICOM ViewPosition, the CSV's view column); others are
  # skipped and counted. Empty: every view.
  cfg.views = ("PA", "AP")
  # Non-square images: "squash" to the square (the paper's inputs) or "pad" (aspect kept, black).
  cfg.resize = "squash"
  # Stratified train / validation / test fractions (see README: 70/10/20 keeps ~44 real COVID
  # test images at the first release's 219 COVID images, enough for a usable confidence interval).
  cfg.split_fractions = (0.7, 0.1, 0.2)
  cfg.split_seed = 0
  # Near-duplicate (perceptual hash) pairs across train and test: always reported in the split
  # manifest; dropped from the test split when True.
  cfg.drop_near_duplicates = False
  # The embedded synthetic default: class counts 219 : 1,341 : 1,345 (the first release) times
  # `synthetic_scale`, rendered at `image_size`.
  cfg.synthetic_scale = 1.0
  cfg.synthetic_seed = 0
  # Fraction of width and height blacked out in the centre of every image the classifier sees
  # (training and test alike, on the device; the lungs-hidden control row): 0 = nothing hidden.
  cfg.hide_center = 0.0
  # Where the training images live: "device" (resident on every device, each step's batch drawn
  # there: the fast path), "stream" (read from the prepared array_record copy step by step on
  # `stream_threads` threads, `stream_prefetch` batches ahead: data larger than the device or
  # host), or "auto": "device" when all the images take at most `placement_share` of one device's
  # memory (a CPU: of the host's), else "stream". Both train on the same batches.
  cfg.placement = "auto"
  cfg.placement_share = 0.25
  cfg.stream_threads = 4
  cfg.stream_prefetch = 8
  cfg.update(overrides)
  return cfg


def translator_config(name: str) -> ml_collections.ConfigDict:
  """What every translator's config holds (`configs/<name>.py` extends it): the `translator` task
  of `cxr_jax.training.<name>`, normal -> COVID, the reference's optimiser, schedule and
  PatchGAN, mild augmentation, logging and checkpoints. A translator's file sets its own keys and
  its variants with `translator_variant`."""
  config = ml_collections.ConfigDict()
  config.task = "translator"
  config.translator = name             # the module cxr_jax/training/<name>.py
  config.name = name
  config.seed = 0
  config.data = data_config()
  config.source_class = "NORMAL"       # domain A
  config.target_class = "COVID"        # domain B

  config.model = ml_collections.ConfigDict()
  config.model.generator = "resnet"    # or "unet" (models/build.py)
  config.model.ngf = 64
  config.model.ndf = 64
  config.model.n_layers_d = 3          # 70x70 PatchGAN
  config.model.norm = "instance"       # or "batch"
  config.model.use_dropout = False
  config.compute_dtype = "float32"     # "bfloat16": bf16 compute, float32 parameters

  config.batch_size = 1                # global, split over all devices
  config.num_epochs = 200              # in all: num_epochs - decay_epochs constant, then decay
  config.decay_epochs = 100
  config.learning_rate = 2e-4
  config.beta1 = 0.5
  config.beta2 = 0.999
  config.gan_loss = "lsgan"            # or "bce"

  # Mild on-device jitter (random crop-and-resize, small shift); no flips (chest radiographs are
  # not left-right symmetric), no intensity changes.
  config.augment = ml_collections.ConfigDict(dict(
      enabled=True, crop_scale=(0.85, 1.0), max_rotate_deg=0.0, max_translate=0.03,
      brightness=0.0, contrast=0.0, hflip=False))

  config.num_devices = 0               # 0: all devices
  config.multihost = False
  config.steps_per_call = 100          # steps per compiled call
  config.log_every = 1000
  config.sample_every = 5000
  config.checkpoint_every = 10000
  config.keep_checkpoints = 3
  config.num_samples = 4
  return config


# The variants every translator has: `cpu` learns on 2 CPU cores at 64 px (synthetic default at
# scale 0.25, or real data), `smoke` runs in seconds for the tests.
TRANSLATOR_VARIANTS = {
    "cpu": {"data.image_size": 64, "data.synthetic_scale": 0.25, "model.ngf": 16,
            "model.ndf": 16, "batch_size": 4, "num_epochs": 20, "decay_epochs": 10,
            "log_every": 100, "sample_every": 500, "checkpoint_every": 500},
    "smoke": {"data.image_size": 32, "data.synthetic_scale": 0.02, "model.ngf": 4,
              "model.ndf": 4, "batch_size": 4, "num_epochs": 3, "decay_epochs": 1,
              "steps_per_call": 2, "log_every": 4, "sample_every": 4, "checkpoint_every": 4,
              "keep_checkpoints": 2, "num_samples": 2},
}


def translator_variant(config: ml_collections.ConfigDict, variant: str,
                       **own: dict[str, Any]) -> ml_collections.ConfigDict:
  """`config` with variant `variant` applied: the shared settings of `TRANSLATOR_VARIANTS` (if
  any), then the file's own `{dotted key: value}` for that variant (`own[variant]`). '' is the
  default; a variant neither shared nor the file's own is refused."""
  if not variant:
    return config
  if variant not in TRANSLATOR_VARIANTS and variant not in own:
    known = ", ".join(repr(v) for v in ("", *TRANSLATOR_VARIANTS, *own))
    raise ValueError(f"unknown variant {variant!r} of configs/{config.translator}.py; use {known}")
  config.name = f"{config.translator}-{variant}"
  for key, value in {**TRANSLATOR_VARIANTS.get(variant, {}), **own.get(variant, {})}.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def load_config_module(path: str | os.PathLike) -> types.ModuleType:
  """A config file as a module: its `get_config(variant)` and `VARIANTS` (the default first)."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"cxr_jax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(path: str | os.PathLike, variant: str = "") -> ml_collections.ConfigDict:
  """`get_config(variant)` of a config file, loaded by path (as `--config=path:variant` does)."""
  module = load_config_module(path)
  return module.get_config(variant) if variant else module.get_config()


def require(condition: bool, key: str, message: str) -> None:
  """Raises a ConfigError naming `key` unless `condition` holds."""
  if not condition:
    raise ConfigError(f"config.{key}: {message}")


def require_positive_int(cfg: ml_collections.ConfigDict, key: str) -> int:
  """Reads `cfg.<key>` (dotted) and checks it is an int > 0."""
  value = get_dotted(cfg, key)
  require(isinstance(value, int) and not isinstance(value, bool) and value > 0, key,
          f"must be a positive integer, got {value!r}")
  return value


def compute_dtype(name: str, key: str = "compute_dtype"):
  """'float32' or 'bfloat16' -> the jnp dtype a model computes in (parameters stay float32)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  require(name in dtypes, key, f"{name!r} is not 'float32' or 'bfloat16'")
  return dtypes[name]


def get_dotted(cfg: ml_collections.ConfigDict, key: str) -> Any:
  node = cfg
  for part in key.split("."):
    if part not in node:
      raise ConfigError(f"config.{key}: missing (no key {part!r})")
    node = node[part]
  return node


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
  """Flattens a (nested) ConfigDict into {'a.b': value}, for diffs and logging."""
  out: dict[str, Any] = {}
  items = cfg.items() if hasattr(cfg, "items") else []
  for k, v in items:
    key = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def diff(a: Any, b: Any) -> list[str]:
  """Keys (dotted) whose values differ between two configs."""
  fa, fb = flatten(a), flatten(b)
  return [k for k in sorted(set(fa) | set(fb)) if fa.get(k, "<missing>") != fb.get(k, "<missing>")]
