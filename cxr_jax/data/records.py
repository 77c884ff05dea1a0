"""Images that stay on disk: the prepared array_record copy read on demand, for data sets larger
than the host's or the device's memory (`config.data.placement`).

`load_splits` gives every split's `ImageSet.images` as a `RecordImages` view when the run streams:
an ordered list of record ids into the prepared copy with the shape and dtype of the array it
stands for. Taking a subset (`take`) gives another view; indexing or `np.asarray` reads (and
decodes) the records, so the evaluation and synthesis paths, which walk their images in batches,
read one batch at a time. `read(x, ids)` reads rows of an array or a view alike; `concat` joins
arrays and views (the enhanced training set: real images on disk, synthetic ones in memory).

The record index (file, label, sha256 of each record, sorted by file as `load_arrays` sorts) is
read once per prepared copy, without holding the images, and kept beside it (`record_index.json`).

`choose_placement` decides `auto`: the images are resident when all of them take at most
`config.data.placement_share` of one device's memory (a CPU: of the host's), else streamed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np
from absl import logging

from cxr_jax.errors import ConfigError

PLACEMENTS = ("auto", "device", "stream")
DEFAULT_SHARE = 0.25
INDEX_FILE = "record_index.json"
_READ_CHUNK = 64


class LazyImages:
  """An uint8 image array [N, H, W, C] that is read when indexed (see the module docstring)."""
  shape: tuple[int, ...]
  dtype = np.dtype(np.uint8)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape))

  def read(self, ids: np.ndarray) -> np.ndarray:
    """The images at positions `ids` (int array), in that order."""
    raise NotImplementedError

  def take(self, ids: Sequence[int] | np.ndarray) -> "LazyImages":
    """A view of the images at positions `ids`, nothing read."""
    raise NotImplementedError

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, (int, np.integer)):
      return self.read(np.asarray([_position(int(key), len(self))]))[0]
    if isinstance(key, slice):
      return self.read(np.arange(len(self))[key])
    ids = np.asarray(key)
    if ids.dtype == bool:
      ids = np.flatnonzero(ids)
    return self.read(np.asarray([_position(int(i), len(self)) for i in ids.reshape(-1)],
                                np.int64))

  def __array__(self, dtype=None, copy=None):
    del copy
    out = self.read(np.arange(len(self)))
    return out if dtype is None else out.astype(dtype)


def _ids(ids) -> np.ndarray:
  """Positions (int array) from indices or a boolean mask."""
  ids = np.asarray(ids)
  if ids.dtype == bool:
    ids = np.flatnonzero(ids)
  return ids.astype(np.int64).reshape(-1)


def _position(i: int, n: int) -> int:
  if not -n <= i < n:
    raise IndexError(f"index {i} out of range for {n} images")
  return i % n


class RecordImages(LazyImages):
  """Images of a prepared copy (`tfds_builder.Prepared`) by record id."""

  def __init__(self, prepared: Any, record_ids: np.ndarray):
    self.prepared = prepared
    self.record_ids = np.asarray(record_ids, np.int64)
    s = prepared.image_size
    self.shape = (len(self.record_ids), s, s, 1)

  def take(self, ids) -> "RecordImages":
    return RecordImages(self.prepared, self.record_ids[_ids(ids)])

  def read(self, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, np.int64).reshape(-1)
    out = np.empty((len(ids),) + self.shape[1:], np.uint8)
    if not len(ids):
      return out
    source = data_source(self.prepared)
    keys = [int(k) for k in self.record_ids[ids]]

    def one(start: int) -> None:
      part = keys[start:start + _READ_CHUNK]
      for j, ex in enumerate(source.__getitems__(part)):
        out[start + j] = ex["image"]

    starts = range(0, len(keys), _READ_CHUNK)
    if len(keys) <= _READ_CHUNK:
      one(0)
    else:  # record decompression (zlib) releases the GIL
      with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(one, starts))
    return out


class StackedImages(LazyImages):
  """Arrays and views one after another (as np.concatenate, nothing read)."""

  def __init__(self, parts: Sequence[Any]):
    self.parts = [p for p in parts if len(p)]
    if not self.parts:
      raise ValueError("StackedImages of no images")
    tail = {tuple(p.shape[1:]) for p in self.parts}
    if len(tail) != 1:
      raise ValueError(f"image shapes differ: {sorted(tail)}")
    self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
    self.shape = (int(self.offsets[-1]),) + tail.pop()

  def _split(self, ids: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    part = np.searchsorted(self.offsets, ids, side="right") - 1
    return [(k, np.flatnonzero(part == k), ids[part == k] - self.offsets[k])
            for k in np.unique(part)]

  def read(self, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, np.int64).reshape(-1)
    out = np.empty((len(ids),) + self.shape[1:], np.uint8)
    for k, where, local in self._split(ids):
      out[where] = read(self.parts[k], local)
    return out

  def take(self, ids) -> LazyImages:
    return _Gathered(self, _ids(ids))


class _Gathered(LazyImages):
  """Positions of another view, in any order."""

  def __init__(self, base: LazyImages, ids: np.ndarray):
    self.base, self.ids = base, ids
    self.shape = (len(ids),) + tuple(base.shape[1:])

  def read(self, ids: np.ndarray) -> np.ndarray:
    return self.base.read(self.ids[np.asarray(ids, np.int64)])

  def take(self, ids) -> LazyImages:
    return _Gathered(self.base, self.ids[_ids(ids)])


def is_lazy(x: Any) -> bool:
  return isinstance(x, LazyImages)


def read(x: Any, ids: np.ndarray) -> np.ndarray:
  """Rows `ids` of an array or a view, as an array."""
  ids = np.asarray(ids, np.int64)
  return x.read(ids) if is_lazy(x) else np.asarray(x)[ids]


def take(x: Any, ids) -> Any:
  """Rows `ids` of an array (an array) or of a view (a view)."""
  return x.take(ids) if is_lazy(x) else x[ids]


def concat(parts: Sequence[Any]) -> Any:
  """np.concatenate of arrays; a `StackedImages` view when a part is a view."""
  if not any(is_lazy(p) for p in parts):
    return np.concatenate(parts)
  return StackedImages(parts)


# ------------------------------------------------------------------------- the prepared copy

_SOURCES: dict[str, Any] = {}


def data_source(prepared: Any) -> Any:
  """The TFDS random-access source of a prepared copy (opened once per process)."""
  key = str(prepared.data_dir)
  if key not in _SOURCES:
    from cxr_jax.data import tfds_builder  # pylint: disable=import-outside-toplevel
    _SOURCES[key] = prepared.builder().as_data_source(tfds_builder.SPLIT)
  return _SOURCES[key]


def index(prepared: Any) -> dict[str, Any]:
  """What `tfds_builder.load_arrays` returns, with the images as a `RecordImages` view: {'image',
  'label' int32, 'file', 'sha256'} sorted by file. Read once (images decoded and dropped chunk by
  chunk), then kept in `<prepared>/record_index.json`."""
  path = pathlib.Path(prepared.data_dir) / INDEX_FILE
  try:
    saved = json.loads(path.read_text())
    if saved.get("num_examples") != prepared.num_examples:
      raise ValueError("stale")
  except (OSError, ValueError, KeyError):
    saved = _build_index(prepared)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # hosts sharing the cache write their own
    try:
      tmp.write_text(json.dumps(saved))
      tmp.replace(path)
    except OSError as e:  # a read-only cache still streams, indexing again next time
      logging.warning("%s: cannot keep the record index (%s)", path, e)
  return {"image": RecordImages(prepared, np.asarray(saved["record"], np.int64)),
          "label": np.asarray(saved["label"], np.int32), "file": list(saved["file"]),
          "sha256": list(saved["sha256"])}


def _build_index(prepared: Any) -> dict[str, Any]:
  from cxr_jax.data import tfds_builder  # pylint: disable=import-outside-toplevel
  source = data_source(prepared)
  n = len(source)
  label, files, hashes = [0] * n, [""] * n, [""] * n

  def one(start: int) -> None:
    keys = list(range(start, min(n, start + _READ_CHUNK)))
    for i, ex in zip(keys, source.__getitems__(keys)):
      label[i], files[i] = int(ex["label"]), tfds_builder._text(ex["file"])  # pylint: disable=protected-access
      hashes[i] = tfds_builder._text(ex["sha256"])  # pylint: disable=protected-access

  with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
    list(pool.map(one, range(0, n, _READ_CHUNK)))
  order = sorted(range(n), key=files.__getitem__)
  return {"num_examples": n, "record": order, "label": [label[i] for i in order],
          "file": [files[i] for i in order], "sha256": [hashes[i] for i in order]}


# ----------------------------------------------------------------------------------- placement


def check_placement(data_cfg: Any) -> tuple[str, float]:
  """config.data.placement and placement_share, checked."""
  placement = data_cfg.get("placement", "auto")
  if placement not in PLACEMENTS:
    raise ConfigError(f"config.data.placement: {placement!r} is not one of "
                      f"{', '.join(PLACEMENTS)}")
  share = data_cfg.get("placement_share", DEFAULT_SHARE)
  if (isinstance(share, bool) or not isinstance(share, (int, float))
      or not 0.0 < float(share) <= 1.0):
    raise ConfigError(f"config.data.placement_share: must be a fraction in (0, 1], got {share!r}")
  for key in ("stream_threads", "stream_prefetch"):
    value = data_cfg.get(key, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"config.data.{key}: must be an integer >= 1, got {value!r}")
  return placement, float(share)


def device_memory() -> tuple[int, str]:
  """(bytes, what they are) of the memory one device offers: the accelerator's limit, or on a CPU
  the host's physical memory."""
  import jax  # pylint: disable=import-outside-toplevel
  device = jax.local_devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # not every backend reports
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} memory"
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"
  except (ValueError, OSError, AttributeError):
    return 16 << 30, "host memory (assumed 16 GiB)"


_SAID: set = set()  # what `auto` chose, said once per process


def choose_placement(data_cfg: Any, num_images: int, image_size: int) -> str:
  """'device' or 'stream' for config.data.placement (module docstring), said on the console when
  `auto` chose."""
  placement, share = check_placement(data_cfg)
  if placement != "auto":
    return placement
  need = int(num_images) * image_size * image_size
  have, what = device_memory()
  chosen = "device" if need <= share * have else "stream"
  said = (num_images, image_size, chosen)
  if said in _SAID:
    return chosen
  _SAID.add(said)
  logging.info("config.data.placement='auto': %s images of %d px take %.2f GB, %s %.0f %% of "
               "%.1f GB %s (config.data.placement_share=%g): %s", f"{num_images:,}", image_size,
               need / 1e9, "within" if chosen == "device" else "over", 100 * share, have / 1e9,
               what, share,
               "resident on the devices" if chosen == "device" else "streamed from disk")
  return chosen
