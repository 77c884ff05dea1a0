"""The translator contract: what every image translator (pix2pix, CycleGAN, CUT, ...) provides,
what they share, and the task that trains any of them.

A translator is one module `cxr_jax/training/<name>.py` whose `TRANSLATOR` is a subclass of
`Translator`; `find(name)` imports it by name (as big_vision finds its models), so adding one edits
nothing else. `Translator` is a `fit.Trainer` that holds what every translator does the same way:
the config checks they share, the Adam optimiser on the constant-then-linear-decay schedule, the
on-device augmentation, the batch of a step (source images in the seeded epoch order, target
images drawn uniformly: `gan.source_target_indices`, augmented by `gan.source_target_inputs`), the sample grids through the exported-model
path, and the export of the generator (the one network synthesis needs) with its metadata. A
subclass provides what is its own (the abstract methods below): its config checks, its networks,
its state and its update.

`train(cls, config, workdir)` is the task every translator runs: it checks the config, reads the
source and target training images, builds the trainer, fits it (`fit.fit`) and loads the exported
generator.
"""

from __future__ import annotations

import abc
import importlib
import pathlib
import re
from typing import Any, Callable, ClassVar

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from cxr_jax import configlib
from cxr_jax import workdir as workdir_lib
from cxr_jax.data import classes as classes_lib
from cxr_jax.data import dataset
from cxr_jax.errors import ConfigError
from cxr_jax.errors import UserError
from cxr_jax.models import build
from cxr_jax.training import augment as augment_lib
from cxr_jax.training import export
from cxr_jax.training import fit
from cxr_jax.training import gan
from cxr_jax.training import loop
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training import stream as stream_lib
from cxr_jax.training.fit import NetState
from cxr_jax.training.functional import Functional
from cxr_jax.training.summary import SummaryWriter
from cxr_jax.utils import grid

GENERATOR_DIR = "generator"   # where a translator exports its generator, in its workdir
PACKAGE = "cxr_jax.training"


