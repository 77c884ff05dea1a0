"""pix2pix (Isola et al., 2017) translating normal chest X-rays into COVID-19 ones.

The database has no paired images: each normal training image is paired with a COVID training
image drawn at random, afresh at every step. An epoch is one pass over the normal training images
in a seeded random order (`floor(N_normal / batch)` steps, see `sampling.py`). Only the training
split is ever read. `fit` runs the training and `translator.Translator` draws the batches, writes
the sample grids and exports the generator; this file holds the networks, losses and update.

What the random pairing does (kept as the paper's method, the faithful reproduction): with no
normal/COVID pairs, the L1 term at weight 100 asks the output of every normal image to be close
to a COVID image unrelated to it, drawn afresh each step; the output minimising that is the
(pixel-wise) median COVID picture, whatever the input. The conditional discriminator sees real
pairs whose two halves are unrelated, so it cannot teach the generator to keep the patient's
anatomy either. The outputs hardly depend on their inputs and are far less varied than real COVID
images (`evaluation/quality.py` measures both; docs/translation.md has the figures). The unpaired
translators beside it (`cyclegan.py`, ...) need no pairs.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from cxr_jax import configlib
from cxr_jax.models import build
from cxr_jax.training import gan
from cxr_jax.training import translator
from cxr_jax.training.fit import NetState
from cxr_jax.training.functional import Functional

# config.model.inference_norm -> the export's `inference` (see export.py).
INFERENCE = {"instance": "instance", "running": "eval"}


def generator_loss(fake_logits: jax.Array, fake: jax.Array, target: jax.Array, kind: str,
                   l1_weight: float) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  adv = gan.gan_loss(fake_logits, True, kind)
  l1 = gan.l1(fake, target)
  return adv + l1_weight * l1, (adv, l1)


@flax.struct.dataclass
class State:
  step: jax.Array
  rng: jax.Array
  g: NetState
  d: NetState


def build_networks(config: ml_collections.ConfigDict, image_size: int, channels: int, *,
                   abstract: bool = False) -> tuple[nnx.Module, nnx.Module]:
  """(U-Net generator, conditional PatchGAN on (source, image) pairs)."""
  m = config.model
  gen = build.build_generator(build.generator_arch(m), image_size=image_size, channels=channels,
                              compute_dtype=config.compute_dtype, seed=config.seed,
                              abstract=abstract)
  disc = build.build_patchgan(in_channels=2 * channels, ndf=m.ndf, n_layers=m.n_layers_d,
                              norm=m.norm, compute_dtype=config.compute_dtype,
                              seed=config.seed + 1, abstract=abstract)
  return gen, disc


class Pix2Pix(translator.Translator):
  """The networks, optimiser and update of one pix2pix config on one mesh (a fit.Trainer; the
  batches, sample grids and export are `translator.Translator`'s)."""
  name = "pix2pix"
  sample_tag = "samples/normal_generated_covid"

  @classmethod
  def check_own_config(cls, config: ml_collections.ConfigDict) -> None:
    configlib.require(config.l1_weight >= 0, "l1_weight", "must be >= 0")
    configlib.require(config.model.inference_norm in INFERENCE, "model.inference_norm",
                      f"{config.model.inference_norm!r} is not 'instance' or 'running'")

  def build_networks(self) -> Functional:
    gen, disc = build_networks(self.config, self.image_size, self.channels)
    gen, g_params, g_stats = Functional.split(gen)
    self.disc, d_params, d_stats = Functional.split(disc)
    self._init = (g_params, g_stats, d_params, d_stats)
    return gen

  def optimizer(self) -> optax.GradientTransformation:
    tx = super().optimizer()
    if self.config.get("flat_optimizer", False):
      # One buffer for all parameters: a few large update kernels instead of a few per tensor.
      tx = optax.flatten(tx)
    return tx

  def init_state(self) -> State:
    g_params, g_stats, d_params, d_stats = self._init
    return State(step=jnp.zeros((), jnp.int32), rng=jax.random.key(self.config.seed),
                 g=NetState.create(g_params, g_stats, self.tx),
                 d=NetState.create(d_params, d_stats, self.tx))

  def generator_state(self, state: State) -> NetState:
    return state.g

  def inference(self) -> str:
    return INFERENCE[self.config.model.inference_norm]

  def update(self, state: State, source: jax.Array, target: jax.Array,
             dropout_key: jax.Array) -> tuple[State, dict[str, jax.Array]]:
    """One update of D, then of G, on a batch of float images in [-1, 1]."""
    cfg = self.config

    def generate(g_params):
      return self.gen.apply(g_params, state.g.stats, source, train=True,
                            rngs=nnx.Rngs(dropout=dropout_key))

    fake, g_vjp, g_stats = jax.vjp(generate, state.g.params, has_aux=True)
    d, d_metrics = gan.update_discriminator(self.disc, state.d,
                                            jnp.concatenate([source, target], -1),
                                            jnp.concatenate([source, fake], -1), cfg.gan_loss)

    def g_loss_fn(fake):
      logits, stats = self.disc.apply(d.params, d.stats, jnp.concatenate([source, fake], -1),
                                      train=True)
      total, (adv, l1) = generator_loss(logits, fake, target, cfg.gan_loss, cfg.l1_weight)
      return total, (stats, adv, l1)

    (g_loss, (d_stats, g_adv, g_l1)), fake_grad = jax.value_and_grad(
        g_loss_fn, has_aux=True)(fake)
    (g_grads,) = g_vjp(fake_grad)
    metrics = {
        "g_loss": g_loss, "g_gan": g_adv, "g_l1": g_l1, **d_metrics,
        "g_grad_norm": optax.tree.norm(g_grads),
        "learning_rate": jnp.asarray(self.schedule(state.step), jnp.float32),
    }
    return state.replace(step=state.step + 1, g=state.g.apply_gradients(g_grads, g_stats),
                         d=d.replace(stats=d_stats)), metrics


TRANSLATOR = Pix2Pix
