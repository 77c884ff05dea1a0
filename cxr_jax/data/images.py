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
- Non-square images are resized to the square (`resize="squash"`, the default: aspect not kept, the
  whole chest stays in view, as in the paper's 256 x 256 inputs) or, with `resize="pad"`, scaled to
  fit and centred on black (aspect kept); either is noted. Resampling is Lanczos, which in PIL is
  antialiased when downscaling (area-aware support).
- An EXIF orientation outside 1..8 is ignored (PIL cannot apply it) and noted as such.
- Images smaller than `MIN_SIDE` on a side, or larger than PIL's `Image.MAX_IMAGE_PIXELS`
  (decompression-bomb guard), are refused.
- DICOM (`.dcm`, `.dicom`, or any data with the `DICM` preamble) is read with pydicom (the
  optional `dicom` extra) through pydicom's own pixel pipeline, as a viewer shows it:
  `apply_modality_lut` (rescale slope / intercept or Modality LUT), then `apply_voi_lut` (the VOI
  LUT Sequence, else the first Window Center / Width with its VOI LUT Function: LINEAR,
  LINEAR_EXACT or SIGMOID), scaled from that function's output range to 0..255 in float (no VOI:
  the values' min..max; an invalid window is noted and the full range used), then inverted when
  the Presentation LUT Shape is INVERSE or the image MONOCHROME1 (its 0 is white). The float image
  is resized and quantised to 8 bits once, at the end. Colour DICOM goes through the luma above;
  of a multi-frame file the first frame is read (noted). A compressed transfer syntax that no
  installed decoder reads is refused naming the file and the syntax (pydicom's own records of the
  failure go to the log file: `console.py`). The header's PatientID, ViewPosition, PatientSex and
  PatientAge are returned as metadata (`patient_id`, `view`, `sex`, `age`).
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


RESIZE_MODES = ("squash", "pad")


@dataclasses.dataclass(frozen=True)
class Decoded:
  pixels: np.ndarray  # uint8 [size, size]
  notes: tuple[str, ...]  # conversions applied, e.g. ("RGB -> grayscale",)
  original_size: tuple[int, int]  # (width, height) after EXIF rotation
  metadata: dict[str, str] = dataclasses.field(default_factory=dict)  # from a DICOM header


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


def decode(source: Source, size: int, *, name: str | None = None,
           resize: str = "squash") -> Decoded:
  """Decodes one file to uint8 [size, size]; raises ImageError naming the file on bad input.
  `resize`: 'squash' (to the square) or 'pad' (aspect kept, centred on black)."""
  with bomb_guard():
    return decode_unguarded(source, size, name=name, resize=resize)


def decode_unguarded(source: Source, size: int, *, name: str | None = None,
                     resize: str = "squash") -> Decoded:
  """`decode` without installing the decompression-bomb warning filter.

  `warnings.catch_warnings` is process-global and not thread-safe, so batch decoders enter
  `bomb_guard()` once around their thread pool and call this from the workers.
  """
  if resize not in RESIZE_MODES:
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
  if name is None:
    name = "<bytes>" if isinstance(source, bytes) else str(source)
  data = _read(source, name)
  if not data:
    raise ImageError(name, "empty file (0 bytes)")
  if _is_dicom_data(data) or name.lower().endswith(DICOM_SUFFIXES):
    return _decode_dicom(data, size, name, resize)
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
    return _to_gray(im, size, name, resize)
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


def _to_gray(im: Image.Image, size: int, name: str, resize: str = "squash") -> Decoded:
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
  return _finish(gray, size, notes, w, h, resize)


def _finish(gray: Image.Image, size: int, notes: list[str], w: int, h: int,
            resize: str = "squash", metadata: dict[str, str] | None = None) -> Decoded:
  """Resizes gray ('L', or 'F' in [0, 255]) to the square (squashed or padded) and rounds to
  uint8: the one quantisation of float data."""
  square = w == h or abs(w / h - 1.0) <= 0.01
  if resize == "pad" and w != h:
    scale = size / max(w, h)
    fit = (max(1, round(w * scale)), max(1, round(h * scale)))
    if gray.size != fit:
      gray = gray.resize(fit, Image.Resampling.LANCZOS)
    canvas = Image.new(gray.mode, (size, size), 0)
    canvas.paste(gray, ((size - fit[0]) // 2, (size - fit[1]) // 2))
    gray = canvas
    if not square:
      notes.append(f"aspect {w}x{h} padded to square")
  else:
    if not square:
      notes.append(f"aspect {w}x{h} resized to square")
    if gray.size != (size, size):
      gray = gray.resize((size, size), Image.Resampling.LANCZOS)
  pixels = np.asarray(gray)
  if pixels.dtype != np.uint8:
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
  return Decoded(np.ascontiguousarray(pixels), tuple(notes), (w, h), dict(metadata or {}))


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
  if note.startswith("aspect ") and note.endswith("padded to square"):
    return "non-square padded to square (aspect kept)"
  if note.startswith("aspect "):
    return "non-square resized to square"
  if note.startswith("EXIF orientation"):
    return "EXIF orientation applied"
  if "stretched" in note:
    return note.split(" values")[0] + " stretched min..max to 8-bit"
  return note



def _decode_dicom(data: bytes, size: int, name: str, resize: str = "squash") -> Decoded:
  """DICOM -> uint8 [size, size] through pydicom's pixel pipeline (see module doc)."""
  try:
    import pydicom  # pylint: disable=import-outside-toplevel
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
  if a.ndim != 2:
    raise ImageError(name, f"DICOM pixel data of shape {a.shape} is not one 2-D image")
  h, w = a.shape
  if min(w, h) < MIN_SIDE:
    raise ImageError(name, f"too small to be a radiograph ({w}x{h} px; minimum side {MIN_SIDE} px)")
  if samples > 1:
    gray = np.clip(a, 0, 255)
  else:
    try:
      gray = display_values(a, ds, notes)
    except (ValueError, NotImplementedError, AttributeError, TypeError, IndexError) as e:
      raise ImageError(name, f"cannot apply the DICOM modality / VOI LUT ({_short(e)})") from None
  return _finish(Image.fromarray(gray.astype(np.float32), mode="F"), size, notes, w, h, resize,
                 dicom_metadata(ds))


def display_values(stored: np.ndarray, ds, notes: list[str] | None = None) -> np.ndarray:
  """Stored monochrome values -> float64 [0, 255] as displayed, unquantised (see module doc)."""
  from pydicom import pixels as dicom_pixels  # pylint: disable=import-outside-toplevel
  notes = [] if notes is None else notes
  modality = dicom_pixels.apply_modality_lut(stored, ds)
  lut = _voi_lut_item(ds)
  gray = None
  if lut is not None:
    if not np.issubdtype(modality.dtype, np.integer):  # a LUT's inputs are whole numbers
      modality = np.rint(modality).astype(np.int64)
    out = np.asarray(dicom_pixels.apply_voi_lut(modality, ds), np.float64)
    table = np.asarray(dicom_pixels.apply_voi_lut(np.arange(lut[0], lut[1] + 1), ds), np.float64)
    gray = _scale(out, float(table.min()), float(table.max()))
    notes.append("DICOM VOI LUT applied")
  elif "WindowCenter" in ds and "WindowWidth" in ds:
    try:
      out = dicom_pixels.apply_voi_lut(modality, ds, prefer_lut=False)
      # The function's output range, as pydicom computes it: the images of -inf and +inf.
      y0, y1 = dicom_pixels.apply_voi_lut(np.array([-np.inf, np.inf]), ds, prefer_lut=False)
      gray = _scale(np.asarray(out, np.float64), float(y0), float(y1))
    except ValueError as e:  # an invalid width, an unknown VOI LUT Function
      notes.append(f"DICOM window ignored ({_short(e)}): full range -> 8-bit")
  else:
    notes.append("DICOM without a VOI window: full range -> 8-bit")
  if gray is None:
    values = np.asarray(modality, np.float64)
    gray = _scale(values, float(values.min()), float(values.max()))
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
  shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
  if photometric == "MONOCHROME1" or shape == "INVERSE":
    gray = 255.0 - gray
    notes.append(f"DICOM {'MONOCHROME1' if photometric == 'MONOCHROME1' else 'INVERSE'} "
                 "inverted")
  return gray


def _voi_lut_item(ds) -> tuple[int, int] | None:
  """(first, last) input value of the VOI LUT Sequence's first LUT, or None without one."""
  seq = ds.get("VOILUTSequence")
  if not seq or seq[0].get("LUTDescriptor") is None or seq[0].get("LUTData") is None:
    return None
  entries, first = int(seq[0].LUTDescriptor[0]) or 2**16, int(seq[0].LUTDescriptor[1])
  return first, first + entries - 1


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """values in [lo, hi] -> [0, 255] (0 when the range is empty; hi < lo flips, as a negative
  rescale slope does)."""
  if hi == lo:
    return np.zeros_like(values, np.float64)
  return np.clip((values - lo) * (255.0 / (hi - lo)), 0.0, 255.0)


def dicom_metadata(ds) -> dict[str, str]:
  """patient_id, view, sex, age (years) from a DICOM header; only the values present."""
  out = {}
  for key, tag in (("patient_id", "PatientID"), ("view", "ViewPosition"), ("sex", "PatientSex")):
    value = str(ds.get(tag, "") or "").strip()
    if value:
      out[key] = value.upper() if key != "patient_id" else value
  if out.get("sex") not in (None, "M", "F", "O"):
    out.pop("sex")
  age = str(ds.get("PatientAge", "") or "").strip().upper()  # AS: nnnD, nnnW, nnnM or nnnY
  if len(age) == 4 and age[:3].isdigit() and age[3] in "DWMY":
    years = int(age[:3]) / {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[age[3]]
    out["age"] = f"{round(years, 2):g}"
  return out
