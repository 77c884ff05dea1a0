"""CUT (contrastive unpaired translation: Park, Efros, Zhang & Zhu, ECCV 2020) translating normal
chest X-rays into COVID-19 ones without pairs, and FastCUT (`configs/cut.py:fast`).

One generator G and one PatchGAN D (LSGAN), no second generator and no cycle: instead of asking
F(G(a)) to give `a` back, PatchNCE asks each patch of G(a) to be recognisable as the patch of `a`
at the same place among the other patches of `a`. For each encoder layer in `config.nce_layers`,
G's encoder runs on the translated image (queries) and on its source (keys); `num_patches`
positions are drawn (the same for both, and for every image of the batch), each feature goes
through that layer's small MLP (`models/patch_mlp.py`) and is L2-normalised; the loss of a query is
the cross-entropy of picking its own key among the keys of the other positions of the same image
at temperature `nce_T` (`patch_nce_loss`). CUT adds the same loss between real target images and
G's output on them (identity NCE, `nce_idt`); FastCUT leaves it out and weighs PatchNCE 10.

As in the authors' taesungp/contrastive-unpaired-translation (`models/cut_model.py`,
`models/patchnce.py`): per step D is updated first (the shared `gan.update_discriminator`, the
reference's `backward_D_basic`), then G and the MLP head together; the keys are constants of the
loss; a layer's PatchNCE is weighed by `lambda_nce` and the layers are averaged; CUT halves the sum
of the two PatchNCE terms. Differences: our ResNet generator has no anti-aliased resampling and
starts from N(0, 0.02) (theirs: blurred stride, Xavier), so `nce_layers` number the same points
of our encoder (`ResnetGenerator.encode`); FastCUT's flip equivariance is not used (chest
radiographs are not left-right symmetric), as the augmentation uses no flips.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cxr_jax import configlib
from cxr_jax.models import build
from cxr_jax.models import resnet_generator
from cxr_jax.training import gan
from cxr_jax.training import translator
from cxr_jax.training.fit import NetState
from cxr_jax.training.functional import Functional

NEGATIVE_SELF = -10.0   # the reference's logit for a key against itself among the negatives


def patch_nce_loss(queries: jax.Array, keys: jax.Array, temperature: float) -> jax.Array:
  """PatchNCE of queries and keys [N, P, D] (unit vectors; patch p of image n matches key p of
  image n): per query, the cross-entropy of its positive logit q.k_p against the negative logits
  q.k_j (j != p) of the same image, all divided by `temperature`; the entry j = p among the
  negatives is `NEGATIVE_SELF` as in the reference. Keys are constants. Returns [N, P]."""
  queries = queries.astype(jnp.float32)
  keys = jax.lax.stop_gradient(keys).astype(jnp.float32)
  positive = jnp.sum(queries * keys, axis=-1, keepdims=True)                   # [N, P, 1]
  negative = jnp.einsum("npd,nqd->npq", queries, keys)                         # [N, P, P]
  eye = jnp.eye(queries.shape[1], dtype=bool)
  negative = jnp.where(eye, NEGATIVE_SELF, negative)
  logits = jnp.concatenate([positive, negative], axis=-1) / temperature
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.zeros(logits.shape[:-1], jnp.int32))


def draw_patches(key: jax.Array, sizes: list[int], num_patches: int) -> list[jax.Array]:
  """Per layer of `sizes` flat positions, `min(num_patches, size)` distinct positions drawn
  uniformly (the same for every image of the batch, as the reference's)."""
  keys = jax.random.split(key, len(sizes))
  return [jax.random.permutation(k, size)[:min(num_patches, size)]
          for k, size in zip(keys, sizes)]


@flax.struct.dataclass
class State:
  step: jax.Array
  rng: jax.Array
  g: NetState   # the generator (exported)
  d: NetState   # the PatchGAN on target-class images
  f: NetState   # the patch MLP head


class CUT(translator.Translator):
  """The networks, optimisers and update of one CUT / FastCUT config on one mesh."""
  name = "cut"
  memory_keys = translator.Translator.memory_keys + ("model.n_blocks", "num_patches")

  @classmethod
  def check_own_config(cls, config: ml_collections.ConfigDict) -> None:
    configlib.require(config.model.generator == "resnet", "model.generator",
                      f"CUT's PatchNCE reads the ResNet generator's encoder; got "
                      f"{config.model.generator!r}")
    configlib.require(isinstance(config.model.n_blocks, int) and config.model.n_blocks >= 0,
                      "model.n_blocks", f"must be an integer >= 0, got {config.model.n_blocks!r}")
    for key in ("num_patches", "model.nce_mlp_dim"):
      configlib.require_positive_int(config, key)
    for key in ("lambda_gan", "lambda_nce"):
      configlib.require(config[key] >= 0, key, f"must be >= 0, got {config[key]}")
    configlib.require(config.nce_t > 0, "nce_t", f"must be > 0, got {config.nce_t}")
    layers = tuple(config.nce_layers)
    top = 1 + 3 + 3 * resnet_generator.N_DOWNSAMPLING + config.model.n_blocks
    configlib.require(
        len(layers) > 0 and len(set(layers)) == len(layers)
        and all(isinstance(i, int) and 0 <= i < top for i in layers), "nce_layers",
        f"must be distinct encoder layers in 0-{top - 1} (10 + i is residual block i with "
        f"model.n_blocks={config.model.n_blocks}), got {layers}")

  def build_networks(self) -> Functional:
    cfg, m = self.config, self.config.model
    self.layers = tuple(cfg.nce_layers)
    gen = build.build_generator(build.generator_arch(m), image_size=self.image_size,
                                channels=self.channels, compute_dtype=cfg.compute_dtype,
                                seed=cfg.seed)
    disc = build.build_patchgan(in_channels=self.channels, ndf=m.ndf, n_layers=m.n_layers_d,
                                norm=m.norm, compute_dtype=cfg.compute_dtype, seed=cfg.seed + 1)
    head = build.build_patch_mlp(
        channels=tuple(resnet_generator.encoder_channels(i, in_channels=self.channels,
                                                         ngf=m.ngf) for i in self.layers),
        dim=m.nce_mlp_dim, compute_dtype=cfg.compute_dtype, seed=cfg.seed + 2)
    gen, *g_init = Functional.split(gen)
    self.disc, *d_init = Functional.split(disc)
    self.head, *f_init = Functional.split(head)
    self._init = (g_init, d_init, f_init)
    return gen

  def init_state(self) -> State:
    g, d, f = (NetState.create(params, stats, self.tx) for params, stats in self._init)
    return State(step=jnp.zeros((), jnp.int32), rng=jax.random.key(self.config.seed),
                 g=g, d=d, f=f)

  def generator_state(self, state: State) -> NetState:
    return state.g

  def nce_loss(self, g: NetState, f: NetState, source: jax.Array, translated: jax.Array,
               key: jax.Array) -> jax.Array:
    """PatchNCE between `source` images (keys) and their translations (queries): each layer's
    mean loss times `lambda_nce`, averaged over the layers."""
    cfg = self.config

    def encode(x):
      return self.gen.apply(g.params, g.stats, x, layers=self.layers, train=True,
                            method="encode")[0]

    feat_q, feat_k = encode(translated), encode(source)
    ids = draw_patches(key, [f.shape[1] * f.shape[2] for f in feat_k], cfg.num_patches)
    keys, _ = self.head.apply(f.params, f.stats, feat_k, ids)
    queries, _ = self.head.apply(f.params, f.stats, feat_q, ids)
    losses = [cfg.lambda_nce * jnp.mean(patch_nce_loss(q, k, cfg.nce_t))
              for q, k in zip(queries, keys)]
    return sum(losses) / len(losses)

  def update(self, state: State, real_a: jax.Array, real_b: jax.Array,
             key: jax.Array) -> tuple[State, dict[str, jax.Array]]:
    """One update of D, then of G and the MLP head, on batches of float images in [-1, 1]."""
    cfg = self.config
    n = real_a.shape[0]
    k_nce, k_idt = jax.random.split(key)
    real = jnp.concatenate([real_a, real_b]) if cfg.nce_idt else real_a

    def generate(g_params):
      return self.gen.apply(g_params, state.g.stats, real, train=True)

    fake, g_vjp, g_stats = jax.vjp(generate, state.g.params, has_aux=True)
    d, d_metrics = gan.update_discriminator(self.disc, state.d, real_b, fake[:n], cfg.gan_loss)

    def g_loss_fn(fake, g_params, f_params):
      g, f = state.g.replace(params=g_params), state.f.replace(params=f_params)
      logits, d_stats = self.disc.apply(d.params, d.stats, fake[:n], train=True)
      parts = {"gan": cfg.lambda_gan * gan.gan_loss(logits, True, cfg.gan_loss),
               "nce": self.nce_loss(g, f, real_a, fake[:n], k_nce)}
      nce = parts["nce"]
      if cfg.nce_idt:
        parts["nce_idt"] = self.nce_loss(g, f, real_b, fake[n:], k_idt)
        nce = 0.5 * (parts["nce"] + parts["nce_idt"])
      return parts["gan"] + nce, (parts, d_stats)

    (g_loss, (parts, d_stats)), (fake_grad, g_grads, f_grads) = jax.value_and_grad(
        g_loss_fn, argnums=(0, 1, 2), has_aux=True)(fake, state.g.params, state.f.params)
    (g_through_fake,) = g_vjp(fake_grad)
    g_grads = jax.tree.map(jnp.add, g_grads, g_through_fake)
    metrics = {"g_loss": g_loss, **{f"g_{k}": v for k, v in parts.items()}, **d_metrics,
               "g_grad_norm": optax.tree.norm(g_grads), "f_grad_norm": optax.tree.norm(f_grads),
               "learning_rate": jnp.asarray(self.schedule(state.step), jnp.float32)}
    return state.replace(step=state.step + 1, g=state.g.apply_gradients(g_grads, g_stats),
                         d=d.replace(stats=d_stats),
                         f=state.f.apply_gradients(f_grads, state.f.stats)), metrics


TRANSLATOR = CUT
