"""main.py, the config files and the workdir guard."""

import importlib.util
import inspect
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

CONFIGS = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py"))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_variant_builds_and_names_a_known_task(name):
  module = _load(name)
  assert "python main.py --config=configs/" in module.__doc__  # documents its command
  # VARIANTS (what --help lists) holds every variant, the default first.
  assert module.VARIANTS[0] == inspect.signature(module.get_config).parameters["variant"].default
  for variant in module.VARIANTS:
    config = module.get_config(variant)
    assert config.task in tasks.TASKS
    assert config.name and config.data.image_size > 0 if "data" in config else True
  with pytest.raises(ValueError, match="unknown variant 'no-such-variant' of configs/"
                                       f"{name}.py; use " + ", ".join(map(repr, module.VARIANTS))):
    module.get_config("no-such-variant")


def test_help_and_a_bare_run_list_every_task_and_variant(tmp_path):
  """`--help` (absl exits 1 after it) and a run without --config (a usage error, 2) show the
  catalogue read from the config files; `python -m cxr_jax` is the command too."""
  from cxr_jax import cli
  catalogue = cli.config_catalogue()
  assert {line.split()[0] for line in catalogue.splitlines()[1::2]} == set(tasks.TASKS)
  for name in CONFIGS:
    shown = ", ".join(f":{v}" if v else "(none)" for v in _load(name).VARIANTS)
    assert any(f"configs/{name}.py" in line and line.endswith(shown)
               for line in catalogue.splitlines()), (name, catalogue)
  helped = _main("--help", cwd=tmp_path)
  assert helped.returncode == 1 and catalogue in helped.stdout + helped.stderr
  bare = subprocess.run([sys.executable, "-m", "cxr_jax"], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert bare.returncode == 2 and catalogue in bare.stderr
  assert bare.stderr.rstrip().endswith("error: --config is required: one of the configs above")


def test_unknown_task_lists_known_ones():
  with pytest.raises(ConfigError, match="known tasks: prepare_data, translator"):
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
  assert "unknown task 'nope'" in result.stderr and "translator" in result.stderr


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


def test_config_flag_falls_back_to_the_packaged_configs(tmp_path, monkeypatch):
  from cxr_jax import cli
  monkeypatch.chdir(tmp_path)                          # no configs/ here
  packaged = str(REPO_ROOT / "configs" / "pix2pix.py")
  assert cli.resolve_config_arg(["p", "--config=configs/pix2pix.py:smoke", "--workdir=w"]) == [
      "p", f"--config={packaged}:smoke", "--workdir=w"]
  assert cli.resolve_config_arg(["p", "--config", "pix2pix.py"]) == ["p", "--config", packaged]
  for kept in (["p", "--config=configs/nothere.py"], ["p", "--config=other/pix2pix.py"]):
    assert cli.resolve_config_arg(kept) == kept
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "pix2pix.py").write_text("")  # the cwd's own copy wins
  assert cli.resolve_config_arg(["p", "--config=configs/pix2pix.py"])[1] == \
      "--config=configs/pix2pix.py"


@pytest.fixture
def quiet_console():
  import logging
  from absl import logging as absl_logging
  from cxr_jax import console
  root = logging.getLogger()
  had_absl, level = absl_logging.get_absl_handler() in root.handlers, root.level
  yield console
  console.teardown()
  logging.captureWarnings(False)
  root.setLevel(level)
  if had_absl:
    root.addHandler(absl_logging.get_absl_handler())


def _ours(message, level="INFO", **extra):
  """A record as cxr_jax's own modules log it: through absl, from a file of the package."""
  import logging
  from absl import logging as absl_logging
  from cxr_jax import console
  record = logging.LogRecord("absl", getattr(logging, level), console.__file__, 1, message, None,
                             None)
  record.__dict__.update(extra)
  absl_logging.get_absl_logger().handle(record)


def test_console_hides_library_info_and_warnings_but_the_log_file_keeps_all(
    tmp_path, capsys, quiet_console):
  import logging
  import warnings
  console = quiet_console
  console.setup("default")
  _ours("before the log file")                           # kept for the file too
  log = console.start_log_file(tmp_path, "pix2pix")
  assert log.parent == tmp_path / "logs" and log.name.startswith("pix2pix-")
  logging.getLogger("orbax.checkpoint").info("Finished blocking save")
  logging.getLogger("orbax.checkpoint").warning("library warning")
  warnings.warn("Matrix is singular", RuntimeWarning)
  _ours("our progress")
  _ours("our progress")                                  # said once on the console
  _ours("the resolved config", **console.FILE_ONLY)
  _ours("our warning", "WARNING")
  err = capsys.readouterr().err
  shown = [line.split(" ", 1)[1] for line in err.splitlines()]
  assert shown == ["before the log file", "warning: library warning", "our progress",
                   "warning: our warning"]
  text = log.read_text()
  for message in ("before the log file", "Finished blocking save", "library warning",
                  "Matrix is singular", "the resolved config", "our warning"):
    assert message in text, message
  assert text.count("our progress") == 2 and console.python_warnings() == 1


