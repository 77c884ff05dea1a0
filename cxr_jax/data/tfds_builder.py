"""The database as a TFDS dataset: each image decoded once to uint8 at the run's size, stored as
array_record.

Decoding 2,905 (or 21,165) PNGs takes a minute; reading back the prepared array_record takes
seconds, so every later run, task and process reuses the prepared copy. The copy lives in
`<cache_dir>/tfds/<key>/` where `key` hashes the resolved source path, the labels CSV, the image
size, the resize mode (squash / pad) and the classes the copy holds, so two sources (or sizes,
resize modes, or class sets) never share a folder.
The ClassLabel ids are those of `classes.ordered` over the source's classes (the database's four
first, then the others sorted); `prepared.json` records the names, and `load_splits` maps them to
the run's `config.data.classes`. `prepared.json` beside it is the completion marker: it
records the source's fingerprint (file names, sizes, times), the files skipped as unreadable and the
conversions made. A source whose files changed since is prepared again, with a warning.

Works without TensorFlow (TFDS' numpy-only path): `as_data_source` decodes records with numpy.
It is not a `tfds build` dataset (that command needs TensorFlow): the copy is prepared by any task
that loads data, or on its own by
  python main.py --config=configs/prepare_data.py --config.data.data_dir=/path/to/data
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shutil
import zipfile
import zlib
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from cxr_jax import console
from cxr_jax.data import classes as classes_lib
from cxr_jax.data import images as images_lib
from cxr_jax.data import layout as layout_lib
from cxr_jax.errors import DataError

SPLIT = "full"  # 'all' is reserved by TFDS
SIDECAR = "prepared.json"
# Bump when decoding changes what pixels a file gives (it invalidates every prepared copy).
VERSION = "1.2.0"  # 1.1.0: any class set (ClassLabel names in the key), DICOM; 1.2.0: DICOM
# through pydicom's pipeline quantised once, `resize` in the key, DICOM header metadata

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the "COVID-19 Radiography Database" by tawsifurrahman from Kaggle:
  https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database
(`kaggle datasets download -d tawsifurrahman/covid19-radiography-database`). Any release works: the
first one (COVID/, NORMAL/, Viral Pneumonia/) or a later one (COVID-19_Radiography_Dataset/ with
<Class>/images/ and <Class>/masks/). Keep the zip as downloaded or unzip it anywhere, then run
  python main.py --config=configs/prepare_data.py --config.data.data_dir=/path/to/archive.zip
(or the unzipped folder, or the folder above it); every task prepares it the same way on first use.
"""

# Sizes with a predefined config; any other size works as a custom config (TFDS logs a warning).
_PREDEFINED_SIZES = sorted({*range(32, 1025, 32), 224, 299})


@dataclasses.dataclass
class CxrConfig(tfds.core.BuilderConfig):
  image_size: int = 256


