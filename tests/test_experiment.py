"""The whole pipeline at smoke size: all four rows (transfer from a small weights file), provenance
of every synthetic image, an interrupted run that resumes, and a re-run that skips everything."""

import csv
import json

import pytest

from cxr_jax import configlib
from cxr_jax import workdir as workdir_lib
from cxr_jax.pipeline import experiment
from cxr_jax.training import checkpoint

from conftest import REPO_ROOT
from test_pretrained import write_torchvision_safetensors


class _Preempted(Exception):
  pass


def smoke_config(**overrides):
  config = configlib.load_config_file(REPO_ROOT / "configs/experiment.py", "smoke")
  config.update(overrides)
  return config


def _stage_times(workdir):
  return {p.name: p.stat().st_mtime_ns for p in (workdir / "stages").glob("*.json")}


def test_smoke_experiment(tmp_path, monkeypatch):
  weights = tmp_path / "resnet-tiny.safetensors"
  write_torchvision_safetensors(weights, stage_sizes=(1, 1, 1, 1), width=4)
  config = smoke_config(pretrained=str(weights))
  workdir = workdir_lib.prepare(tmp_path / "exp", config)

  # Preempt the last classifier right after its first checkpoint.
  original_save = checkpoint.Checkpointer.save

  def preempting_save(self, step, state, **kw):
    original_save(self, step, state, **kw)
    if "enhanced-transfer" in str(self.directory):
      self.wait()
      raise _Preempted()

  monkeypatch.setattr(checkpoint.Checkpointer, "save", preempting_save)
  with pytest.raises(_Preempted):
    experiment.run_experiment(config, workdir)
  monkeypatch.setattr(checkpoint.Checkpointer, "save", original_save)
  before = _stage_times(workdir)
  assert "classifier-enhanced-transfer-seed0.json" not in before
  assert (workdir / "classifiers/enhanced-transfer-seed0/checkpoints").exists()

  experiment.run_experiment(config, workdir)
  after = _stage_times(workdir)
  assert {k: after[k] for k in before} == before, "finished stages must not run again"
  assert "classifier-enhanced-transfer-seed0.json" in after

  report = json.loads((workdir / "report.json").read_text())
  assert set(report["table"]) == {"original/scratch", "original/transfer", "enhanced/scratch",
                                  "enhanced/transfer"}
  for row in report["table"].values():
    assert "skipped" not in row and 0.0 <= row["accuracy"]["mean"] <= 1.0
  assert len(report["paired_tests"]) == 2
  md = (workdir / "report.md").read_text()
  for needle in ("97.8", "96.1", "95.6", "pediatric", "McNemar", "Class counts", "jax"):
    assert needle in md, needle
  assert (workdir / "report.csv").read_text().startswith("training_data,init,class,metric")

  # Every synthetic image traces to a training-split image of the run's manifest.
  with open(workdir / "split_manifest.csv", newline="") as f:
    split_rows = list(csv.DictReader(f))
  train = {(r["file"], r["sha256"]) for r in split_rows if r["split"] == "train"}
  with open(workdir / "synthesize/synthetic/manifest.csv", newline="") as f:
    synthetic = list(csv.DictReader(f))
  assert synthetic and all((r["source_file"], r["source_sha256"]) in train for r in synthetic)
  assert all((workdir / "synthesize/synthetic" / r["file"]).exists() for r in synthetic)

  # A third run has nothing left to do.
  experiment.run_experiment(config, workdir)
  assert _stage_times(workdir) == after
