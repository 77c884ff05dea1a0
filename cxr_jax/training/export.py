"""Trained networks exported for inference, and the one class every inference goes through.

An export is the parameters and batch statistics (no optimiser state) in `<dir>/params` (Orbax)
plus `<dir>/model.json`: the `kind` ('generator' or 'classifier'), the architecture (`arch`,
rebuilt by `cxr_jax.models.build`, the builders training uses) and how to run it. Generator
exports are translator-agnostic: `translator` names the model that trained it ('pix2pix', ...),
`inference` says how to run it ('instance': pix2pix's test mode, batch statistics of each image
alone with dropout on as the noise source; 'eval': `train=False`), and synthesis loads any of them.

`Exported` holds the meta, the functional module and the parameters replicated once on a mesh;
`map` runs a pure function of (network, static arguments, weights, batch) over fixed-size,
batch-sharded batches, compiled once per function and static arguments, dispatching every batch
before fetching. Translation, class probabilities, pooled features,
Grad-CAM inputs, the trainers' validation and sample grids all use it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from cxr_jax import provenance
from cxr_jax import workdir as workdir_lib
from cxr_jax.errors import UserError
from cxr_jax.models import build
from cxr_jax.models import pretrained as pretrained_lib
from cxr_jax.training import augment
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training import pixels
from cxr_jax.training.functional import Functional
from cxr_jax.utils import files

META_FILE = "model.json"
GENERATOR = "generator"
CLASSIFIER = "classifier"
INFERENCE_MODES = ("instance", "eval")


def save(directory: str | pathlib.Path, params: nnx.State, stats: nnx.State, meta: dict,
         config: ml_collections.ConfigDict | None = None) -> None:
  """Writes an export; `meta` gains the provenance (version, commit, hash of `config`)."""
  directory = pathlib.Path(directory).absolute()
  meta = dict(meta, provenance=provenance.provenance(config))
  # The metadata first: Orbax's save ends with a barrier, so every process can read both after.
  if workdir_lib.is_writer():
    directory.mkdir(parents=True, exist_ok=True)
    files.write_text_atomic(directory / META_FILE, json.dumps(meta, indent=2, default=str))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / "params", {"params": nnx.to_pure_dict(params),
                                      "stats": nnx.to_pure_dict(stats)}, force=True)


def read_meta(directory: str | pathlib.Path, kind: str) -> dict:
  directory = pathlib.Path(directory)
  path = directory / META_FILE
  if not path.exists():
    raise UserError(f"{directory}: not an exported {kind} (no {META_FILE} in it)")
  meta = json.loads(path.read_text())
  if meta.get("kind") != kind:
    raise UserError(f"{directory}: holds an exported {meta.get('kind')!r}, not a {kind}")
  return meta


def restore_into(directory: str | pathlib.Path, params: nnx.State, stats: nnx.State) -> None:
  """Fills `params` and `stats` (from a freshly built module) with the exported values."""
  directory = pathlib.Path(directory).absolute()
  # An explicit target on this machine's first device: a model trained on 8 GPUs loads on a laptop.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        {"params": nnx.to_pure_dict(params), "stats": nnx.to_pure_dict(stats)})
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored: Any = ckptr.restore(directory / "params", target)
    nnx.replace_by_pure_dict(params, restored["params"])
    nnx.replace_by_pure_dict(stats, restored["stats"])
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise UserError(f"{directory}: the exported weights do not fit the model described in "
                    f"{META_FILE} ({type(e).__name__}: {e})") from None


def build_module(meta: dict, *, seed: int = 0, abstract: bool = True) -> nnx.Module:
  """The module an export's meta describes, by the builders training uses."""
  if meta["kind"] == GENERATOR:
    return build.build_generator(meta["arch"], image_size=meta["image_size"],
                                 channels=meta["channels"], compute_dtype=meta["compute_dtype"],
                                 seed=seed, abstract=abstract)
  return build.build_resnet(meta["arch"], num_classes=len(meta["class_names"]),
                            compute_dtype=meta["compute_dtype"], seed=seed, abstract=abstract)


def classifier_weights(directory: str | pathlib.Path) -> pretrained_lib.PretrainedWeights:
  """A classifier export of ours as pretrained weights (`config.pretrained` = its folder): its
  architecture, input channels, normalisation (`build.SCRATCH` for a scratch-trained one) and
  class names, for `pretrained.apply_pretrained`."""
  directory = pathlib.Path(directory).expanduser()
  meta = read_meta(directory, CLASSIFIER)
  try:
    arch, spec = meta["arch"], build.InputSpec.from_json(meta["input"])
    module = build_module(meta)
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"{directory / META_FILE}: not a classifier description this version reads "
                    f"({type(e).__name__}: {e})") from None
  net, params, stats = Functional.split(module)
  restore_into(directory, params, stats)
  values = {"/".join(str(k) for k in path): np.asarray(node.get_value(), np.float32)
            for path, node in nnx.iter_graph(net.merge(params, stats))
            if isinstance(node, nnx.Variable)}
  return pretrained_lib.PretrainedWeights(
      path=str(directory), family="cxr-jax", variant=arch["variant"],
      preprocess=spec.weights_preprocess or build.SCRATCH, params=values,
      num_classes=len(meta["class_names"]), stage_sizes=tuple(arch["stage_sizes"]),
      width=int(arch["width"]), in_channels=int(arch["in_channels"]),
      class_names=tuple(meta["class_names"]))


# ------------------------------------------------------------------- pure inference functions