def test_console_log_level_info_shows_library_records(capsys, quiet_console):
  import logging
  console = quiet_console
  console.setup("info")
  logging.getLogger("orbax.checkpoint").info("Finished blocking save")
  logging.getLogger("jax._src.compiler").debug("debug detail")
  assert capsys.readouterr().err.split(" ", 1)[1].strip() == "Finished blocking save"
  with pytest.raises(ValueError, match="--log_level=loud"):
    console.setup("loud")


def test_closing_summary_shows_the_headline_table(tmp_path):
  from cxr_jax import cli
  agg = {"mean": 0.95, "std": 0.01, "ci": [0.9, 1.02]}
  (tmp_path / "report.json").write_text(json.dumps({"seeds": [0, 1], "table": {
      "original/scratch": {"accuracy": agg, "macro_f1": {"mean": 0.5, "std": None, "ci": None}},
      "original/transfer": {"skipped": "no ImageNet weights"},
      "enhanced/transfer": {"skipped": "no ImageNet weights"}},
      "headline": {"lines": ["**Enhancement did not help.** -0.5 points", "second line"]},
      "reading_lungs": {"lines": ["**Does the accuracy measure lung findings?** Not only"]}}))
  (tmp_path / "report.md").write_text("# report")
  text = cli.closing_summary("experiment", tmp_path, 3725.0, tmp_path / "x.log", 2)
  lines = text.splitlines()
  assert lines[1] == f"Done: experiment in 1:02:05. Outputs in {tmp_path}"
  assert lines[2].strip() == "report.md"
  assert lines[4].split() == ["training", "data", "/", "init", "accuracy", "%", "macro-F1", "%"]
  # the CI's upper end is clipped to 100 %; a macro-F1 without spread shows only its mean
  assert lines[5].split() == ["original/scratch", "95.0", "±", "1.0", "[90.0,", "100.0]", "50.0"]
  assert lines[6].strip() == "original/transfer, enhanced/transfer: skipped: no ImageNet weights"
  assert [line.strip() for line in lines[7:11]] == [
      "Answer:", "Enhancement did not help. -0.5 points", "second line",
      "Does the accuracy measure lung findings? Not only"]
  assert lines[-2:] == [f"Report: {tmp_path / 'report.md'}",
                        f"Full log: {tmp_path / 'x.log'} (2 Python warning(s) there)"]


def test_pyproject_lists_every_package_and_admits_the_pins():
  """pyproject.toml names its packages explicitly (configs/ is mapped in as cxr_jax.configs): a
  new subpackage left out would be missing from an installed copy. Its ranges must admit the
  pinned versions CI installs."""
  import re
  import tomllib
  project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
  on_disk = {".".join(p.parent.relative_to(REPO_ROOT).parts)
             for p in (REPO_ROOT / "cxr_jax").rglob("__init__.py")}
  listed = set(project["tool"]["setuptools"]["packages"])
  assert listed == on_disk | {"cxr_jax.configs"}
  assert project["tool"]["setuptools"]["package-dir"] == {"cxr_jax.configs": "configs"}
  assert project["project"]["scripts"]["cxr-jax"] == "cxr_jax.cli:run"
  assert project["project"]["license"] == "Apache-2.0" and project["project"]["license-files"] == [
      "LICENSE"]
  assert (REPO_ROOT / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
  # One version: the package's, which provenance records.
  assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cxr_jax.__version__"}
  pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", (REPO_ROOT / "requirements.txt")
                         .read_text(), re.M))
  norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
  pins = {norm(k): tuple(int(x) for x in v.split(".")) for k, v in pins.items()}
  names = {norm(re.match(r"[A-Za-z0-9_.-]+", spec).group()) for spec in
           project["project"]["dependencies"]}
  # jax brings its jaxlib; the `test` extra's packages are test-only; the other extras' packages
  # (pydicom, openpyxl) are pinned for the tests but optional at run time
  extras = project["project"]["optional-dependencies"]
  name_of = lambda spec: norm(re.match(r"[A-Za-z0-9_.-]+", spec).group())  # noqa: E731
  test_only = {name_of(spec) for spec in extras["test"]}
  optional = {name_of(spec) for extra, specs in extras.items() if extra != "test"
              for spec in specs} - names
  assert {"keras", "pytest"} <= test_only and {"pydicom", "openpyxl"} <= optional
  assert names == set(pins) - {"jaxlib"} - test_only - optional
  assert any(spec.startswith("pydicom") for spec in extras["dicom"])
  assert any(spec.startswith("openpyxl") for spec in extras["xlsx"])
  for spec in project["project"]["dependencies"]:
    name, bounds = re.match(r"([A-Za-z0-9_.-]+)(.*)", spec.split(";")[0]).groups()
    version = pins[norm(name)]
    for op, bound in re.findall(r"(>=|<)([0-9.]+)", bounds):
      bound = tuple(int(x) for x in bound.split("."))
      assert (version >= bound) if op == ">=" else (version < bound), (spec, version)