class Translator(abc.ABC):
  """The contract of an image translator and its shared part (see the module docstring)."""
  name: ClassVar[str]                 # the module's name; the export's `translator`
  sample_tag: ClassVar[str] = "samples/source_translated_target"
  # Config keys whose values set the memory a step needs (named when the device runs out).
  memory_keys: ClassVar[tuple[str, ...]] = ("batch_size", "data.image_size", "model.ngf")
  # Config keys every translator of this kind needs to be positive integers.
  positive_keys: ClassVar[tuple[str, ...]] = (
      "batch_size", "num_epochs", "steps_per_call", "log_every", "checkpoint_every",
      "sample_every", "keep_checkpoints", "model.ngf", "model.ndf", "model.n_layers_d")

  def __init__(self, config: ml_collections.ConfigDict, *, image_size: int, steps_per_epoch: int,
               mesh: jax.sharding.Mesh, channels: int = 1,
               samples: tuple[np.ndarray, np.ndarray] | None = None,
               sample_dir: pathlib.Path | None = None):
    self.config, self.mesh, self.channels = config, mesh, channels
    self.image_size, self.steps_per_epoch = image_size, steps_per_epoch
    self.batch_size = config.batch_size
    self.schedule = gan.constant_then_linear_decay(
        config.learning_rate, config.num_epochs * steps_per_epoch,
        config.decay_epochs * steps_per_epoch)
    self.tx = self.optimizer()
    self.augment = (augment_lib.AugmentSpec.from_config(config.augment, image_size)
                    if config.augment.enabled else None)
    self._batch = mesh_lib.batch_sharding(mesh)
    self.gen = self.build_networks()
    self.generator = export.Exported(self.export_meta(), self.gen, None, None, mesh)
    # Sample grids of (source image, translated, a real target image) rows, when given.
    self.sampler = None if samples is None else SampleGrid(
        self.generator, lambda st: (self.generator_state(st).params,
                                    self.generator_state(st).stats),
        samples[0], samples[1:], sample_dir, self.sample_tag)

  # ----------------------------------------------------------------- what a translator provides

  @classmethod
  @abc.abstractmethod
  def check_own_config(cls, config: ml_collections.ConfigDict) -> None:
    """Raises a ConfigError naming the key of a bad value among the translator's own keys."""

  @abc.abstractmethod
  def build_networks(self) -> Functional:
    """Builds the networks (kept on `self`) and returns the generator's `Functional`, which the
    export and the sample grids run."""

  @abc.abstractmethod
  def init_state(self) -> Any:
    """The training state: a `flax.struct.dataclass` with `step`, `rng` and a `NetState` per
    network."""

  @abc.abstractmethod
  def update(self, state: Any, source: jax.Array, target: jax.Array,
             key: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
    """One optimisation step on a batch of float images in [-1, 1]; `key` is the step's own
    noise (dropout, pools, patch draws). Returns (state with step + 1, scalar metrics)."""

  @abc.abstractmethod
  def generator_state(self, state: Any) -> NetState:
    """The `NetState` of the exported generator."""

  def generator_arch(self) -> dict:
    """The export's `arch` (see models/build.py)."""
    return build.generator_arch(self.config.model)

  def inference(self) -> str:
    """How the export runs (export.py): 'eval' when train and test modes agree (instance norm, no
    dropout), else pix2pix's test mode ('instance')."""
    model = self.config.model
    return "eval" if model.norm == "instance" and not model.use_dropout else "instance"

  # ----------------------------------------------------------------------- what they share

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The checks every translator's config passes (schedule, optimiser, adversarial loss, dtype,
    generator and its image size, classes), then the translator's own; returns a copy whose
    source / target classes are canonically spelt ('Healthy' -> 'HEALTHY')."""
    for key in cls.positive_keys:
      configlib.require_positive_int(config, key)
    configlib.require(0 <= config.decay_epochs <= config.num_epochs, "decay_epochs",
                      f"must be between 0 and num_epochs ({config.num_epochs}), "
                      f"got {config.decay_epochs}")
    configlib.require(config.learning_rate > 0, "learning_rate", "must be > 0")
    configlib.require(config.gan_loss in gan.GAN_LOSSES, "gan_loss",
                      f"{config.gan_loss!r} is not 'bce' or 'lsgan'")
    configlib.compute_dtype(config.compute_dtype)
    build.check_generator_size(build.generator_arch(config.model), config.data.image_size)
    cls.check_own_config(config)
    config = config.copy_and_resolve_references()
    for key in ("source_class", "target_class"):
      config[key] = classes_lib.member(config[key], config.data.classes, key)
    configlib.require(config.source_class != config.target_class, "target_class",
                      f"must differ from source_class ({config.source_class})")
    return config

  def optimizer(self) -> optax.GradientTransformation:
    """Adam on the schedule, each network its own (Adam is elementwise: one Adam over several
    networks' chained parameters, as the reference's, is the same update)."""
    return optax.adam(self.schedule, b1=self.config.beta1, b2=self.config.beta2)

  def batch_indices(self, rng: jax.Array, step: jax.Array,
                    sizes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The (source, target) image indices of `step` (`fit.Trainer`): source by the epoch order,
    target uniformly."""
    return gan.source_target_indices(rng, step, sizes[0], sizes[1], batch_size=self.batch_size,
                                     steps_per_epoch=self.steps_per_epoch)

  def train_on_batch(self, state: Any, batch: tuple[jax.Array, jax.Array]):
    """One step on the uint8 (source, target) images of `state.step`: augmented on the device,
    then `update`."""
    source, target, key = gan.source_target_inputs(state.rng, state.step, *batch,
                                                   augment=self.augment, sharding=self._batch)
    return self.update(state, source, target, key)

  def train_step(self, state: Any, data: tuple[jax.Array, jax.Array]):
    return fit.resident_step(self, state, data)

  def hook(self, step: int, state: Any, writer: SummaryWriter) -> None:
    """Every `sample_every` steps: a PNG grid of source | translated | a real target image."""
    if self.sampler is not None:
      self.sampler(step, state, writer)

  def export_meta(self) -> dict:
    cfg = self.config
    return {"kind": export.GENERATOR, "translator": self.name,
            "arch": self.generator_arch(), "image_size": self.image_size,
            "channels": self.channels, "compute_dtype": cfg.compute_dtype,
            "inference": self.inference(),
            "source_class": cfg.source_class, "target_class": cfg.target_class,
            "model": cfg.model.to_dict()}

  def export(self, workdir: pathlib.Path, state: Any, step: int) -> None:
    """The generator's parameters and batch statistics (no optimiser state, no other network):
    what synthesis loads."""
    meta = dict(self.export_meta(), step=int(step), workdir=str(workdir),
                split_manifest=str(workdir / "split_manifest.csv"))
    net = self.generator_state(state)
    export.save(workdir / GENERATOR_DIR, net.params, net.stats, meta, self.config)
    logging.info("Exported the %s generator to %s", self.name, workdir / GENERATOR_DIR)


