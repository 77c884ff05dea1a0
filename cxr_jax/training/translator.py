"""The trainer every image translator shares (pix2pix, CycleGAN): a translator file keeps only its
networks, losses and update.

`Translator` is a `fit.Trainer` with what both translators do the same way: the Adam optimiser on
the constant-then-linear-decay schedule, the on-device augmentation, the batch of a step (source
images in the seeded epoch order, target images drawn uniformly: `gan.source_target_batch`), the
sample-grid hook through the exported-model path, and the export of the generator (the one
network synthesis needs) with its metadata. A subclass provides:

    name                         'pix2pix', 'cyclegan': the export's `translator`
    build_networks() -> gen      builds its networks (kept on `self`) and returns the generator's
                                 `Functional`, which the export and the sample grids run
    init_state() -> state        a pytree with `step` and `rng`
    update(state, source, target, key) -> (state, metrics)
    generator_state(state)       the `NetState` of the exported generator
    generator_arch() / inference()   the export's `arch` and `inference` (see export.py)

`train(cls, config, workdir)` is the task every translator runs: it reads the source and target
training images, builds the trainer, fits it (`fit.fit`) and loads the exported generator.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from cxr_jax import configlib
from cxr_jax.data import dataset
from cxr_jax.errors import UserError
from cxr_jax.training import augment as augment_lib
from cxr_jax.training import export
from cxr_jax.training import fit
from cxr_jax.training import gan
from cxr_jax.training import loop
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training.fit import NetState
from cxr_jax.training.functional import Functional
from cxr_jax.training.summary import SummaryWriter

GENERATOR_DIR = "generator"   # where a translator exports its generator, in its workdir


class Translator:
  """The shared part of a translator's trainer (see the module docstring)."""
  name: str
  sample_tag: str = "samples/source_translated_target"
  # Config keys whose values set the memory a step needs (named when the device runs out).
  memory_keys: tuple[str, ...] = ("batch_size", "data.image_size", "model.ngf")

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
    self.sampler = None if samples is None else gan.SampleGrid(
        self.generator, lambda st: (self.generator_state(st).params,
                                    self.generator_state(st).stats),
        samples[0], samples[1:], sample_dir, self.sample_tag)

  # ----------------------------------------------------------------- what a subclass provides

  def build_networks(self) -> Functional:
    raise NotImplementedError

  def init_state(self) -> Any:
    raise NotImplementedError

  def update(self, state: Any, source: jax.Array, target: jax.Array,
             key: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
    raise NotImplementedError

  def generator_state(self, state: Any) -> NetState:
    raise NotImplementedError

  def generator_arch(self) -> dict:
    raise NotImplementedError

  def inference(self) -> str:
    raise NotImplementedError

  # ----------------------------------------------------------------------- what they share

  def optimizer(self) -> optax.GradientTransformation:
    """Adam on the schedule, each network its own (Adam is elementwise: one Adam over several
    networks' chained parameters, as the reference's, is the same update)."""
    return optax.adam(self.schedule, b1=self.config.beta1, b2=self.config.beta2)

  def sample_batch(self, step: jax.Array, rng: jax.Array, source: jax.Array, target: jax.Array):
    """The (source, target) batch of `step` and its key for the step's own noise (dropout,
    pools), drawn on the device: source by the epoch order, target uniformly."""
    return gan.source_target_batch(step, rng, source, target, batch_size=self.batch_size,
                                   steps_per_epoch=self.steps_per_epoch, augment=self.augment,
                                   sharding=self._batch)

  def train_step(self, state: Any, data: tuple[jax.Array, jax.Array]):
    source, target, key = self.sample_batch(state.step, state.rng, *data)
    return self.update(state, source, target, key)

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


def train(cls: type[Translator], config: ml_collections.ConfigDict,
          workdir: pathlib.Path) -> export.Exported:
  """The task of translator `cls` on a validated `config`: trains (resuming a run in
  `workdir`), checkpoints, writes sample grids, exports and loads the generator."""
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
                samples=gan.sample_rows(config.seed, config.num_samples, source, target),
                sample_dir=workdir / "samples")
  hint = ", ".join(f"config.{key} (now {configlib.get_dotted(config, key)})" for key in cls.memory_keys)
  fit.fit(trainer, workdir, data=(source, target),
          schedule=loop.Schedule(total_steps=total_steps, steps_per_call=config.steps_per_call,
                                 log_every=config.log_every,
                                 checkpoint_every=config.checkpoint_every,
                                 hook_every=config.sample_every),
          keep_checkpoints=config.keep_checkpoints, images_per_step=config.batch_size,
          memory_hint=f"lower one of {hint}")
  return export.load_generator(workdir / GENERATOR_DIR, mesh)
