"""The `translate` task (the reference's `test.py`): a folder of radiographs through a generator.

The generator is an export of ours (`<run>/generator`) or a generator file written by the PyTorch
reference (junyanz/pytorch-CycleGAN-and-pix2pix `latest_net_G.pth` or a `.safetensors` of it),
imported by `models/torch_io.py` and wrapped into the same `export.Exported` that synthesis uses:
one inference path. Each output PNG mirrors its input's relative path under
`<workdir>/translated/`; `manifest.csv` lists input, output, both pixel hashes, generator, seed.
Image i (in sorted order) gets the dropout noise of key (seed, i): a run is reproducible.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import ml_collections
import numpy as np
from absl import logging

from cxr_jax import configlib
from cxr_jax import workdir as workdir_lib
from cxr_jax.data import images as images_lib
from cxr_jax.errors import ConfigError, DataError, UserError
from cxr_jax.evaluation.predict import list_inputs
from cxr_jax.models import torch_io
from cxr_jax.training import export
from cxr_jax.training.functional import Functional
from cxr_jax.utils import files as files_lib
from cxr_jax.utils import grid

OUTPUT_DIR = "translated"
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("input_file", "output_file", "source_sha256", "output_sha256", "generator",
                    "seed")
REFERENCE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# The reference's --crop_size: the size of a reference generator file when none is configured.
REFERENCE_DEFAULT_SIZE = 256
# Images decoded and translated per round: bounds host memory on large folders.
CHUNK = 256


def is_reference_file(path: str | pathlib.Path) -> bool:
  return str(path).lower().endswith(REFERENCE_SUFFIXES)


def reference_exported(path: str | pathlib.Path, *, image_size: int = 0, channels: int = 0,
                       architecture: str = "", inference: str = "instance",
                       mesh: jax.sharding.Mesh | None = None) -> export.Exported:
  """A reference generator file as an `Exported` generator (what `export.load_generator` gives
  for ours). `inference='instance'` is the reference's `test.py` default (train-mode norms on one
  image, dropout on); 'eval' is its `--eval`."""
  if inference not in export.INFERENCE_MODES:
    raise ConfigError(f"config.inference: {inference!r} is not one of {export.INFERENCE_MODES}")
  try:
    module, info = torch_io.import_reference_generator(
        path, image_size=image_size or REFERENCE_DEFAULT_SIZE, channels=channels or None,
        architecture=architecture or None)
  except ConfigError as e:  # the size it needs: name the key that sets it
    raise ConfigError(f"config.image_size: {e}") from None
  meta = {"kind": export.GENERATOR, "translator": "pytorch-reference",
          "arch": {"name": info.architecture, "reference_name": info.name, "ngf": info.ngf,
                   "norm": info.norm, "use_dropout": info.use_dropout},
          "image_size": info.image_size, "channels": info.in_channels,
          "out_channels": info.out_channels, "compute_dtype": "float32", "inference": inference,
          "reference": dataclasses.asdict(info)}
  net, params, stats = Functional.split(module)
  return export.Exported.create(meta, net, params, stats, mesh)


def load_translator(generator: str | pathlib.Path, *, image_size: int = 0, channels: int = 0,
                    architecture: str = "", inference: str = "",
                    mesh: jax.sharding.Mesh | None = None) -> export.Exported:
  """An exported generator folder of ours or a reference generator file, as `Exported`.

  For our exports `image_size` / `channels` / `architecture`, when given, must agree with its
  model.json; `inference` ('' = the export's own) overrides how it runs.
  """
  path = pathlib.Path(str(generator)).expanduser()
  if not str(generator):
    raise ConfigError("config.generator: set it to an exported generator (<run>/generator) or a "
                      "reference generator file (latest_net_G.pth / .safetensors)")
  if not path.exists():
    raise UserError(f"{path}: no such generator (config.generator)")
  if path.is_file():
    if not is_reference_file(path):
      raise UserError(f"{path}: not a generator: give an exported generator folder of ours or "
                      f"a reference generator file ({', '.join(REFERENCE_SUFFIXES)})")
    return reference_exported(path, image_size=image_size, channels=channels,
                              architecture=architecture, inference=inference or "instance",
                              mesh=mesh)
  gen = export.load_generator(path, mesh)
  meta = gen.meta
  for key, want in (("image_size", image_size), ("channels", channels)):
    if want and int(meta[key]) != int(want):
      raise UserError(f"{path}: the generator works with {key} {meta[key]}, config.{key} is "
                      f"{want}; leave config.{key} at 0 to use the generator's own")
  if architecture and meta["arch"].get("name") != architecture:
    raise UserError(f"{path}: holds a {meta['arch'].get('name')} generator, config.architecture "
                    f"asks for {architecture}")
  if inference:
    if inference not in export.INFERENCE_MODES:
      raise ConfigError(f"config.inference: {inference!r} is not one of "
                        f"{export.INFERENCE_MODES}")
    gen = dataclasses.replace(gen, meta=dict(meta, inference=inference), _compiled={})
  return gen


def output_names(relative: list[str]) -> list[str]:
  """Input paths relative to the input root -> output PNG paths: the suffix becomes .png, unless
  two inputs would meet in one file (`a.jpg`, `a.png`): those keep their suffix (`a.jpg.png`)."""
  stems = [str(pathlib.PurePosixPath(r).with_suffix(".png")) for r in relative]
  counts: dict[str, int] = {}
  for s in stems:
    counts[s] = counts.get(s, 0) + 1
  return [s if counts[s] == 1 else f"{r}.png" for r, s in zip(relative, stems)]


def translate(gen: export.Exported, input_path: str | pathlib.Path, out_dir: pathlib.Path, *,
              seed: int, batch_size: int, generator_name: str) -> dict:
  """Translates every readable image under `input_path` into `out_dir`; returns a summary."""
  root = pathlib.Path(str(input_path)).expanduser()
  if not str(input_path):
    raise ConfigError("config.input: set it to an image file or a folder of images")
  if not root.exists():
    raise DataError(f"{root}: no such file or folder (config.input)")
  paths = list_inputs(root)
  relative = [p.relative_to(root).as_posix() if root.is_dir() else p.name for p in paths]
  names = output_names(relative)
  size, channels = int(gen.meta["image_size"]), int(gen.meta["channels"])
  out_dir = pathlib.Path(out_dir)
  rows, skipped, done = [], [], 0
  for start in range(0, len(paths), CHUNK):
    decoded, kept = [], []
    for i in range(start, min(start + CHUNK, len(paths))):
      try:
        decoded.append(images_lib.decode(paths[i], size).pixels)
        kept.append(i)
      except images_lib.ImageError as e:
        skipped.append(str(e))
    if not decoded:
      continue
    gray = np.stack(decoded)[..., None]
    inputs = np.repeat(gray, channels, axis=-1) if channels != 1 else gray
    # Image i's noise is keyed by (seed, i) of the whole listing: chunks and skips change nothing.
    outs = _translate_indexed(gen, inputs, kept, seed, batch_size)
    if workdir_lib.is_writer():
      for i, src, out in zip(kept, gray, outs):
        target = out_dir / names[i]
        target.parent.mkdir(parents=True, exist_ok=True)
        grid.save_png(target, out)
        rows.append((files_lib.printable(relative[i]), files_lib.printable(names[i]),
                     images_lib.pixel_hash(src[..., 0]),
                     images_lib.pixel_hash(out[..., 0] if out.shape[-1] == 1 else out),
                     generator_name, seed))
    done += len(kept)
  if skipped:
    logging.warning("Skipped %d unreadable file(s): %s", len(skipped), "; ".join(skipped[:10]))
  if not done:
    raise DataError(f"{root}: none of the images could be read")
  if workdir_lib.is_writer():
    files_lib.write_csv_atomic(out_dir.parent / MANIFEST, MANIFEST_COLUMNS, rows)
  logging.info("Translated %d image(s) into %s", done, out_dir)
  return {"count": done, "skipped": len(skipped), "output_dir": str(out_dir),
          "manifest": str(out_dir.parent / MANIFEST)}


def _translate_indexed(gen: export.Exported, inputs: np.ndarray, indices: list[int], seed: int,
                       batch_size: int) -> np.ndarray:
  """Translations keyed by the images' indices in the listing (contiguous runs in one call)."""
  outs, j = [], 0
  while j < len(indices):
    k = j
    while k + 1 < len(indices) and indices[k + 1] == indices[k] + 1:
      k += 1
    outs.append(gen.translate(inputs[j:k + 1], seed=seed, first_index=indices[j],
                              batch_size=batch_size))
    j = k + 1
  return np.concatenate(outs)


def translate_task(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """The `translate` task."""
  configlib.require_positive_int(config, "batch_size")
  for key in ("image_size", "channels"):
    configlib.require(int(config[key]) >= 0, key, f"must be >= 0 (0: the generator's own), got "
                      f"{config[key]}")
  configlib.require(config.architecture in ("",) + torch_io.ARCHITECTURES, "architecture",
                    f"must be '' (inferred) or one of {torch_io.ARCHITECTURES}, got "
                    f"{config.architecture!r}")
  configlib.require(config.inference in ("",) + export.INFERENCE_MODES, "inference",
                    f"must be '' (the generator's own) or one of {export.INFERENCE_MODES}, got "
                    f"{config.inference!r}")
  gen = load_translator(config.generator, image_size=config.image_size,
                        channels=config.channels, architecture=config.architecture,
                        inference=config.inference)
  generator_name = str(pathlib.Path(config.generator).expanduser().absolute())
  return translate(gen, config.input, pathlib.Path(workdir) / OUTPUT_DIR, seed=config.seed,
                   batch_size=config.batch_size, generator_name=generator_name)
