"""What a run prints, and the log file that keeps everything else.

By default the console shows this project's own messages (INFO and up) and anyone's warnings
and errors, in a short format; the INFO chatter of the libraries underneath (Orbax's checkpoint
records, TFDS, etils, absl, jax) and Python warnings (e.g. SciPy's `LinAlgWarning`) go only to
`<workdir>/logs/<task>-<timestamp>.log`, which receives every record in absl's full format
(file:line, time, thread). `--log_level=info` brings the libraries' INFO records back on the
console, `--log_level=debug` turns DEBUG on for everything (console and file).

Libraries whose records only repeat what the project says in one line per file (pydicom: its
decoder errors come with a traceback, and the dataset layer names the file and the reason) are
kept off the console at every level but `--log_level=info|debug`: `FILE_ONLY_LOGGERS`.

A record logged with `extra=console.FILE_ONLY` goes to the log file only (the resolved config,
every progress report); the progress bars themselves are `training.summary.Progress`.
"""

from __future__ import annotations

import datetime
import logging
import os
import pathlib
import sys
import time

from absl import logging as absl_logging

LEVELS = ("default", "info", "debug")
FILE_ONLY = {"console": False}  # `logging.info(..., extra=FILE_ONLY)`: the log file only
FILE_ONLY_LOGGERS = ("pydicom",)  # their records (errors included) go to the log file only
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_MAIN_FILES = ("main.py",)

_state: dict = {"console": None, "buffer": None, "file": None, "log_path": None,
                "level": "default", "py_warnings": 0}


def _is_ours(record: logging.LogRecord) -> bool:
  path = os.path.abspath(record.pathname)
  return path.startswith(_PACKAGE_DIR + os.sep) or os.path.basename(path) in _MAIN_FILES


class _ConsoleFilter(logging.Filter):
  """Our own INFO and up, everyone's WARNING and up, each text once; Python warnings only in the
  log file. `--log_level=info|debug` lets every record through."""

  def __init__(self, level: str, writer: bool):
    super().__init__()
    self.level, self.writer = level, writer
    self._shown: set[str] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    if getattr(record, "console", True) is False:
      return False
    if record.name == "py.warnings":
      _state["py_warnings"] += 1
      return self.level != "default"
    if not self.writer:  # other hosts of a multi-host run: only what needs attention
      return record.levelno >= logging.WARNING
    if self.level != "default":
      return True
    if record.name.split(".")[0] in FILE_ONLY_LOGGERS:
      return False
    if record.levelno < logging.ERROR:  # said once: each stage re-reading the data repeats it
      text = record.getMessage()
      if text in self._shown:
        return False
      self._shown.add(text)
    return record.levelno >= logging.WARNING or (record.levelno >= logging.INFO and
                                                 _is_ours(record))


class _ConsoleFormatter(logging.Formatter):
  """`HH:MM:SS message`; warnings and errors say so. The full absl prefix is in the log file."""

  def format(self, record: logging.LogRecord) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    text = record.getMessage()
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    if record.levelno >= logging.ERROR:
      return f"{stamp} error: {text}"
    if record.levelno >= logging.WARNING:
      return f"{stamp} warning: {text}"
    return f"{stamp} {text}"


