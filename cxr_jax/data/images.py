"""Decoding one radiograph (a path or bytes) to 8-bit grayscale at the configured square size.

Users' copies of the database are not uniform: re-saved files come as RGB, RGBA, palette, 16-bit or
CMYK JPEG, phone photos carry an EXIF rotation. Every such case is converted the same way and the
conversion is *noted* (returned with the pixels, then logged once per run by `ConversionNotes`) so
that a run says what it did to the data. A file that cannot be a radiograph raises `ImageError`
naming the file and the reason; the dataset layer skips it with one warning for all such files.
PIL's own exceptions never reach the user.

Decisions:
- Colour -> gray uses PIL's ITU-R 601-2 luma. Transparent pixels (RGBA, LA, palette with
  transparency) are composited on black, the background of a radiograph.
- 16-bit (and 32-bit integer) data are scaled by the container's range, 65535 -> 255, not clipped.
  Exception: when no value exceeds 4095 (255) the file holds 12-bit (8-bit) data in a 16-bit
  container (common for DICOM exports) and is scaled by 4095 (255), with a note; full-range
  scaling would leave it nearly black. Integer data outside 0..65535 and float data outside [0, 1]
  are stretched min..max; float data in [0, 1] are scaled by 255.
- Non-square images are resized to the square (aspect not kept: the whole chest stays in view, as
  in the paper's 256 x 256 inputs); the change of aspect is noted. Resampling is Lanczos, which in
  PIL is antialiased when downscaling (area-aware support).
- An EXIF orientation outside 1..8 is ignored (PIL cannot apply it) and noted as such.
- Images smaller than `MIN_SIDE` on a side, or larger than PIL's `Image.MAX_IMAGE_PIXELS`
  (decompression-bomb guard), are refused.
- DICOM (`.dcm`, `.dicom`, or any data with the `DICM` preamble) is read with pydicom (the
  optional `dicom` extra) as a radiologist's viewer shows it: the modality rescale (slope,
  intercept), then the VOI window of the file (the first Window Center / Width, DICOM PS3.3
  C.11.2.1.2.1 linear function; else its VOI LUT; else the full range of the values, min..max) to
  0..255, then MONOCHROME1 inverted (its 0 is white). Colour DICOM goes through the luma above; of a
  multi-frame file the first frame is read (noted). A compressed transfer syntax that no installed
  decoder reads is refused naming the file and the syntax.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import os
import pathlib
import struct
import warnings
from typing import Iterable, Union

import numpy as np
from absl import logging
from PIL import Image
from PIL import ImageOps
from PIL import UnidentifiedImageError

from cxr_jax.errors import DataError

# Suffixes read as images; anything else in a class folder (xlsx, txt, csv) is ignored.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm",
                  ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")
# A side shorter than this cannot hold a radiograph (1x1 placeholders, thumbnails of icons).
MIN_SIDE = 16

Source = Union[str, os.PathLike, bytes]
# What PIL raises on bad data, besides its own UnidentifiedImageError / DecompressionBomb*.
_PIL_FAILURES = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError,
                 MemoryError, ZeroDivisionError, struct.error)


class ImageError(DataError):
  """One file cannot be decoded to a radiograph; `name` and `reason` feed the skip warning."""

  def __init__(self, name: str, reason: str):
    super().__init__(f"{name}: {reason}")
    self.name = name
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Decoded:
  pixels: np.ndarray  # uint8 [size, size]
  notes: tuple[str, ...]  # conversions applied, e.g. ("RGB -> grayscale",)
  original_size: tuple[int, int]  # (width, height) after EXIF rotation


def pixel_hash(pixels: np.ndarray) -> str:
  """sha256 of decoded uint8 pixels: equal images at one size have equal hashes (dedup, leakage)."""
  return hashlib.sha256(np.ascontiguousarray(pixels, np.uint8).tobytes()).hexdigest()


def is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_SUFFIXES)


def has_dicom_preamble(path: str | os.PathLike) -> bool:
  """Whether a file (often suffix-less, as DICOM files come off a scanner) starts like DICOM."""
  try:
    with open(path, "rb") as f:
      return _is_dicom_data(f.read(132))
  except OSError:
    return False


def _is_dicom_data(data: bytes) -> bool:
  return len(data) >= 132 and data[128:132] == b"DICM"


def decode(source: Source, size: int, *, name: str | None = None) -> Decoded:
  """Decodes one file to uint8 [size, size]; raises ImageError naming the file on bad input."""
  with bomb_guard():
    return decode_unguarded(source, size, name=name)


def decode_unguarded(source: Source, size: int, *, name: str | None = None) -> Decoded:
  """`decode` without installing the decompression-bomb warning filter.

  `warnings.catch_warnings` is process-global and not thread-safe, so batch decoders enter
  `bomb_guard()` once around their thread pool and call this from the workers.
  """
  if name is None:
    name = "<bytes>" if isinstance(source, bytes) else str(source)
  data = _read(source, name)
  if not data:
    raise ImageError(name, "empty file (0 bytes)")
  if _is_dicom_data(data) or name.lower().endswith(DICOM_SUFFIXES):
    return _decode_dicom(data, size, name)
  try:
    im = Image.open(io.BytesIO(data))
    fmt = im.format or "?"
    im.load()
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ImageError(name, f"refused as a possible decompression bomb ({_short(e)}); raise "
                     "PIL.Image.MAX_IMAGE_PIXELS if the file is genuine") from None
  except UnidentifiedImageError:
    raise ImageError(name, f"not an image file (unrecognised format, {len(data)} bytes, starts "
                     f"with {data[:8]!r})") from None
  except _PIL_FAILURES as e:
    raise ImageError(name, f"truncated or corrupt {_fmt_name(data)}file ({_short(e)})") from None
  try:
    return _to_gray(im, size, name)
  except ImageError:
    raise
  except _PIL_FAILURES as e:
    raise ImageError(name, f"cannot convert {fmt} image of mode {im.mode} ({_short(e)})") from None


class bomb_guard(warnings.catch_warnings):  # pylint: disable=invalid-name
  """Context manager that turns PIL's DecompressionBombWarning into an error (see decode)."""

  def __enter__(self):
    out = super().__enter__()
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    return out


