"""CycleGAN (Zhu et al., 2017) translating normal chest X-rays into COVID-19 ones without pairs.

pix2pix needs paired images, which the database does not have; CycleGAN learns from two unpaired
sets. Naming follows the reference (junyanz/pytorch-CycleGAN-and-pix2pix, direction AtoB) with the
domains spelled out: A = `config.source_class` (NORMAL), B = `config.target_class` (COVID).

    G = g_ab: A -> B (reference netG_A)      D_b judges B images (reference netD_A)
    F = g_ba: B -> A (reference netG_B)      D_a judges A images (reference netD_B)

This module holds only what is CycleGAN's own, on the translator contract
(`translator.Translator`: config checks, batches, sample grids, the export of G; `fit`: the loop):
the generators' loss as a pure function of arrays, the history pool of generated images (kept in
the train state on the device, so a resumed run is exact), the four networks and the update. The
adversarial loss is `gan.gan_loss` (LSGAN by default here, as the reference's CycleGAN), and both
discriminators are updated by `gan.update_discriminator`, the reference's `backward_D_basic`.

Batches: an epoch is one pass over the source (A) training images in a seeded random order
(`sampling.epoch_batch`, as pix2pix); each step draws its target (B) images uniformly at random,
independently of the A images (the reference's unaligned dataset with `serial_batches` off). Both
come from (`state.rng`, `state.step`) on the device. Only the training split is read.

The exported G is a plain generator export (`arch` 'resnet' or 'unet', see `models/build.py`), so
synthesis and the experiment load it as they load pix2pix's. With instance norm and no dropout
(the default) it runs with `train=False` ('eval'); otherwise in pix2pix's test mode ('instance':
each image's own batch statistics, dropout on), as the reference's test script does with batch 1.
"""

from __future__ import annotations

from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from cxr_jax import configlib
from cxr_jax.errors import ConfigError
from cxr_jax.models import build
from cxr_jax.training import gan
from cxr_jax.training import translator
from cxr_jax.training.fit import NetState
from cxr_jax.training.functional import Functional
from cxr_jax.training.gan import gan_loss
from cxr_jax.training.gan import l1


# ----------------------------------------------------------------------------------- losses


def generator_loss(*, real_a: jax.Array, real_b: jax.Array, rec_a: jax.Array, rec_b: jax.Array,
                   same_a: jax.Array | None, same_b: jax.Array | None,
                   d_b_fake_b_logits: jax.Array, d_a_fake_a_logits: jax.Array, kind: str,
                   lambda_a: float = 10.0, lambda_b: float = 10.0,
                   lambda_identity: float = 0.5) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss of both generators, as the reference's `backward_G`:

      adv_ab   = gan_loss(D_b(G(a)), real)            adv_ba   = gan_loss(D_a(F(b)), real)
      cycle_a  = lambda_a * |F(G(a)) - a|_1           cycle_b  = lambda_b * |G(F(b)) - b|_1
      idt_ab   = lambda_b * lambda_identity * |G(b) - b|_1
      idt_ba   = lambda_a * lambda_identity * |F(a) - a|_1
      total    = adv_ab + adv_ba + cycle_a + cycle_b + idt_ab + idt_ba

  with `rec_a = F(G(a))`, `rec_b = G(F(b))`, `same_b = G(b)`, `same_a = F(a)` (None, or
  lambda_identity 0: no identity terms; the reference then skips those forward passes), and the
  logits of the discriminators on the current (not pooled) fakes. |.|_1 is the mean absolute
  difference. Returns (total, the six terms by the names above).
  """
  parts = {
      "adv_ab": gan_loss(d_b_fake_b_logits, True, kind),
      "adv_ba": gan_loss(d_a_fake_a_logits, True, kind),
      "cycle_a": lambda_a * l1(rec_a, real_a),
      "cycle_b": lambda_b * l1(rec_b, real_b),
  }
  if lambda_identity > 0 and (same_a is None or same_b is None):
    raise ValueError("lambda_identity > 0 needs same_a = F(a) and same_b = G(b)")
  zero = jnp.zeros((), jnp.float32)
  use_idt = lambda_identity > 0
  parts["idt_ab"] = lambda_b * lambda_identity * l1(same_b, real_b) if use_idt else zero
  parts["idt_ba"] = lambda_a * lambda_identity * l1(same_a, real_a) if use_idt else zero
  total = sum(parts.values())
  return total, parts


# ------------------------------------------------------------------------------ history pool


class Pool(NamedTuple):
  """The reference's `ImagePool` as arrays: `images[:count]` are stored (count <= size)."""
  images: jax.Array  # [size, H, W, C] float32
  count: jax.Array   # int32 scalar


