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
  app.run(main)