def _read(source: Source, name: str) -> bytes:
  if isinstance(source, (bytes, bytearray, memoryview)):
    return bytes(source)
  try:
    return pathlib.Path(source).read_bytes()
  except IsADirectoryError:
    raise ImageError(name, "is a directory, not an image file") from None
  except OSError as e:
    raise ImageError(name, f"cannot read ({e.strerror or e})") from None


def _short(e: BaseException) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return text if len(text) <= 160 else text[:157] + "..."


def _fmt_name(data: bytes) -> str:
  if data.startswith(b"\x89PNG"):
    return "PNG "
  if data.startswith(b"\xff\xd8"):
    return "JPEG "
  return ""


def _to_gray(im: Image.Image, size: int, name: str) -> Decoded:
  """Rotates per EXIF, converts any mode to gray and resizes; returns pixels and notes."""
  notes: list[str] = []
  w, h = im.size
  if min(w, h) < MIN_SIDE:
    raise ImageError(name, f"too small to be a radiograph ({w}x{h} px; minimum side {MIN_SIDE} px)")
  orientation = _exif_orientation(im)
  if orientation in (2, 3, 4, 5, 6, 7, 8):
    im = ImageOps.exif_transpose(im)
    notes.append(f"EXIF orientation {orientation} applied")
  elif orientation not in (None, 1):  # PIL leaves such images as stored: say so, not 'applied'
    notes.append(f"invalid EXIF orientation {orientation!r} ignored")
  w, h = im.size
  mode = im.mode
  gray: Image.Image  # mode 'L' or 'F' (values in [0, 255])
  if mode == "L":
    gray = im
  elif mode == "1":
    gray = im.convert("L")
    notes.append("1-bit -> 8-bit gray")
  elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
    gray, note = _high_bit_depth(np.asarray(im), mode)
    notes.append(note)
  elif mode == "F":
    gray, note = _float(np.asarray(im, np.float32))
    notes.append(note)
  elif mode in ("LA", "La", "RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info):
    gray = _composite_on_black(im.convert("RGBA"))
    notes.append(f"{mode}{' with transparency' if mode == 'P' else ''} -> grayscale "
                 "(alpha composited on black)")
  elif mode == "P":
    gray = im.convert("RGB").convert("L")
    notes.append("palette -> grayscale")
  elif mode == "CMYK":
    gray = im.convert("RGB").convert("L")
    notes.append("CMYK -> grayscale")
  elif mode in ("RGB", "RGBX", "YCbCr", "LAB", "HSV"):
    gray = im.convert("RGB").convert("L")
    notes.append(f"{mode} -> grayscale")
  else:
    gray = im.convert("RGB").convert("L")
    notes.append(f"{mode} -> grayscale")
  return _finish(gray, size, notes, w, h)


def _finish(gray: Image.Image, size: int, notes: list[str], w: int, h: int) -> Decoded:
  """Resizes gray ('L', or 'F' in [0, 255]) to the square and rounds to uint8."""
  if w != h and abs(w / h - 1.0) > 0.01:
    notes.append(f"aspect {w}x{h} resized to square")
  if gray.size != (size, size):
    gray = gray.resize((size, size), Image.Resampling.LANCZOS)
  pixels = np.asarray(gray)
  if pixels.dtype != np.uint8:
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
  return Decoded(np.ascontiguousarray(pixels), tuple(notes), (w, h))


def _exif_orientation(im: Image.Image) -> int | None:
  try:
    return im.getexif().get(0x0112)
  except Exception:  # pylint: disable=broad-except
    return None  # unreadable EXIF: the pixels are still usable, keep them as stored


def _high_bit_depth(a: np.ndarray, mode: str) -> tuple[Image.Image, str]:
  a = a.astype(np.float32)
  lo, hi = float(a.min()), float(a.max())
  if lo < 0 or hi > 65535:
    return _stretch(a, f"{mode} values {lo:g}..{hi:g} -> 8-bit (stretched min..max)")
  # The bit depth the data occupy: 8-bit or 12-bit values in a 16-bit container are common.
  bits = next(b for b in (8, 12, 16) if hi <= 2**b - 1)
  scale = 2.0**bits - 1
  note = f"{mode} {bits}-bit data -> 8-bit (scaled by 255/{scale:.0f})"
  return Image.fromarray(a * (255.0 / scale), mode="F"), note


def _float(a: np.ndarray) -> tuple[Image.Image, str]:
  a = np.nan_to_num(a)
  lo, hi = float(a.min()), float(a.max())
  if lo >= 0 and hi <= 1.0:
    return Image.fromarray(a * 255.0, mode="F"), "float [0, 1] -> 8-bit"
  return _stretch(a, f"float values {lo:g}..{hi:g} -> 8-bit (stretched min..max)")


def _stretch(a: np.ndarray, note: str) -> tuple[Image.Image, str]:
  lo, hi = float(a.min()), float(a.max())
  out = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
  return Image.fromarray(out.astype(np.float32), mode="F"), note


def _composite_on_black(rgba: Image.Image) -> Image.Image:
  a = np.asarray(rgba, np.float32)
  rgb = a[..., :3] * (a[..., 3:4] / 255.0)
  luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)  # the weights of PIL's 'L' conversion
  return Image.fromarray(luma.astype(np.float32), mode="F")


