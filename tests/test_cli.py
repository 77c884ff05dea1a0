"""main.py, the config files and the workdir guard."""

import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from cxr_jax import tasks
from cxr_jax import workdir as workdir_lib
from cxr_jax.errors import ConfigError, UserError

from conftest import REPO_ROOT

VARIANTS = {"pix2pix": ["", "cpu", "smoke"], "classifier": ["scratch", "transfer", "smoke"],
            "synthesize": ["", "smoke"], "experiment": ["paper", "demo", "smoke"],
            "predict": ["", "smoke"], "prepare_data": ["", "smoke"]}


def _load(name):
  spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_config_variant_builds_and_names_a_known_task(name):
  module = _load(name)
  assert "python main.py --config=configs/" in module.__doc__  # documents its command
  for variant in VARIANTS[name]:
    config = module.get_config(variant)
    assert config.task in tasks.TASKS
    assert config.name and config.data.image_size > 0 if "data" in config else True
  with pytest.raises(ValueError, match="unknown variant"):
    module.get_config("no-such-variant")


def test_unknown_task_lists_known_ones():
  with pytest.raises(ConfigError, match="known tasks: prepare_data, pix2pix"):
    tasks.get("nope")


def _main(*args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(REPO_ROOT / "main.py"), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_main_reports_bad_override_without_traceback(tmp_path):
  result = _main("--config=" + str(REPO_ROOT / "configs/pix2pix.py:smoke"),
                 "--config.batch_size=-1", f"--workdir={tmp_path / 'run'}", cwd=tmp_path)
  assert result.returncode == 2
  assert "config.batch_size" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, expected", [
    (["configs/pix2pix.py:nope"], "unknown variant 'nope' of configs/pix2pix.py"),
    (["configs/nothere.py"], "No such file or directory: 'configs/nothere.py'"),
    (["configs/pix2pix.py:smoke", "--config.batch_sizee=3"],
     "bad config override (--config.batch_sizee): no key 'batch_sizee'; did you mean \"batch_size\""),
    (["configs/pix2pix.py:smoke", "--config.batch_size=abc"], "--config.batch_size=abc"),
])
def test_main_reports_bad_config_flags_in_one_line(tmp_path, args, expected):
  """Errors inside absl's flag parsing (config file, variant, override) are user errors too."""
  (tmp_path / "configs").symlink_to(REPO_ROOT / "configs")
  result = _main(f"--config={args[0]}", *args[1:], f"--workdir={tmp_path / 'run'}", cwd=tmp_path)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"]
  assert expected in result.stderr and "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()


def test_main_unknown_task_and_writes_config(tmp_path):
  result = _main("--config=" + str(REPO_ROOT / "configs/pix2pix.py:smoke"), "--config.task=nope",
                 f"--workdir={tmp_path / 'run'}", cwd=tmp_path)
  assert result.returncode == 2
  assert "unknown task 'nope'" in result.stderr and "pix2pix" in result.stderr


def _cfg(**kw):
  cfg = ml_collections.ConfigDict({"task": "pix2pix", "batch_size": 1, "log_every": 10,
                                   "data": {"image_size": 64}})
  cfg.update(kw)
  return cfg


def test_workdir_with_only_a_config_is_no_run(tmp_path):
  run = tmp_path / "run"
  workdir_lib.prepare(run, _cfg(batch_size=-1))       # refused at start-up, nothing else written
  workdir_lib.prepare(run, _cfg(batch_size=2))
  assert json.loads((run / "config.json").read_text())["batch_size"] == 2


def test_workdir_same_config_resumes_other_config_refused(tmp_path):
  run = tmp_path / "run"
  workdir_lib.prepare(run, _cfg())
  saved = json.loads((run / "config.json").read_text())
  assert saved["batch_size"] == 1
  (run / "checkpoints").mkdir()                        # the run has started
  workdir_lib.prepare(run, _cfg(log_every=99))        # resume-safe key: accepted
  with pytest.raises(UserError, match=r"differing keys: batch_size \(1 -> 4\)"):
    workdir_lib.prepare(run, _cfg(batch_size=4))
  (run / "keep.txt").write_text("user data")
  workdir_lib.prepare(run, _cfg(batch_size=4), overwrite=True)
  aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
  assert len(aside) == 1 and (aside[0] / "keep.txt").read_text() == "user data"
  assert json.loads((run / "config.json").read_text())["batch_size"] == 4