def pool_init(size: int, image_shape: tuple[int, ...]) -> Pool:
  """An empty pool of `size` images of `image_shape` (H, W, C); size 0: no pool (pass-through)."""
  if not isinstance(size, int) or size < 0:
    raise ConfigError(f"config.pool_size: must be an integer >= 0, got {size!r}")
  return Pool(jnp.zeros((size, *image_shape), jnp.float32), jnp.zeros((), jnp.int32))


def pool_query(pool: Pool, images: jax.Array, key: jax.Array) -> tuple[jax.Array, Pool]:
  """The images a discriminator sees instead of the latest `images` [B, H, W, C], and the pool.

  Per image, in batch order, as the reference's `ImagePool.query`: while the pool is not full,
  the image is stored and returned; once full, with probability 0.5 a uniformly drawn stored
  image is returned and the new image takes its place, otherwise the new image is returned and the
  pool is unchanged. Jittable; deterministic given `key`. Gradients stop here (the reference
  stores `image.data`). The output is float32.
  """
  images = jax.lax.stop_gradient(images).astype(jnp.float32)
  size = pool.images.shape[0]
  if size == 0:
    return images, pool
  if images.shape[1:] != pool.images.shape[1:]:
    raise ValueError(f"pool of {pool.images.shape[1:]} images queried with {images.shape}")

  def one(carry, xs):
    stored, count = carry
    image, k = xs
    k_swap, k_slot = jax.random.split(k)
    full = count >= size
    swap = full & (jax.random.uniform(k_swap) > 0.5)
    slot = jnp.where(full, jax.random.randint(k_slot, (), 0, size), jnp.minimum(count, size - 1))
    old = stored[slot]
    stored = stored.at[slot].set(jnp.where(full & ~swap, old, image))
    count = jnp.where(full, count, count + 1).astype(jnp.int32)
    return (stored, count), jnp.where(swap, old, image)

  keys = jax.random.split(key, images.shape[0])
  (stored, count), out = jax.lax.scan(one, (pool.images, pool.count), (images, keys))
  return out, Pool(stored, count)


# -------------------------------------------------------------------------------- networks

def build_networks(config: ml_collections.ConfigDict, image_size: int, channels: int, *,
                   abstract: bool = False):
  """(G: A -> B, F: B -> A, D_a, D_b), each from its own seed; the discriminators are
  unconditional PatchGANs (they see one image, not a pair as in pix2pix)."""
  arch, m = build.generator_arch(config.model), config.model
  g_ab, g_ba = (build.build_generator(arch, image_size=image_size, channels=channels,
                                      compute_dtype=config.compute_dtype, seed=config.seed + i,
                                      abstract=abstract)
                for i in (0, 1))
  d_a, d_b = (build.build_patchgan(in_channels=channels, ndf=m.ndf, n_layers=m.n_layers_d,
                                   norm=m.norm, compute_dtype=config.compute_dtype,
                                   seed=config.seed + i, abstract=abstract)
              for i in (2, 3))
  return g_ab, g_ba, d_a, d_b


# ----------------------------------------------------------------------------------- trainer


@flax.struct.dataclass
class State:
  step: jax.Array
  rng: jax.Array
  g_ab: NetState   # G: A -> B (the exported generator)
  g_ba: NetState   # F: B -> A
  d_a: NetState    # judges A images
  d_b: NetState    # judges B images
  pool_a: Pool     # generated A images D_a draws from
  pool_b: Pool     # generated B images D_b draws from