class CxrRadiography(tfds.core.GeneratorBasedBuilder):
  """Radiographs as uint8 grayscale [S, S, 1] with canonical labels (`class_names` order)."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "Grayscale uint8, Lanczos-resized, sha256 of the decoded pixels."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [CxrConfig(name=f"size{s}", image_size=s,
                               description=f"{s} x {s} px") for s in _PREDEFINED_SIZES]
  DEFAULT_CONFIG_NAME = "size256"

  def __init__(self, *, layout: layout_lib.Layout | None = None, workers: int | None = None,
               class_names: tuple[str, ...] | None = None, resize: str = "squash", **kwargs):
    self._layout = layout
    self._workers = workers
    self._resize = resize
    self.class_names = tuple(class_names or (layout.classes if layout is not None
                                              else classes_lib.CANONICAL))
    self.skipped: list[dict[str, str]] = []  # filled while generating
    self.notes = images_lib.ConversionNotes()
    self.metadata: dict[str, dict[str, str]] = {}  # file -> DICOM header metadata
    super().__init__(**kwargs)

  @property
  def image_size(self) -> int:
    return self.builder_config.image_size

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description="COVID-19 Radiography Database (Chowdhury et al. 2020, Rahman et al. 2021), "
        f"decoded to 8-bit grayscale at {s} x {s} px.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.ZLIB),
            "label": tfds.features.ClassLabel(names=list(self.class_names)),
            "file": tfds.features.Text(),
            "sha256": tfds.features.Text(),
        }),
        homepage="https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database",
        citation="M.E.H. Chowdhury et al., Can AI help in screening viral and COVID-19 pneumonia? "
        "IEEE Access 8, 2020. T. Rahman et al., Exploring the effect of image enhancement "
        "techniques on COVID-19 detection using chest X-ray images, Comput. Biol. Med. 2021.",
    )

  def _split_generators(self, dl_manager):
    if self._layout is None:
      raise DataError("this dataset is prepared by cxr-jax, not by `tfds build`: run "
                      "python main.py --config=configs/prepare_data.py "
                      f"--config.data.data_dir={dl_manager.manual_dir}")
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
    lay = self._layout
    size = self.image_size
    label_ids = {c: i for i, c in enumerate(self.class_names)}
    workers = self._workers or min(4, os.cpu_count() or 1)
    with lay.reader() as read, images_lib.bomb_guard():

      def decode(entry: layout_lib.Entry):
        name = lay.display(entry.file)
        try:
          data = read(entry.file)
        except (OSError, KeyError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error) as e:
          # A vanished file, or a damaged / encrypted zip member.
          return entry, images_lib.ImageError(name, f"cannot read ({e})")
        try:
          return entry, images_lib.decode_unguarded(data, size, name=name,
                                                    resize=self._resize)
        except images_lib.ImageError as e:
          return entry, e

      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        # Bounded look-ahead: at most a few chunks of decoded images are held at once.
        chunk = 64 * workers
        for start in range(0, len(lay.entries), chunk):
          for entry, out in pool.map(decode, lay.entries[start:start + chunk]):
            if isinstance(out, images_lib.ImageError):
              self.skipped.append({"file": entry.file, "class": entry.label,
                                   "reason": out.reason})
              continue
            self.notes.add(entry.file, out.notes)
            if out.metadata:
              self.metadata[entry.file] = out.metadata
            pixels = out.pixels
            yield entry.file, {
                "image": pixels[..., None],
                "label": label_ids[entry.label],
                "file": entry.file,
                "sha256": pixel_hash(pixels),
            }


# Kept here too for existing imports; `images.pixel_hash` avoids importing TFDS.
pixel_hash = images_lib.pixel_hash


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A prepared copy on disk and what preparing it found."""
  data_dir: pathlib.Path  # <cache>/tfds/<key>
  image_size: int
  source: str  # the database root, for messages
  release: str
  class_names: tuple[str, ...]  # the ClassLabel names: label i of load_arrays is class_names[i]
  skipped: tuple[dict[str, str], ...]  # {'file', 'class', 'reason'}
  conversions: dict[str, list[str]]  # conversion kind -> files
  num_examples: int
  metadata: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # DICOM headers

  def builder(self) -> CxrRadiography:
    return CxrRadiography(data_dir=str(self.data_dir), config=_config(self.image_size),
                          file_format="array_record", class_names=self.class_names)


