"""The `export` task: an exported generator or classifier of ours -> one `.safetensors` file that
the PyTorch world reads, with the reference's (generator) or torchvision's (classifier) key names
(`models/torch_io.py`), and `<name>.json` saying what it is and how to load it."""

from __future__ import annotations

import hashlib
import json
import pathlib

import ml_collections
from absl import logging

from cxr_jax import configlib
from cxr_jax import workdir as workdir_lib
from cxr_jax.errors import UserError
from cxr_jax.models import torch_io
from cxr_jax.training import export
from cxr_jax.training.functional import Functional
from cxr_jax.utils import files as files_lib

HOW_TO_LOAD = {
    export.GENERATOR: "build the reference's generator (models.networks.define_G) with the netG, "
                      "ngf, norm, input_nc, output_nc and no_dropout in this file's metadata, then "
                      "netG.load_state_dict(safetensors.torch.load_file(file))",
    export.CLASSIFIER: "torchvision.models.resnet50(num_classes=len(class_names)) (conv1 with "
                       "in_channels inputs), then model.load_state_dict("
                       "safetensors.torch.load_file(file)); input as in 'input'",
}


def load_module(model_dir: str | pathlib.Path):
  """(module with the exported weights, its meta) for a generator or classifier export of ours."""
  directory = pathlib.Path(str(model_dir)).expanduser()
  meta_path = directory / export.META_FILE
  if not meta_path.is_file():
    raise UserError(f"{directory}: not an exported model of ours (no {export.META_FILE}); "
                    "config.model_dir is <run>/generator or <run>/classifier")
  try:
    kind = json.loads(meta_path.read_text()).get("kind")
  except (OSError, ValueError, AttributeError) as e:
    raise UserError(f"{meta_path}: unreadable ({e})") from None
  if kind not in (export.GENERATOR, export.CLASSIFIER):
    raise UserError(f"{meta_path}: kind {kind!r} is neither a generator nor a classifier")
  meta = export.read_meta(directory, kind)
  net, params, stats = Functional.split(export.build_module(meta))
  export.restore_into(directory, params, stats)
  return net.merge(params, stats), meta


def export_model(model_dir: str | pathlib.Path, out_dir: pathlib.Path, name: str = "") -> dict:
  """Writes `<out_dir>/<name>.safetensors` and `<name>.json`; returns the JSON's content."""
  module, meta = load_module(model_dir)
  kind = meta["kind"]
  name = name or kind
  out_dir = pathlib.Path(out_dir)
  target = out_dir / f"{name}.safetensors"
  info = {"kind": kind, "source": str(pathlib.Path(str(model_dir)).expanduser().absolute()),
          "file": target.name, "step": meta.get("step")}
  if kind == export.GENERATOR:
    if workdir_lib.is_writer():
      torch_io.export_reference_generator(module, target)
    info.update(format="pytorch-CycleGAN-and-pix2pix generator state dict",
                translator=meta.get("translator"), image_size=meta["image_size"],
                channels=meta["channels"], source_class=meta.get("source_class"),
                target_class=meta.get("target_class"),
                value_range="[-1, 1] in and out (x / 127.5 - 1)")
  else:
    if workdir_lib.is_writer():
      torch_io.export_torchvision_resnet(module, target)
    info.update(format="torchvision ResNet state dict", class_names=meta["class_names"],
                input=meta.get("input"))
  info["how_to_load"] = HOW_TO_LOAD[kind]
  if workdir_lib.is_writer():
    info["sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
    files_lib.write_text_atomic(out_dir / f"{name}.json", json.dumps(info, indent=2, default=str))
  logging.info("Exported the %s to %s", kind, target)
  return info


def export_task(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """The `export` task."""
  configlib.require(bool(config.model_dir), "model_dir",
                    "set it to an exported generator or classifier (<run>/generator, "
                    "<run>/classifier)")
  configlib.require(not config.output_name or ("/" not in config.output_name and
                                               config.output_name not in (".", "..")),
                    "output_name", f"a file name without folders, got {config.output_name!r}")
  return export_model(config.model_dir, pathlib.Path(workdir), config.output_name)
