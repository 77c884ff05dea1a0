"""cxr-jax: `cxr-jax --config=configs/<task>.py[:variant] [--workdir=DIR]` (or `python main.py ...`).

Examples:
  cxr-jax --config=configs/experiment.py:demo          # whole pipeline, synthetic data, CPU
  cxr-jax --config=configs/pix2pix.py --config.data.data_dir=/data/COVID-19_Radiography_Database

`--config=configs/x.py` is read relative to the current directory; when there is no such file,
the copy of `configs/` shipped with the installed package is used. The console shows this
project's messages, warnings and a progress bar per stage; everything (the libraries' INFO
records, Python warnings, the resolved config) goes to <workdir>/logs/<task>-<time>.log.
`--log_level=info` (or `debug`) shows the libraries' records on the console too.
`python -m cxr_jax` is the same command.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cxr_jax import configlib
from cxr_jax import console
from cxr_jax import runtime
from cxr_jax import tasks
from cxr_jax import workdir as workdir_lib
from cxr_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<task>.py[:variant]); "
                                "falls back to the installed package's configs/.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config.name>).")
flags.DEFINE_bool("overwrite", False, "Start afresh in a workdir that holds a run of another "
                  "config (the old contents are moved aside, not deleted).")
flags.DEFINE_enum("log_level", "default", list(console.LEVELS),
                  "Console: 'default' shows this project's messages, everyone's warnings and a "
                  "progress bar per stage; 'info' adds the libraries' INFO records (Orbax, TFDS, "
                  "absl, jax) and Python warnings; 'debug' adds DEBUG records (console and log "
                  "file). Everything is always in <workdir>/logs/<task>-<time>.log.")
_OUR_FLAGS = ("config", "workdir", "overwrite", "log_level")

# Files and folders a task leaves at the top of its workdir, named in the closing summary.
_OUTPUTS = ("report.md", "metrics.md", "predictions.csv", "generator", "synthetic",
            "training_curves.png", "tensorboard", "translated", "manifest.csv",
            "generator.safetensors", "classifier.safetensors")


def packaged_configs_dir() -> pathlib.Path | None:
  """The `configs/` folder shipped with the package: inside it when installed from a wheel,
  beside it in a source checkout (also an editable install)."""
  here = pathlib.Path(__file__).resolve().parent
  for candidate in (here / "configs", here.parent / "configs"):
    if (candidate / "experiment.py").is_file():
      return candidate
  return None


def config_catalogue(configs_dir: pathlib.Path | None = None) -> str:
  """The tasks and each config's variants, read from the config files (`VARIANTS`, the default
  first, and the first line of the docstring): what `--help` and a run without --config show."""
  configs_dir = configs_dir or packaged_configs_dir()
  if configs_dir is None:
    return ""
  entries = []
  for path in sorted(configs_dir.glob("*.py")):
    try:
      module = configlib.load_config_module(path)
      variants = tuple(module.VARIANTS)
      task = str(module.get_config(variants[0]).task)
      summary = (module.__doc__ or "").strip().splitlines()[0]
    except Exception as e:  # pylint: disable=broad-except  (a user's broken copy: say so, go on)
      entries.append((len(tasks.TASKS), "?", path.name, f"(cannot read it: {e})", ()))
      continue
    order = list(tasks.TASKS).index(task) if task in tasks.TASKS else len(tasks.TASKS)
    entries.append((order, task, path.name, summary, variants))
  lines = ["Tasks and their configs (--config=configs/<file>[:<variant>]; variants, default "
           "first):"]
  for _, task, name, summary, variants in sorted(entries):
    shown = ", ".join(f":{v}" if v else "(none)" for v in variants)
    lines += [f"  {task:<13} configs/{name:<18} {shown}", f"  {'':<13} {summary}"]
  return "\n".join(lines)


def resolve_config_arg(argv: list[str]) -> list[str]:
  """`--config=configs/x.py[:v]` missing relative to the cwd -> the packaged copy, if it has one."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      value, prefix = arg[len("--config="):], "--config="
    elif arg == "--config" and i + 1 < len(out):
      value, prefix, i = out[i + 1], "", i + 1
    else:
      continue
    path, sep, variant = value.partition(":")
    packaged = packaged_configs_dir()
    if not os.path.exists(path) and packaged is not None:
      name = pathlib.PurePath(path)
      if len(name.parts) == 1 or (len(name.parts) == 2 and name.parts[0] == "configs"):
        if (packaged / name.name).is_file():
          out[i] = prefix + str(packaged / name.name) + sep + variant
    break
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad config file, variant or override reported in one line.

  Errors raised while loading the config file come wrapped in their traceback's text, and an
  override of a key the config lacks (`--config.batch_sizee=8`) raises from inside the parser;
  both are user errors (exit code 2), not crashes.
  """
  argv = resolve_config_arg(argv)
  try:
    args = FLAGS(argv)
    if FLAGS.config is None:  # a bare run: what there is to run
      print(f"{_usage()}\n\nerror: --config is required: one of the configs above",
            file=sys.stderr)
      sys.exit(2)
    FLAGS.config.get("task")  # a config file that failed to load raises only when first used
    return args
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
      # "flag --config=x.py:v: Error whilst parsing config file:" ... "ValueError: <message>"
      head = lines[0].split(": Error whilst parsing")[0]
      last = lines[-1].split(": ", 1)[-1]
      message = f"{head}: {last}"
    else:
      message = " ".join(lines)
  except OSError as e:  # the config file itself could not be read
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    message = f"--config: {lines[-1] if lines else e}"
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    # ml_collections nests the KeyError's repr in its message: 'key'\n Did you mean "..."?
    text = text.replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
    key, _, hint = text.partition("Did you mean")
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    quotes = "'\" "
    message = (f"bad config override ({', '.join(overrides) or 'none given'}): no key "
               f"{key.strip(quotes)!r}" + (f"; did you mean{hint.rstrip(quotes)}" if hint else ""))
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  console.setup(FLAGS.log_level)
  started = time.perf_counter()
  # What the log file, the messages and the summary call the run: the translator's own name.
  what = config.get("translator", config.task) if config.task == "translator" else config.task
  try:
    workdir = FLAGS.workdir or f"runs/{config.name}"
    if not runtime.joins_multihost(config):  # else process 0's, once the processes have joined
      workdir_lib.lock(workdir)
    runtime.initialize(config)
    task = tasks.get(config.task)
    workdir = workdir_lib.prepare(workdir, config, overwrite=FLAGS.overwrite)
    log_file = console.start_log_file(workdir, what, writer=workdir_lib.is_writer())
    logging.info("Task %s, workdir %s%s", what, workdir,
                 f", full log {log_file}" if log_file else "")
    logging.info("Config:\n%s", config, extra=console.FILE_ONLY)
    task(config, workdir)
  except UserError as e:
    logging.error("%s", e, extra=console.FILE_ONLY)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except Exception:  # a crash: its traceback goes to the console as usual, and into the log file
    logging.exception("%s failed", what, extra=console.FILE_ONLY)
    raise
  finally:  # the workdir's lock (also released by the OS if this process dies)
    workdir_lib.release()
  if workdir_lib.is_writer():
    print(closing_summary(what, workdir, time.perf_counter() - started,
                          console.log_path(), console.python_warnings()), file=sys.stderr)


def closing_summary(task: str, workdir: pathlib.Path, seconds: float,
                    log_file: pathlib.Path | None = None, python_warnings: int = 0) -> str:
  """What ran, how long it took, where its outputs are; for the experiment, the headline table."""
  workdir = pathlib.Path(workdir)
  lines = ["", f"Done: {task} in {console.fmt_seconds(seconds)}. Outputs in {workdir}"]
  present = [name for name in _OUTPUTS if (workdir / name).exists()]
  if present:
    lines.append("  " + "  ".join(name + ("/" if (workdir / name).is_dir() else "")
                                  for name in present))
  lines += _headline(workdir)
  if log_file is not None:
    note = (f" ({python_warnings} Python warning(s) there)" if python_warnings else "")
    lines.append(f"Full log: {log_file}{note}")
  return "\n".join(lines)


def _headline(workdir: pathlib.Path) -> list[str]:
  """The experiment's results table from report.json (see pipeline/report.py), if there is one."""
  path = workdir / "report.json"
  if not path.is_file():
    return []
  try:
    report = json.loads(path.read_text())
    # Imported here, not at the top: the report module pulls in JAX, which `--help` and flag
    # errors should not wait for.
    from cxr_jax.pipeline.report import _fmt  # pylint: disable=import-outside-toplevel
    width = max([len("training data / init")] + [len(k) for k in report["table"]])
    rows = [f"  {'training data / init':<{width}} {'accuracy %':<28} macro-F1 %"]
    skipped: dict[str, list[str]] = {}  # reason -> rows: one line per reason
    for key, entry in report["table"].items():
      if "skipped" in entry:
        skipped.setdefault(str(entry["skipped"]), []).append(key)
      else:
        rows.append(f"  {key:<{width}} {_fmt(entry['accuracy']):<28} "
                    f"{_fmt(entry['macro_f1'])}")
    rows += [f"  {', '.join(keys)}: skipped: {reason}" for reason, keys in skipped.items()]
    answer = [f"  {line.replace('**', '')}"
              for line in ((report.get("headline") or {}).get("lines", [])
                           + (report.get("reading_lungs") or {}).get("lines", []))]
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return [f"  (cannot read {path}: {e})"]
  seeds = report.get("seeds", [])
  n_splits = len(report.get("splits") or [None])
  if answer:
    rows = rows + ["Answer:"] + answer
  over = f"{len(seeds)} seed(s)" + (f" x {n_splits} splits" if n_splits > 1 else "")
  return ([f"Test results in %, mean ± std [95 % CI] over {over}:"]
          + rows + [f"Report: {workdir / 'report.md'}"])


def _usage() -> str:
  catalogue = config_catalogue()
  return __doc__.strip() + (f"\n\n{catalogue}" if catalogue else "")


def run() -> None:
  """The `cxr-jax` console command (and `python main.py`, `python -m cxr_jax`)."""
  main_module = sys.modules.get("__main__")
  if main_module is not None:
    main_module.__doc__ = _usage() + "\n"  # absl's --help prints the main module's docstring
  for name in _OUR_FLAGS:  # and lists the main module's flags: ours, though defined here
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
  app.run(main, flags_parser=parse_flags)
