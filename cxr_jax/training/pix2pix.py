"""pix2pix (Isola et al., 2017) translating normal chest X-rays into COVID-19 ones.

The database has no paired images: each normal training image is paired with a COVID training
image drawn at random, afresh at every step. An epoch is one pass over the normal training images
in a seeded random order (`floor(N_normal / batch)` steps, see `sampling.py`). Only the training
split is ever read. `fit` runs the training; this file holds the losses, the step, the pairing,
the sample grids and the generator's export metadata.

What the random pairing does (kept as the paper's method, the faithful reproduction): with no
normal/COVID pairs, the L1 term at weight 100 asks the output of every normal image to be close
to a COVID image unrelated to it, drawn afresh each step; the output minimising that is the
(pixel-wise) median COVID picture, whatever the input. The conditional discriminator sees real
pairs whose two halves are unrelated, so it cannot teach the generator to keep the patient's
anatomy either. The outputs hardly depend on their inputs and are far less varied than real COVID
images (`evaluation/quality.py` measures both; docs/translation.md has the figures). CycleGAN
(`cyclegan.py`) is the unpaired translator beside it.
"""

from __future__ import annotations

import pathlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from cxr_jax import configlib
from cxr_jax.data import dataset
from cxr_jax.errors import UserError
from cxr_jax.models import build
from cxr_jax.training import augment as augment_lib
from cxr_jax.training import export
from cxr_jax.training import fit
from cxr_jax.training import gan
from cxr_jax.training import loop
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training.fit import NetState
from cxr_jax.training.functional import Functional
from cxr_jax.training.summary import SummaryWriter

GENERATOR_DIR = "generator"
# config.model.inference_norm -> the export's `inference` (see export.py).
INFERENCE = {"instance": "instance", "running": "eval"}


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str) -> jax.Array:
  """Halved, as in pix2pix, so that D learns more slowly than G."""
  return 0.5 * (gan.gan_loss(real_logits, True, kind) + gan.gan_loss(fake_logits, False, kind))


def generator_loss(fake_logits: jax.Array, fake: jax.Array, target: jax.Array, kind: str,
                   l1_weight: float) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  adv = gan.gan_loss(fake_logits, True, kind)
  l1 = jnp.mean(jnp.abs(fake.astype(jnp.float32) - target.astype(jnp.float32)))
  return adv + l1_weight * l1, (adv, l1)


@flax.struct.dataclass
class State:
  step: jax.Array
  rng: jax.Array
  g: NetState
  d: NetState


def generator_arch(model_cfg: ml_collections.ConfigDict) -> dict:
  return {"name": "unet", "ngf": model_cfg.ngf, "norm": model_cfg.norm,
          "use_dropout": model_cfg.use_dropout}


def build_networks(config: ml_collections.ConfigDict, image_size: int, channels: int, *,
                   abstract: bool = False) -> tuple[nnx.Module, nnx.Module]:
  m = config.model
  gen = build.build_generator(generator_arch(m), image_size=image_size, channels=channels,
                              compute_dtype=config.compute_dtype, seed=config.seed,
                              abstract=abstract)
  disc = build.build_patchgan(in_channels=2 * channels, ndf=m.ndf, n_layers=m.n_layers_d,
                              norm=m.norm, compute_dtype=config.compute_dtype,
                              seed=config.seed + 1, abstract=abstract)
  return gen, disc


