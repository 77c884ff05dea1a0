"""The tasks that `main.py` dispatches on (`config.task`), imported lazily so that a run pays
only for the modules its task needs."""

from __future__ import annotations

import importlib
from typing import Callable

from cxr_jax.errors import ConfigError

# task name -> "module:function"; each function takes (config, workdir: pathlib.Path).
TASKS = {
    "prepare_data": "cxr_jax.data.dataset:prepare_task",
    "translator": "cxr_jax.pipeline.translators:translator_task",   # config.translator's
    "classifier": "cxr_jax.pipeline.classify:train_and_evaluate",
    "synthesize": "cxr_jax.pipeline.synthesize:synthesize_task",
    "predict": "cxr_jax.evaluation.predict:predict_task",
    "experiment": "cxr_jax.pipeline.experiment:run_experiment",
    "translate": "cxr_jax.pipeline.translate:translate_task",
    "export": "cxr_jax.pipeline.export_task:export_task",
}


def get(name: str) -> Callable:
  if name not in TASKS:
    raise ConfigError(f"config.task: unknown task {name!r}; known tasks: {', '.join(TASKS)}")
  module, fn = TASKS[name].split(":")
  return getattr(importlib.import_module(module), fn)