class CycleGAN(translator.Translator):
  """The networks, optimisers and update of one CycleGAN config on one mesh (a fit.Trainer; the
  batches, sample grids and export of G are `translator.Translator`'s).

  Each network has its own Adam; the reference's two Adams over the chained parameters of both
  generators (and of both discriminators) are the same update, Adam being elementwise."""
  name = "cyclegan"
  memory_keys = translator.Translator.memory_keys + ("model.n_blocks",)

  @classmethod
  def check_own_config(cls, config: ml_collections.ConfigDict) -> None:
    for key in ("lambda_a", "lambda_b", "lambda_identity"):
      configlib.require(config[key] >= 0, key, f"must be >= 0, got {config[key]}")
    configlib.require(isinstance(config.pool_size, int) and config.pool_size >= 0, "pool_size",
                      f"must be an integer >= 0, got {config.pool_size!r}")
    configlib.require(isinstance(config.model.get("n_blocks", 0), int)
                      and config.model.get("n_blocks", 0) >= 0, "model.n_blocks",
                      f"must be an integer >= 0, got {config.model.get('n_blocks')!r}")

  def build_networks(self) -> Functional:
    g_ab, g_ba, d_a, d_b = build_networks(self.config, self.image_size, self.channels)
    gen, *g_ab_init = Functional.split(g_ab)   # G and F share one architecture
    _, *g_ba_init = Functional.split(g_ba)
    self.disc, *d_a_init = Functional.split(d_a)
    _, *d_b_init = Functional.split(d_b)
    self._init = (g_ab_init, g_ba_init, d_a_init, d_b_init)
    return gen

  def generator_state(self, state: State) -> NetState:
    return state.g_ab          # G: A -> B, the exported generator

  def init_state(self) -> State:
    shape = (self.image_size, self.image_size, self.channels)
    nets = [NetState.create(params, stats, self.tx) for params, stats in self._init]
    return State(step=jnp.zeros((), jnp.int32), rng=jax.random.key(self.config.seed),
                 g_ab=nets[0], g_ba=nets[1], d_a=nets[2], d_b=nets[3],
                 pool_a=pool_init(self.config.pool_size, shape),
                 pool_b=pool_init(self.config.pool_size, shape))

  def update(self, state: State, real_a: jax.Array, real_b: jax.Array,
             key: jax.Array) -> tuple[State, dict[str, jax.Array]]:
    """One update of both generators (discriminators fixed), then of both discriminators on
    pooled fakes, as the reference's `optimize_parameters`; images are floats in [-1, 1]."""
    cfg = self.config
    k_gen, k_pool_a, k_pool_b = jax.random.split(key, 3)
    drop = iter(jax.random.split(k_gen, 6))
    use_idt = cfg.lambda_identity > 0

    def g_loss_fn(g_params):
      p_ab, p_ba = g_params
      s_ab, s_ba = state.g_ab.stats, state.g_ba.stats

      def run(params, stats, x):
        return self.gen.apply(params, stats, x, train=True, rngs=nnx.Rngs(dropout=next(drop)))

      fake_b, s_ab = run(p_ab, s_ab, real_a)
      rec_a, s_ba = run(p_ba, s_ba, fake_b)
      fake_a, s_ba = run(p_ba, s_ba, real_b)
      rec_b, s_ab = run(p_ab, s_ab, fake_a)
      same_b = same_a = None
      if use_idt:
        same_b, s_ab = run(p_ab, s_ab, real_b)
        same_a, s_ba = run(p_ba, s_ba, real_a)
      d_b_logits, _ = self.disc.apply(state.d_b.params, state.d_b.stats, fake_b, train=True)
      d_a_logits, _ = self.disc.apply(state.d_a.params, state.d_a.stats, fake_a, train=True)
      total, parts = generator_loss(
          real_a=real_a, real_b=real_b, rec_a=rec_a, rec_b=rec_b, same_a=same_a, same_b=same_b,
          d_b_fake_b_logits=d_b_logits, d_a_fake_a_logits=d_a_logits, kind=cfg.gan_loss,
          lambda_a=cfg.lambda_a, lambda_b=cfg.lambda_b, lambda_identity=cfg.lambda_identity)
      return total, (parts, fake_a, fake_b, s_ab, s_ba)

    (g_loss, (parts, fake_a, fake_b, s_ab, s_ba)), (grad_ab, grad_ba) = jax.value_and_grad(
        g_loss_fn, has_aux=True)((state.g_ab.params, state.g_ba.params))
    g_ab = state.g_ab.apply_gradients(grad_ab, s_ab)
    g_ba = state.g_ba.apply_gradients(grad_ba, s_ba)

    pooled_a, pool_a = pool_query(state.pool_a, fake_a, k_pool_a)
    pooled_b, pool_b = pool_query(state.pool_b, fake_b, k_pool_b)

    metrics = {"g_loss": g_loss, **{"g_" + k: v for k, v in parts.items()}}
    d_a, d_a_metrics = gan.update_discriminator(self.disc, state.d_a, real_a, pooled_a,
                                                cfg.gan_loss, prefix="d_a_")
    d_b, d_b_metrics = gan.update_discriminator(self.disc, state.d_b, real_b, pooled_b,
                                                cfg.gan_loss, prefix="d_b_")
    metrics.update(d_a_metrics, **d_b_metrics)
    metrics["g_grad_norm"] = optax.tree.norm((grad_ab, grad_ba))
    metrics["learning_rate"] = jnp.asarray(self.schedule(state.step), jnp.float32)
    return state.replace(step=state.step + 1, g_ab=g_ab, g_ba=g_ba, d_a=d_a, d_b=d_b,
                         pool_a=pool_a, pool_b=pool_b), metrics


TRANSLATOR = CycleGAN