class Pix2Pix:
  """The networks, optimiser, step and hooks of one pix2pix config on one mesh (a fit.Trainer)."""
  name = "pix2pix"

  def __init__(self, config: ml_collections.ConfigDict, *, image_size: int, steps_per_epoch: int,
               mesh: jax.sharding.Mesh, channels: int = 1,
               samples: tuple[np.ndarray, np.ndarray] | None = None,
               sample_dir: pathlib.Path | None = None):
    self.config, self.mesh, self.channels = config, mesh, channels
    self.image_size, self.steps_per_epoch = image_size, steps_per_epoch
    self.batch_size = config.batch_size
    gen, disc = build_networks(config, image_size, channels)
    self.gen, g_params, g_stats = Functional.split(gen)
    self.disc, d_params, d_stats = Functional.split(disc)
    self._init = (g_params, g_stats, d_params, d_stats)
    self.schedule = gan.constant_then_linear_decay(
        config.learning_rate, config.num_epochs * steps_per_epoch,
        config.decay_epochs * steps_per_epoch)
    self.tx = optax.adam(self.schedule, b1=config.beta1, b2=config.beta2)
    if config.get("flat_optimizer", False):
      # One buffer for all parameters: a few large update kernels instead of a few per tensor.
      self.tx = optax.flatten(self.tx)
    self.augment = (augment_lib.AugmentSpec.from_config(config.augment, image_size)
                    if config.augment.enabled else None)
    self._batch = mesh_lib.batch_sharding(mesh)
    self.generator = export.Exported(self.export_meta(), self.gen, None, None, mesh)
    # Sample grids of (normal input, real COVID image) rows, when given.
    self.sampler = None if samples is None else gan.SampleGrid(
        self.generator, lambda st: (st.g.params, st.g.stats), samples[0], samples[1:],
        sample_dir, "samples/normal_generated_covid")

  def init_state(self) -> State:
    g_params, g_stats, d_params, d_stats = self._init
    return State(step=jnp.zeros((), jnp.int32), rng=jax.random.key(self.config.seed),
                 g=NetState.create(g_params, g_stats, self.tx),
                 d=NetState.create(d_params, d_stats, self.tx))

  def update(self, state: State, source: jax.Array, target: jax.Array,
             dropout_key: jax.Array) -> tuple[State, dict[str, jax.Array]]:
    """One update of D, then of G, on a batch of float images in [-1, 1]."""
    cfg = self.config

    def generate(g_params):
      return self.gen.apply(g_params, state.g.stats, source, train=True,
                            rngs=nnx.Rngs(dropout=dropout_key))

    fake, g_vjp, g_stats = jax.vjp(generate, state.g.params, has_aux=True)

    def d_loss_fn(d_params):
      real_logits, stats = self.disc.apply(d_params, state.d.stats,
                                           jnp.concatenate([source, target], -1), train=True)
      fake_logits, stats = self.disc.apply(d_params, stats,
                                           jnp.concatenate([source, jax.lax.stop_gradient(fake)],
                                                           -1), train=True)
      return discriminator_loss(real_logits, fake_logits, cfg.gan_loss), (stats, real_logits,
                                                                          fake_logits)

    (d_loss, (d_stats, real_logits, fake_logits)), d_grads = jax.value_and_grad(
        d_loss_fn, has_aux=True)(state.d.params)
    d = state.d.apply_gradients(d_grads, d_stats)

    def g_loss_fn(fake):
      logits, stats = self.disc.apply(d.params, d.stats, jnp.concatenate([source, fake], -1),
                                      train=True)
      total, (adv, l1) = generator_loss(logits, fake, target, cfg.gan_loss, cfg.l1_weight)
      return total, (stats, adv, l1)

    (g_loss, (d_stats, g_adv, g_l1)), fake_grad = jax.value_and_grad(
        g_loss_fn, has_aux=True)(fake)
    (g_grads,) = g_vjp(fake_grad)
    acc_real, acc_fake = gan.discriminator_accuracy(real_logits, fake_logits, cfg.gan_loss)
    metrics = {
        "g_loss": g_loss, "g_gan": g_adv, "g_l1": g_l1, "d_loss": d_loss,
        "d_acc_real": acc_real, "d_acc_fake": acc_fake,
        "g_grad_norm": optax.tree.norm(g_grads), "d_grad_norm": optax.tree.norm(d_grads),
        "learning_rate": jnp.asarray(self.schedule(state.step), jnp.float32),
    }
    return state.replace(step=state.step + 1, g=state.g.apply_gradients(g_grads, g_stats),
                         d=d.replace(stats=d_stats)), metrics

  def sample_batch(self, step: jax.Array, rng: jax.Array, normal: jax.Array, covid: jax.Array):
    """The (normal, COVID) pairs of `step`, and its dropout key, drawn on the device."""
    return gan.source_target_batch(step, rng, normal, covid, batch_size=self.batch_size,
                                   steps_per_epoch=self.steps_per_epoch, augment=self.augment,
                                   sharding=self._batch)

  def train_step(self, state: State, data: tuple[jax.Array, jax.Array]):
    src, tgt, k_drop = self.sample_batch(state.step, state.rng, *data)
    return self.update(state, src, tgt, k_drop)

  def hook(self, step: int, state: State, writer: SummaryWriter) -> None:
    """Every `sample_every` steps: a PNG grid of normal input | generated | a real COVID image."""
    if self.sampler is not None:
      self.sampler(step, state, writer)

  def export_meta(self) -> dict:
    cfg = self.config
    return {"kind": export.GENERATOR, "translator": "pix2pix",
            "arch": generator_arch(cfg.model), "image_size": self.image_size,
            "channels": self.channels, "compute_dtype": cfg.compute_dtype,
            "inference": INFERENCE.get(cfg.model.inference_norm),
            "source_class": cfg.source_class, "target_class": cfg.target_class,
            "model": cfg.model.to_dict()}

  def export(self, workdir: pathlib.Path, state: State, step: int) -> None:
    """The generator's parameters and batch statistics (no optimiser state), for synthesis."""
    meta = dict(self.export_meta(), step=int(step), workdir=str(workdir),
                split_manifest=str(workdir / "split_manifest.csv"))
    export.save(workdir / GENERATOR_DIR, state.g.params, state.g.stats, meta)
    logging.info("Exported the generator to %s", workdir / GENERATOR_DIR)


