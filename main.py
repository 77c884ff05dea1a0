"""Entry point: `python main.py --config=configs/<task>.py[:variant] [--workdir=DIR]`.

Examples:
  python main.py --config=configs/experiment.py:demo          # whole pipeline, synthetic data, CPU
  python main.py --config=configs/pix2pix.py --config.data.data_dir=/data/COVID-19_Radiography_Database
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cxr_jax import runtime
from cxr_jax import tasks
from cxr_jax import workdir as workdir_lib
from cxr_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<task>.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config.name>).")
flags.DEFINE_bool("overwrite", False, "Start afresh in a workdir that holds a run of another "
                  "config (the old contents are moved aside, not deleted).")
flags.mark_flags_as_required(["config"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad config file, variant or override reported in one line.

  Errors raised while loading the config file come wrapped in their traceback's text, and an
  override of a key the config lacks (`--config.batch_sizee=8`) raises from inside the parser;
  both are user errors (exit code 2), not crashes.
  """
  try:
    args = FLAGS(argv)
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  try:
    runtime.initialize(config)
    task = tasks.get(config.task)
    workdir = workdir_lib.prepare(FLAGS.workdir or f"runs/{config.name}", config,
                                  overwrite=FLAGS.overwrite)
    logging.info("Task %s, workdir %s, config:\n%s", config.task, workdir, config)
    task(config, workdir)
  except UserError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
