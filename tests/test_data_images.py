"""Every kind of file in users' copies decodes to the right 8-bit gray pixels, or fails clearly."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from cxr_jax.data import images
from cxr_jax.errors import DataError

S = 64


def _bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


def _decode(data: bytes, size: int = S) -> images.Decoded:
  return images.decode(data, size, name="x.png")


def test_gray_png_unchanged():
  a = np.arange(S * S, dtype=np.uint8).reshape(S, S)
  out = _decode(_bytes(Image.fromarray(a)))
  np.testing.assert_array_equal(out.pixels, a)
  assert out.notes == () and out.pixels.dtype == np.uint8


def test_16bit_scaled_not_clipped():
  a = np.zeros((S, S), np.uint16)
  a[:, S // 2:] = 65535
  a[0, 0] = 257 * 100
  out = _decode(_bytes(Image.fromarray(a)))
  assert out.pixels[5, -1] == 255 and out.pixels[5, 0] == 0 and out.pixels[0, 0] == 100
  assert "16-bit" in out.notes[0]


def test_12bit_data_in_16bit_container():
  a = np.zeros((S, S), np.uint16)
  a[:, S // 2:] = 4095
  out = _decode(_bytes(Image.fromarray(a)))
  assert out.pixels[5, -1] == 255 and "12-bit" in out.notes[0]


def test_rgb_to_luma():
  out = _decode(_bytes(Image.new("RGB", (S, S), (255, 0, 0))))
  assert np.all(out.pixels == 76)  # 0.299 * 255
  assert out.notes == ("RGB -> grayscale",)


def test_rgba_composited_on_black():
  a = np.zeros((S, S, 4), np.uint8)
  a[..., :3] = 200
  a[:, S // 2:, 3] = 255  # right half opaque, left half transparent
  out = _decode(_bytes(Image.fromarray(a, "RGBA")))
  assert out.pixels[3, -3] == 200 and out.pixels[3, 2] == 0
  assert "alpha composited on black" in out.notes[0]


def test_la_composited_on_black():
  a = np.stack([np.full((S, S), 180, np.uint8), np.full((S, S), 128, np.uint8)], -1)
  out = _decode(_bytes(Image.fromarray(a, "LA")))
  assert abs(int(out.pixels[10, 10]) - 90) <= 1


def test_palette():
  im = Image.new("P", (S, S), 1)
  im.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
  out = _decode(_bytes(im))
  assert np.all(out.pixels == 150)  # 0.587 * 255
  assert out.notes == ("palette -> grayscale",)


def test_one_bit():
  a = np.zeros((S, S), bool)
  a[:, :S // 2] = True
  out = _decode(_bytes(Image.fromarray(a)))
  assert out.pixels[0, 0] == 255 and out.pixels[0, -1] == 0 and "1-bit" in out.notes[0]


def test_jpeg_gray():
  out = _decode(_bytes(Image.new("L", (S, S), 120), "JPEG", quality=95))
  assert np.abs(out.pixels.astype(int) - 120).max() <= 2


def test_cmyk_jpeg():
  im = Image.new("CMYK", (S, S), (0, 0, 0, 128))
  out = _decode(_bytes(im, "JPEG", quality=95))
  assert np.abs(out.pixels.astype(int) - 127).max() <= 3 and "CMYK" in out.notes[0]


def test_exif_rotation_applied():
  a = np.zeros((S, S), np.uint8)
  a[:S // 2, :S // 2] = 255  # bright top-left as stored
  im = Image.fromarray(a)
  exif = im.getexif()
  exif[0x0112] = 6  # display rotated 90 degrees clockwise
  out = _decode(_bytes(im, "JPEG", quality=95, exif=exif.tobytes()))
  q = S // 4
  assert out.pixels[q, -q] > 200 and out.pixels[q, q] < 50  # now bright top-right
  assert "EXIF orientation 6 applied" in out.notes


def test_resize_to_square_with_lanczos(tmp_path):
  path = tmp_path / "wide.png"
  Image.new("L", (200, 100), 77).save(path)
  out = images.decode(path, S)
  assert out.pixels.shape == (S, S) and np.all(out.pixels == 77)
  assert out.original_size == (200, 100) and any("aspect" in n for n in out.notes)


@pytest.mark.parametrize("case", ["truncated", "zero", "text", "tiny", "bomb", "big_bomb"])
def test_bad_files_raise_image_error_without_pil_traceback(tmp_path, monkeypatch, case):
  path = tmp_path / "bad.png"
  good = _bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (S, S), np.uint8)))
  data = {"truncated": good[:len(good) // 2], "zero": b"", "text": b"this is not a png\n",
          "tiny": _bytes(Image.new("L", (1, 1))), "bomb": good, "big_bomb": good}[case]
  if case == "bomb":
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", S * S - 1)  # warning zone
  if case == "big_bomb":
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", S * S // 3)  # error zone
  path.write_bytes(data)
  with pytest.raises(images.ImageError) as e:
    images.decode(path, S)
  assert isinstance(e.value, DataError) and str(path) in str(e.value)
  assert e.value.__cause__ is None  # no chained PIL traceback
  assert e.value.__context__ is None or e.value.__suppress_context__
  expected = {"truncated": "truncated", "zero": "empty", "text": "not an image",
              "tiny": "too small",
              "bomb": "decompression bomb", "big_bomb": "decompression bomb"}[case]
  assert expected in e.value.reason


def test_missing_file(tmp_path):
  with pytest.raises(images.ImageError, match="cannot read"):
    images.decode(tmp_path / "none.png", S)


def test_conversion_notes_are_aggregated(caplog):
  notes = images.ConversionNotes()
  for i in range(7):
    notes.add(f"f{i}.png", ["RGB -> grayscale"])
  notes.add("g.png", ["EXIF orientation 6 applied"])
  notes.add("h.png", ["EXIF orientation 3 applied"])
  with caplog.at_level(logging.INFO):
    notes.log()
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 2
  assert any("7 image(s)" in m and "f0.png" in m and "2 more" in m for m in lines)
  assert notes.as_dict()["EXIF orientation applied"] == ["g.png", "h.png"]