class ConversionNotes:
  """Collects the conversions of a run and logs them once, grouped by kind, naming the files."""

  def __init__(self):
    self._files: dict[str, list[str]] = collections.defaultdict(list)

  def add(self, name: str, notes: Iterable[str]) -> None:
    for note in notes:
      self._files[_kind(note)].append(name)

  def as_dict(self) -> dict[str, list[str]]:
    return {k: sorted(v) for k, v in sorted(self._files.items())}

  def log(self, show: int = 5) -> None:
    for kind, files in self.as_dict().items():
      shown = ", ".join(files[:show]) + (f" and {len(files) - show} more" if len(files) > show
                                         else "")
      logging.info("Converted %d image(s): %s: %s", len(files), kind, shown)


def _kind(note: str) -> str:
  """Groups notes that differ only in numbers ('EXIF orientation 6 applied', 'aspect 300x200')."""
  if note.startswith("aspect "):
    return "non-square resized to square"
  if note.startswith("EXIF orientation"):
    return "EXIF orientation applied"
  if "stretched" in note:
    return note.split(" values")[0] + " stretched min..max to 8-bit"
  return note



def _decode_dicom(data: bytes, size: int, name: str) -> Decoded:
  """DICOM -> uint8 [size, size]: rescale, VOI window, MONOCHROME1 inversion (see module doc)."""
  try:
    import pydicom  # pylint: disable=import-outside-toplevel
    from pydicom import pixels as dicom_pixels  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImageError(name, "a DICOM file, and pydicom is not installed (pip install pydicom, "
                     "or the package's 'dicom' extra)") from None
  try:
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
  except Exception as e:  # pylint: disable=broad-except  # pydicom raises many kinds on bad data
    raise ImageError(name, f"unreadable DICOM file ({_short(e)})") from None
  if "PixelData" not in ds:
    raise ImageError(name, "no DICOM pixel data (not a DICOM image, or a report or "
                     "structured data)")
  syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
  try:
    a = ds.pixel_array
  except Exception as e:  # pylint: disable=broad-except
    if syntax is not None and syntax.is_compressed:
      raise ImageError(name, f"compressed DICOM ({syntax.name}, {syntax}) that no installed "
                       "decoder reads; install pylibjpeg with pylibjpeg-libjpeg / "
                       "pylibjpeg-openjpeg, or python-gdcm, or convert the file to "
                       f"uncompressed DICOM or PNG ({_short(e)})") from None
    raise ImageError(name, f"cannot decode the DICOM pixel data ({_short(e)})") from None
  notes: list[str] = []
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  samples = int(ds.get("SamplesPerPixel", 1) or 1)
  if frames > 1:
    a = a[0]
    notes.append("DICOM multi-frame: first frame read")
  if samples > 1:  # colour (pydicom gives YBR as RGB): the luma of the other formats
    a = np.asarray(a, np.float32)[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    notes.append(f"DICOM {photometric} -> grayscale")
    values = a
  else:
    values = dicom_pixels.apply_modality_lut(a, ds).astype(np.float64)
  if a.ndim != 2:
    raise ImageError(name, f"DICOM pixel data of shape {a.shape} is not one 2-D image")
  h, w = a.shape
  if min(w, h) < MIN_SIDE:
    raise ImageError(name, f"too small to be a radiograph ({w}x{h} px; minimum side {MIN_SIDE} px)")
  if samples > 1:
    gray = np.clip(values, 0, 255)
  else:
    gray = _voi_window(values, ds, a, notes)
    if photometric == "MONOCHROME1":
      gray = 255.0 - gray
      notes.append("DICOM MONOCHROME1 inverted")
  return _finish(Image.fromarray(gray.astype(np.float32), mode="F"), size, notes, w, h)


def _voi_window(values: np.ndarray, ds, stored: np.ndarray, notes: list[str]) -> np.ndarray:
  """Modality values -> float [0, 255] through the file's VOI window, VOI LUT or full range."""
  center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
  if center is not None and width is not None:
    c = float(center[0] if _multi(center) else center)
    w = float(width[0] if _multi(width) else width)
    if w > 1:
      return window(values, c, w)
    notes.append(f"DICOM window width {w:g} <= 1 ignored")
  if "VOILUTSequence" in ds:
    from pydicom import pixels as dicom_pixels  # pylint: disable=import-outside-toplevel
    values = dicom_pixels.apply_voi_lut(stored, ds).astype(np.float64)
    notes.append("DICOM VOI LUT applied")
  else:
    notes.append("DICOM without a VOI window: full range -> 8-bit")
  lo, hi = float(values.min()), float(values.max())
  return (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)


def window(values: np.ndarray, center: float, width: float) -> np.ndarray:
  """DICOM's linear VOI function (PS3.3 C.11.2.1.2.1) to [0, 255]: values at or below
  c - 0.5 - (w - 1) / 2 are 0, above c - 0.5 + (w - 1) / 2 are 255, linear in between."""
  out = ((np.asarray(values, np.float64) - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
  return np.clip(out, 0.0, 255.0)


def _multi(value) -> bool:
  return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"