def translate_images(net: Functional, inference: str, params, stats, images_u8, key_data):
  """uint8 translations of uint8 images; each image's dropout noise comes from its own key."""
  if inference == "eval":
    out, _ = net.apply(params, stats, pixels.to_signed(images_u8), train=False)
    return pixels.to_uint8(out)

  def one(image, kd):
    out, _ = net.apply(params, stats, pixels.to_signed(image[None]), train=True,
                       rngs=nnx.Rngs(dropout=jax.random.wrap_key_data(kd)))
    return pixels.to_uint8(out[0])
  return jax.vmap(one)(images_u8, key_data)


def network_input(spec: build.InputSpec, images_u8: jax.Array) -> jax.Array:
  return spec(augment.resize(augment.hide_center(images_u8, spec.hide_center), spec.image_size))


def _probabilities(net: Functional, spec: build.InputSpec, params, stats, images_u8):
  logits, _ = net.apply(params, stats, network_input(spec, images_u8), train=False)
  return jax.nn.softmax(logits)


def _pooled_features(net: Functional, spec: build.InputSpec, params, stats, images_u8):
  fmap, _ = net.apply(params, stats, network_input(spec, images_u8), train=False,
                      method="features")
  return jnp.mean(fmap.astype(jnp.float32), axis=(1, 2))


# ------------------------------------------------------------------------------- the class


@dataclasses.dataclass(eq=False)
class Exported:
  """A network ready for inference: meta, functional module, parameters replicated on `mesh`."""
  meta: dict
  net: Functional
  params: Any
  stats: Any
  mesh: jax.sharding.Mesh
  # Compiled `map` functions by (function, static arguments), shared by the copies `with_weights`
  # makes.
  _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def create(cls, meta: dict, net: Functional, params, stats,
             mesh: jax.sharding.Mesh | None = None) -> "Exported":
    mesh = mesh or mesh_lib.make_mesh()
    params, stats = mesh_lib.put_replicated((params, stats), mesh)
    return cls(meta, net, params, stats, mesh)

  def with_weights(self, params, stats) -> "Exported":
    """The same network with other weights already replicated on this mesh (a training state's),
    sharing the compiled functions: validation during training compiles once."""
    return dataclasses.replace(self, params=params, stats=stats)

  @property
  def input_spec(self) -> build.InputSpec:
    return build.InputSpec.from_json(self.meta["input"])

  def map(self, fn: Callable, *arrays: np.ndarray, batch_size: int,
          static: tuple = ()) -> np.ndarray:
    """`fn(net, *static, params, stats, *batch)` over `arrays` in fixed-size batches sharded
    along `data`; compiled once per (`fn`, `static`) (and batch shape). `static` must be
    hashable: it is part of the compiled function's key."""
    key = (fn, static)
    compiled = self._compiled.get(key)
    if compiled is None:
      rep, batch = mesh_lib.replicated(self.mesh), mesh_lib.batch_sharding(self.mesh)
      compiled = self._compiled[key] = jax.jit(
          functools.partial(fn, self.net, *static),
          in_shardings=(rep, rep) + (batch,) * len(arrays), out_shardings=batch)
    return mesh_lib.map_batches(lambda *xs: compiled(self.params, self.stats, *xs), arrays,
                                batch_size, self.mesh)

  # Generators ---------------------------------------------------------------------------------

  def translate(self, images_u8: np.ndarray, *, seed: int = 0, first_index: int = 0,
                batch_size: int = 32) -> np.ndarray:
    """uint8 [N, S, S, C] -> uint8 [N, S, S, C]; image i's dropout noise is keyed by
    (seed, first_index + i), so results do not depend on the batch size."""
    if not len(images_u8):
      return np.zeros_like(images_u8)
    base = jax.random.key(seed)
    key_data = np.asarray(jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(base, i))(
        jnp.arange(first_index, first_index + len(images_u8)))))
    return self.map(translate_images, images_u8, key_data, batch_size=batch_size,
                    static=(self.meta["inference"],))

  # Classifiers --------------------------------------------------------------------------------

  def predict(self, images_u8: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Class probabilities [N, K]."""
    return self.map(_probabilities, images_u8, batch_size=batch_size, static=(self.input_spec,))

  def features(self, images_u8: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Globally pooled last-stage features, [N, 2048] for ResNet-50 (FID / KID)."""
    return self.map(_pooled_features, images_u8, batch_size=batch_size,
                    static=(self.input_spec,))

  def network_input(self, images_u8: jax.Array) -> jax.Array:
    return network_input(self.input_spec, images_u8)

  def feature_and_head_fns(self):
    """(features_fn, head_fn) over network input, for Grad-CAM."""
    def features_fn(x):
      return self.net.apply(self.params, self.stats, x, train=False, method="features")[0]

    def head_fn(fmap):
      return self.net.apply(self.params, self.stats, fmap, method="head")[0]
    return features_fn, head_fn


def load(directory: str | pathlib.Path, kind: str,
         mesh: jax.sharding.Mesh | None = None) -> Exported:
  """An exported network of `kind`, rebuilt from its meta and replicated once on `mesh`."""
  meta = read_meta(directory, kind)
  net, params, stats = Functional.split(build_module(meta))
  restore_into(directory, params, stats)
  return Exported.create(meta, net, params, stats, mesh)


def load_generator(directory: str | pathlib.Path,
                   mesh: jax.sharding.Mesh | None = None) -> Exported:
  """Any exported image translator (pix2pix, ...): what synthesis loads."""
  exported = load(directory, GENERATOR, mesh)
  if exported.meta.get("inference") not in INFERENCE_MODES:
    raise UserError(f"{directory}/{META_FILE}: 'inference' is {exported.meta.get('inference')!r}, "
                    f"not one of {INFERENCE_MODES}")
  return exported


def load_classifier(directory: str | pathlib.Path,
                    mesh: jax.sharding.Mesh | None = None) -> Exported:
  return load(directory, CLASSIFIER, mesh)