# ------------------------------------------------------------------------------ sample grids


def sample_rows(seed: int, count: int, inputs: np.ndarray,
                reals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The fixed rows of the sample grids: `count` distinct inputs, each beside a random real image
  of the target class."""
  rng = np.random.default_rng(seed)
  count = min(count, len(inputs))
  return (inputs[np.sort(rng.choice(len(inputs), count, replace=False))],
          reals[rng.integers(0, len(reals), count)])


class SampleGrid:
  """A training hook: a PNG grid (and TensorBoard image) of input | translated | `extra` columns,
  translated through the exported-model path with the state's current generator weights."""

  def __init__(self, generator: export.Exported, weights: Callable[[Any], tuple[Any, Any]],
               inputs: np.ndarray, extra: tuple[np.ndarray, ...], out_dir: pathlib.Path,
               tag: str):
    self.generator, self.weights, self.inputs, self.extra = generator, weights, inputs, extra
    self.out_dir, self.tag = out_dir, tag

  def __call__(self, step: int, state: Any, writer: SummaryWriter) -> None:
    fake = self.generator.with_weights(*self.weights(state)).translate(
        self.inputs, seed=0, batch_size=len(self.inputs))
    if not workdir_lib.is_writer():
      return
    image = grid.tile(np.stack([self.inputs, fake, *self.extra], axis=1))
    self.out_dir.mkdir(parents=True, exist_ok=True)
    grid.save_png(self.out_dir / f"step_{step:07d}.png", image)
    writer.image(step, self.tag, image)


# ------------------------------------------------------------------------- finding and training


def find(name: str, key: str = "translator") -> type[Translator]:
  """The translator class of module `cxr_jax.training.<name>` (its `TRANSLATOR`); a bad name is a
  ConfigError naming `config.<key>`."""
  if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ConfigError(f"config.{key}: unknown translator {name!r}: a translator is named by its "
                      f"module {PACKAGE}.<name> (lower case letters, digits, '_')")
  module_name = f"{PACKAGE}.{name}"
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:
      raise
    raise ConfigError(f"config.{key}: unknown translator {name!r}: there is no module "
                      f"{module_name}") from None
  cls = getattr(module, "TRANSLATOR", None)
  if not (isinstance(cls, type) and issubclass(cls, Translator)):
    raise ConfigError(f"config.{key}: {module_name} is not a translator: it has no TRANSLATOR "
                      f"subclassing translator.Translator")
  return cls


def train(cls: type[Translator], config: ml_collections.ConfigDict,
          workdir: pathlib.Path) -> export.Exported:
  """The task of translator `cls`: checks `config`, trains (resuming a run in `workdir`),
  checkpoints, writes sample grids, exports and loads the generator."""
  config = cls.check_config(config)
  workdir = pathlib.Path(workdir)
  mesh = fit.make_mesh(config, "batch_size")
  train_set = dataset.load_splits(config.data, workdir)["train"]
  source = train_set.of_class(config.source_class).images
  target = train_set.of_class(config.target_class).images
  if len(source) < config.batch_size or len(target) == 0:
    raise UserError(f"{cls.name} needs at least batch_size={config.batch_size} "
                    f"{config.source_class} and one {config.target_class} training image; the "
                    f"training split has {len(source)} and {len(target)}")
  steps_per_epoch = len(source) // config.batch_size
  total_steps = config.num_epochs * steps_per_epoch
  logging.info("%s: %d %s and %d %s training images, %d steps/epoch, %d steps", cls.name,
               len(source), config.source_class, len(target), config.target_class,
               steps_per_epoch, total_steps)
  trainer = cls(config, image_size=config.data.image_size, steps_per_epoch=steps_per_epoch,
                mesh=mesh, channels=source.shape[-1],
                samples=sample_rows(config.seed, config.num_samples, source, target),
                sample_dir=workdir / "samples")
  hint = ", ".join(f"config.{key} (now {configlib.get_dotted(config, key)})"
                   for key in cls.memory_keys)
  fit.fit(trainer, workdir, data=(source, target),
          schedule=loop.Schedule(total_steps=total_steps, steps_per_call=config.steps_per_call,
                                 log_every=config.log_every,
                                 checkpoint_every=config.checkpoint_every,
                                 hook_every=config.sample_every),
          keep_checkpoints=config.keep_checkpoints, images_per_step=config.batch_size,
          memory_hint=f"lower one of {hint}", batch_size=config.batch_size,
          **stream_lib.options(config.data))
  return export.load_generator(workdir / GENERATOR_DIR, mesh)