# ----------------------------------------------------------------------------------- task


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks `config`; returns a copy whose source / target classes are canonically spelt."""
  configlib.require(config.l1_weight >= 0, "l1_weight", "must be >= 0")
  configlib.require(config.model.inference_norm in INFERENCE, "model.inference_norm",
                    f"{config.model.inference_norm!r} is not 'instance' or 'running'")
  size = config.data.image_size
  configlib.require(isinstance(size, int) and size >= 32 and size & (size - 1) == 0,
                    "data.image_size", f"the U-Net halves the image down to 1x1, so it must be a "
                    f"power of two >= 32 (e.g. 64, 128, 256), got {size!r}")
  return gan.validate_translator(config)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: pathlib.Path) -> export.Exported:
  """The `pix2pix` task: trains, checkpoints, writes samples, exports the generator."""
  config = validate(config)
  workdir = pathlib.Path(workdir)
  mesh = fit.make_mesh(config, "batch_size")
  train = dataset.load_splits(config.data, workdir)["train"]
  normal = train.of_class(config.source_class).images
  covid = train.of_class(config.target_class).images
  if len(normal) < config.batch_size or len(covid) == 0:
    raise UserError(f"pix2pix needs at least batch_size={config.batch_size} "
                    f"{config.source_class} and one {config.target_class} training image; the "
                    f"training split has {len(normal)} and {len(covid)}")
  steps_per_epoch = len(normal) // config.batch_size
  total_steps = config.num_epochs * steps_per_epoch
  logging.info("pix2pix: %d %s -> %d %s training images, %d steps/epoch, %d steps", len(normal),
               config.source_class, len(covid), config.target_class, steps_per_epoch, total_steps)
  trainer = Pix2Pix(config, image_size=config.data.image_size, steps_per_epoch=steps_per_epoch,
                    mesh=mesh, channels=normal.shape[-1],
                    samples=gan.sample_rows(config.seed, config.num_samples, normal, covid), sample_dir=workdir / "samples")
  fit.fit(trainer, workdir, data=(normal, covid),
          schedule=loop.Schedule(total_steps=total_steps, steps_per_call=config.steps_per_call,
                                 log_every=config.log_every,
                                 checkpoint_every=config.checkpoint_every,
                                 hook_every=config.sample_every),
          keep_checkpoints=config.keep_checkpoints, images_per_step=config.batch_size,
          memory_hint=f"lower config.batch_size (now {config.batch_size}), "
                      f"config.data.image_size (now {config.data.image_size}) or "
                      f"config.model.ngf (now {config.model.ngf})")
  return export.load_generator(workdir / GENERATOR_DIR, mesh)