class _ConsoleHandler(logging.StreamHandler):
  """Writes through tqdm when it is loaded, so that a line never tears a progress bar."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      msg = self.format(record)
      if "tqdm" in sys.modules:
        sys.modules["tqdm"].tqdm.write(msg, file=self.stream)
      else:
        self.stream.write(msg + self.terminator)
      self.flush()
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


class _Buffer(logging.Handler):
  """Keeps the records logged before the workdir (and so the log file) is known."""

  def __init__(self):
    super().__init__(logging.NOTSET)
    self.records: list[logging.LogRecord] = []

  def emit(self, record: logging.LogRecord) -> None:
    if len(self.records) < 10_000:
      self.records.append(record)


def verbose() -> bool:
  """Whether `--log_level` asked for everything on the console (info or debug): then every
  progress report is a console line too, not one a minute."""
  return _state["console"] is not None and _state["level"] != "default"


def setup(level: str = "default") -> None:
  """Replaces absl's stderr handler by the quiet console; call once, after flag parsing."""
  if level not in LEVELS:
    raise ValueError(f"--log_level={level}: use one of {', '.join(LEVELS)}")
  root = logging.getLogger()
  teardown()
  absl_handler = absl_logging.get_absl_handler()
  if absl_handler in root.handlers:
    root.removeHandler(absl_handler)
  root.setLevel(logging.DEBUG if level == "debug" else logging.INFO)
  absl_logging.get_absl_logger().setLevel(logging.NOTSET)  # inherit the root's level
  console = _ConsoleHandler(sys.stderr)
  console.addFilter(_ConsoleFilter(level, writer=True))
  console.setFormatter(_ConsoleFormatter())
  buffer = _Buffer()
  root.addHandler(console)
  root.addHandler(buffer)
  logging.captureWarnings(True)  # Python warnings become records: the log file only
  _state.update(console=console, buffer=buffer, level=level, py_warnings=0)
  if not is_tty():
    _quiet_tfds_bars()


def _quiet_tfds_bars() -> None:
  """TFDS draws its own tqdm bars while preparing a dataset: on a terminal they say how far a
  long preparation is; in a log or a pipe each redraw is a line of noise."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  tfds.display_progress_bar(False)


def start_log_file(workdir: str | os.PathLike, task: str, *,
                   writer: bool = True) -> pathlib.Path | None:
  """Opens `<workdir>/logs/<task>-<timestamp>.log` (process 0 only), with what came before it.

  On other processes no file is written and the console shows warnings and errors only.
  """
  root = logging.getLogger()
  console, buffer = _state["console"], _state["buffer"]
  if console is not None:
    for f in console.filters:
      if isinstance(f, _ConsoleFilter):
        f.writer = writer
  if buffer is not None:
    root.removeHandler(buffer)
    _state["buffer"] = None
  if not writer:
    return None
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  logs = pathlib.Path(workdir) / "logs"
  logs.mkdir(parents=True, exist_ok=True)
  path = logs / f"{task}-{stamp}.log"
  n = 1
  while path.exists():
    n += 1
    path = logs / f"{task}-{stamp}-{n}.log"
  handler = logging.FileHandler(path, encoding="utf-8")
  handler.setLevel(logging.NOTSET)
  handler.setFormatter(absl_logging.PythonFormatter())
  for record in (buffer.records if buffer is not None else []):
    handler.handle(record)
  root.addHandler(handler)
  _state.update(file=handler, log_path=path)
  return path


def log_path() -> pathlib.Path | None:
  return _state["log_path"]


def python_warnings() -> int:
  """How many Python warnings went to the log file instead of the console."""
  return _state["py_warnings"]


def teardown() -> None:
  """Removes this module's handlers (the file is closed); tests and repeated runs call it."""
  root = logging.getLogger()
  for key in ("console", "buffer", "file"):
    handler = _state[key]
    if handler is not None:
      root.removeHandler(handler)
      handler.close()
      _state[key] = None
  _state["log_path"] = None
  _state["level"] = "default"


def is_tty() -> bool:
  """Whether the console is a terminal (progress bars) or a file / pipe (plain lines)."""
  try:
    return sys.stderr.isatty()
  except (AttributeError, ValueError):
    return False


def fmt_seconds(seconds: float) -> str:
  """`h:mm:ss`, `m:ss`, or `Nd h:mm:ss` beyond a day; '?' when unknown."""
  if seconds is None or not seconds == seconds or seconds in (float("inf"), float("-inf")):
    return "?"
  seconds = int(seconds)
  d, rem = divmod(seconds, 86400)
  h, rem = divmod(rem, 3600)
  m, s = divmod(rem, 60)
  if d:
    return f"{d}d {h}:{m:02d}:{s:02d}"
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
