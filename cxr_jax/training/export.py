"""Trained networks exported for inference: parameters and batch statistics (no optimiser state)
plus the JSON needed to rebuild the module, in `<dir>/params` (Orbax) and `<dir>/model.json`.

The pix2pix generator is exported this way for synthesis, the classifier for prediction, FID
features and the experiment's report.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from cxr_jax import workdir as workdir_lib
from cxr_jax.errors import UserError
from cxr_jax.utils import files

META_FILE = "model.json"


def save(directory: str | pathlib.Path, params: nnx.State, stats: nnx.State, meta: dict) -> None:
  directory = pathlib.Path(directory).absolute()
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