def cache_key(layout: layout_lib.Layout, image_size: int, resize: str = "squash") -> str:
  """Names the copy of one source (folder or zip, root, labels CSV) at one size and resize mode
  with one class set: a copy made for other classes, whose label ids mean other classes, is never
  read."""
  text = (f"{layout.source}\0{layout.root}\0{layout.labels_csv}\0{image_size}\0{VERSION}\0"
          + "\0".join(layout.classes) + ("" if resize == "squash" else f"\0{resize}"))
  # surrogateescape: a folder name that is not UTF-8 (os.fsdecode keeps its bytes) still hashes.
  return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def prepare(layout: layout_lib.Layout, image_size: int, cache_dir: str | os.PathLike, *,
            workers: int | None = None, resize: str = "squash") -> Prepared:
  """Prepares (once) the array_record copy of `layout` at `image_size`; returns where it is.

  A lock file serialises processes that share the cache (hosts of one run, parallel runs): the
  first prepares, the others wait and reuse its copy.
  """
  data_dir = pathlib.Path(cache_dir) / "tfds" / cache_key(layout, image_size, resize)
  try:
    data_dir.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"{data_dir.parent}: cannot create the dataset cache ({e}); set "
                    "config.data.cache_dir to a writable folder") from None
  with _locked(data_dir.with_name(data_dir.name + ".lock")):
    return _prepare_locked(layout, image_size, data_dir, workers, resize)


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  try:
    import fcntl  # pylint: disable=import-outside-toplevel
  except ImportError:  # not POSIX: no cross-process lock
    yield
    return
  with open(path, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _prepare_locked(layout: layout_lib.Layout, image_size: int, data_dir: pathlib.Path,
                    workers: int | None, resize: str = "squash") -> Prepared:
  sidecar = data_dir / SIDECAR
  meta = _read_sidecar(sidecar)
  if (meta is not None and meta.get("fingerprint") == layout.fingerprint
      and tuple(meta.get("class_names", ())) == layout.classes):
    prepared = _from_meta(data_dir, meta)
    if prepared.builder().is_prepared():
      logging.info("Using the prepared dataset in %s (%d images of %s at %d px)", data_dir,
                   prepared.num_examples, prepared.source, image_size, extra=console.FILE_ONLY)
      return prepared
  if meta is not None and meta.get("fingerprint") != layout.fingerprint:
    logging.warning("Files in %s changed since it was prepared in %s: preparing it again",
                    layout.root_path, data_dir)
  if data_dir.exists():
    shutil.rmtree(data_dir)  # stale or half-written: never mix two preparations
  data_dir.mkdir(parents=True)
  logging.info("Preparing %d images of %s at %d x %d px into %s (done once, then reused)",
               len(layout.entries), layout.root_path, image_size, image_size, data_dir)
  builder = CxrRadiography(layout=layout, workers=workers, data_dir=str(data_dir),
                           config=_config(image_size), file_format="array_record",
                           class_names=layout.classes, resize=resize)
  manual = layout.source if layout.source.is_dir() else layout.source.parent
  printed = io.StringIO()  # TFDS prints two lines of its own: the log file gets them
  try:
    with contextlib.redirect_stdout(printed):
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  except OSError as e:
    shutil.rmtree(data_dir, ignore_errors=True)
    raise DataError(f"{data_dir}: cannot write the prepared dataset ({e}); set "
                    "config.data.cache_dir to a writable folder with space") from None
  except AssertionError:
    if len(builder.skipped) != len(layout.entries):
      raise
    shutil.rmtree(data_dir, ignore_errors=True)  # TFDS refuses an empty split
    shown = "; ".join(f"{s['file']} ({s['reason']})" for s in builder.skipped[:5])
    raise DataError(f"{layout.root_path}: none of the {len(layout.entries)} image file(s) can be "
                    f"read: {shown}{' ...' if len(builder.skipped) > 5 else ''}") from None
  for line in printed.getvalue().splitlines():
    logging.info("TFDS: %s", line, extra=console.FILE_ONLY)
  builder.notes.log()
  meta = {
      "source": layout.root_path,
      "release": layout.release,
      "class_names": list(layout.classes),
      "fingerprint": layout.fingerprint,
      "image_size": image_size,
      "num_examples": len(layout.entries) - len(builder.skipped),
      "skipped": sorted(builder.skipped, key=lambda s: s["file"]),
      "conversions": builder.notes.as_dict(),
      "resize": resize,
      "metadata": dict(sorted(builder.metadata.items())),
  }
  tmp = sidecar.with_suffix(".tmp")
  tmp.write_text(json.dumps(meta, indent=1))
  tmp.replace(sidecar)
  return _from_meta(data_dir, meta)


def load_arrays(prepared: Prepared, batch: int = 128, workers: int | None = None
                ) -> dict[str, Any]:
  """Reads the whole prepared copy into memory, sorted by file (the record order is shuffled).

  Batches are read with `__getitems__` from a few threads: record decompression (zlib) releases
  the GIL. Returns {'image': uint8 [N, S, S, 1], 'label': int32 ids into
  `prepared.class_names` [N],
  'file': list[str], 'sha256': list[str]}.
  """
  source = prepared.builder().as_data_source(SPLIT)
  n = len(source)
  s = prepared.image_size
  image = np.empty((n, s, s, 1), np.uint8)
  label = np.empty((n,), np.int32)
  files: list[str] = [""] * n
  hashes: list[str] = [""] * n

  def read(start: int) -> None:
    keys = list(range(start, min(n, start + batch)))
    for i, ex in zip(keys, source.__getitems__(keys)):
      image[i] = ex["image"]
      label[i] = ex["label"]
      files[i] = _text(ex["file"])
      hashes[i] = _text(ex["sha256"])

  with concurrent.futures.ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
    list(pool.map(read, range(0, n, batch)))
  order = sorted(range(n), key=files.__getitem__)
  if order != list(range(n)):
    image, label = image[order], label[order]
  return {"image": image, "label": label, "file": [files[i] for i in order],
          "sha256": [hashes[i] for i in order]}


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _config(image_size: int) -> CxrConfig | str:
  if image_size in _PREDEFINED_SIZES:
    return f"size{image_size}"
  return CxrConfig(name=f"size{image_size}", image_size=image_size,
                   description=f"{image_size} x {image_size} px")


def _read_sidecar(path: pathlib.Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _from_meta(data_dir: pathlib.Path, meta: dict[str, Any]) -> Prepared:
  return Prepared(data_dir=data_dir, image_size=int(meta["image_size"]), source=meta["source"],
                  release=meta.get("release", "?"),
                  class_names=tuple(meta.get("class_names", classes_lib.CANONICAL)),
                  skipped=tuple(meta.get("skipped", ())),
                  conversions=dict(meta.get("conversions", {})),
                  num_examples=int(meta.get("num_examples", 0)),
                  metadata=dict(meta.get("metadata", {})))
