"""Atomic text writes: a crash or a kill never leaves a half-written config, manifest or report."""

from __future__ import annotations

import csv
import io
import os
from typing import Iterable, Sequence


def printable(name: str) -> str:
  """`name` with the bytes that are not UTF-8 (surrogate escapes from the file system) written as
  \\xNN: a str that can be encoded, logged, stored and written to CSV files."""
  return os.fsencode(name).decode("utf-8", "backslashreplace")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  tmp = f"{os.fspath(path)}.tmp"
  with open(tmp, "w", encoding="utf-8", newline="") as f:
    f.write(text)
  os.replace(tmp, path)


def write_csv_atomic(path: str | os.PathLike, header: Sequence[str],
                     rows: Iterable[Sequence[object]]) -> None:
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(header)
  writer.writerows(rows)
  write_text_atomic(path, buffer.getvalue())
