"""The experiment's rows: the control rows' training sets (counts, provenance, no leakage), the
rows and seed groups a config asks for, its checks, and the whole pipeline at smoke size (every
row from scratch, the transfer rows listed as skipped without weights, an interrupted run that
resumes, a re-run that skips everything, the lungs-hidden row and an external test set rendered
with another synthetic seed) and the console of `main.py` resuming it: conftest's
`smoke_experiment` run (one run for both). Transfer training itself is tested in
test_classifier.py / test_pretrained.py; here it would double the time of the end-to-end test."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import stats as sps

from cxr_jax import configlib
from cxr_jax.errors import ConfigError, DataError
from cxr_jax.pipeline import controls
from cxr_jax.evaluation import report_classifier
from cxr_jax.pipeline import experiment
from cxr_jax.pipeline import results

from conftest import REPO_ROOT, _stage_times
from test_controls import _set


def smoke_config(**overrides):
  config = configlib.load_config_file(REPO_ROOT / "configs/experiment.py", "smoke")
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def splits():
  # COVID = 0, NORMAL = 1: 5 COVID and 12 NORMAL training images
  return {"train": _set("train", [0] * 5 + [1] * 12, 0), "val": _set("val", [0, 0, 1, 1], 1),
          "test": _set("test", [0, 0, 1, 1], 2)}


def test_control_rows_training_sets(splits):
  train = splits["train"]
  config = smoke_config()
  count = experiment.num_target_images(config, train)
  assert count == 12 - 5                       # "balance": COVID up to the largest class
  for row in ("original", "balanced-loss"):
    assert experiment.row_training_set(row, splits, count=count, target_class="COVID",
                                       seed=0) is train
  over = experiment.row_training_set("oversampled", splits, count=count, target_class="COVID",
                                     seed=0)
  assert over.counts() == {"COVID": 12, "NORMAL": 12}
  assert over.files[:len(train)] == train.files
  copies = over.files[len(train):]
  covid_train = {f for f, y in zip(train.files, train.labels) if y == 0}
  assert all(controls.source_file(f) in covid_train for f in copies)
  held = {h for s in (splits["val"], splits["test"]) for h in s.hashes}
  assert not set(over.hashes) & held
  np.testing.assert_array_equal(over.labels[len(train):], 0)
  # the paper's literal count also sizes the control
  config.synthesize.num_synthetic = "20"
  assert experiment.num_target_images(config, train) == 20
  assert len(experiment.row_training_set("oversampled", splits, count=20, target_class="COVID",
                                         seed=0)) == len(train) + 20


def test_oversampled_row_refuses_leaked_sources(splits):
  leaky = dict(splits, test=splits["train"].subset([0]))    # a training COVID image in test
  with pytest.raises(DataError, match="held-out"):
    experiment.row_training_set("oversampled", leaky, count=3, target_class="COVID", seed=0)
  with pytest.raises(ValueError, match="synthetic_dir"):
    experiment.row_training_set("enhanced-pix2pix", splits, count=3, target_class="COVID",
                                seed=0)


def test_rows_and_seed_groups(splits):
  config = smoke_config(seeds=(0, 1, 2))
  assert experiment.rows(config) == ["original", "balanced-loss", "oversampled", "lungs-hidden",
                                     "enhanced-pix2pix", "enhanced-cyclegan"]
  assert experiment.row_training_set("lungs-hidden", splits, count=3, target_class="COVID",
                                     seed=0) is splits["train"]
  assert experiment.seed_groups(config, "lungs-hidden") == [(0, 1, 2)]
  assert experiment.seed_groups(config, "enhanced-pix2pix") == [(0, 1, 2)]
  config.translator_per_seed = True
  assert experiment.seed_groups(config, "enhanced-pix2pix") == [(0,), (1,), (2,)]
  assert experiment.seed_groups(config, "oversampled") == [(0,), (1,), (2,)]
  assert experiment.seed_groups(config, "balanced-loss") == [(0, 1, 2)]
  assert experiment.seed_groups(config, "lungs-hidden") == [(0, 1, 2)]
  assert experiment.translator_tag("pix2pix", 2) == "pix2pix-seed2"
  assert "lungs-hidden" not in experiment.rows(smoke_config(lungs_hidden=0.0))


@pytest.mark.parametrize("overrides, key", [
    (dict(translators=("pix2pix", "pix2pix")), "translators"),
    (dict(translators=("stylegan",)), "translators"),
    (dict(seeds=()), "seeds"),
    (dict(seeds=(1, 1)), "seeds"),
    (dict(pretrained="/nonexistent/weights.safetensors"), "pretrained"),
    (dict(primary_comparison=("original", "enhanced-stylegan")), "primary_comparison"),
    (dict(primary_comparison=("original", "original")), "primary_comparison"),
    (dict(primary_comparison=("original",)), "primary_comparison"),
    (dict(splits=0), "splits"),
    (dict(lungs_hidden=1.0), "lungs_hidden"),
])
def test_bad_configs_are_refused_naming_the_key(overrides, key):
  with pytest.raises(ConfigError, match=f"config.{key}"):
    experiment.validate(smoke_config(**overrides))
  config = smoke_config()
  config.synthesize.num_synthetic = "lots"
  with pytest.raises(ConfigError, match="num_synthetic"):
    experiment.validate(config)


def test_paper_and_demo_variants():
  paper = configlib.load_config_file(REPO_ROOT / "configs/experiment.py", "paper")
  assert paper.data.drop_near_duplicates is True
  for variant in ("paper", "demo", "smoke", "matched"):
    config = configlib.load_config_file(REPO_ROOT / "configs/experiment.py", variant)
    experiment.validate(config)
    assert config.synthesize.num_synthetic == "balance"
    assert config.translator_per_seed is False and "data" not in config.cyclegan
    assert tuple(config.translators) == ("pix2pix", "cyclegan")
    assert tuple(config.primary_comparison) == ("original", "enhanced-cyclegan")
    assert config.splits == (5 if variant == "paper" else 1)
    assert config.classifier.train_steps == 0
    assert config.lungs_hidden == 0.8 and config.external_test_dir == ""
  matched = configlib.load_config_file(REPO_ROOT / "configs/experiment.py", "matched")
  demo = configlib.load_config_file(REPO_ROOT / "configs/experiment.py", "demo")
  assert tuple(matched.data.classes) == ("COVID", "NORMAL")
  assert configlib.diff(matched, demo) == ["data.classes", "name"]


def test_splits_have_their_own_seed_and_folder(tmp_path):
  config = smoke_config(splits=3)
  assert [experiment.split_config(config, k).data.split_seed for k in range(3)] == [
      config.data.split_seed + k for k in range(3)]
  assert config.data.split_seed == smoke_config().data.split_seed      # the copy, not config
  assert results.split_root(tmp_path, 0, 1) == tmp_path                # one split: as before
  assert results.split_root(tmp_path, 2, 3) == tmp_path / "split2"


def test_smoke_experiment(smoke_experiment):
  """The run of the `smoke_experiment` fixture (conftest.py): preempted in the enhanced-pix2pix
  row right after its first checkpoint, resumed by `main.py`, then run a third time here."""
  run = smoke_experiment
  config, workdir, before, after = run["config"], run["workdir"], run["before"], run["after"]
  assert run["preempted"]
  assert "classifier-enhanced-pix2pix-scratch.json" not in before
  assert "classifier-oversampled-scratch.json" in before
  assert run["checkpoint_kept"]

  assert run["resumed"].returncode == 0, run["resumed"].stderr[-3000:]
  assert {k: after[k] for k in before} == before, "finished stages must not run again"
  assert "classifier-enhanced-pix2pix-scratch.json" in after

  report = json.loads((workdir / "report.json").read_text())
  rows = ["original", "balanced-loss", "oversampled", "lungs-hidden", "enhanced-pix2pix",
          "enhanced-cyclegan"]
  assert set(report["table"]) == {f"{r}/{i}" for r in rows for i in ("scratch", "transfer")}
  for key, row in report["table"].items():
    if key.endswith("/transfer"):
      assert "ImageNet weights" in row["skipped"]
    else:
      assert "skipped" not in row
  # Matched budgets: every row of one initialisation trains the original split's steps (the
  # oversampled and enhanced rows have more images, so fewer epochs).
  n_train = sum(report["split_counts"]["train"].values())
  budget = config.classifier.num_epochs * (n_train // config.classifier.batch_size)
  assert {report["table"][f"{r}/scratch"]["train_steps"] for r in
          ["original", "balanced-loss", "oversampled", "enhanced-pix2pix", "enhanced-cyclegan"]} \
      == {budget}
  # training class counts: the synthetic images and the augmented copies are equally many
  counts = report["train_counts"]
  n_syn = report["translation_quality"]["pix2pix"]["num_synthetic"]
  assert n_syn > 0 and counts["original"] == report["split_counts"]["train"]
  assert counts["oversampled"]["COVID"] == counts["original"]["COVID"] + n_syn
  assert counts["enhanced-pix2pix"] == counts["enhanced-cyclegan"] == counts["oversampled"]
  assert counts["oversampled"]["COVID"] == max(counts["original"].values())   # "balance"
  assert counts["lungs-hidden"] == counts["original"]

  # The lungs-hidden row: hidden in training and in its export; beside chance and original.
  n_test = sum(report["split_counts"]["test"].values())
  hidden = report["lungs_hidden"]
  assert hidden["chance"] == max(report["split_counts"]["test"].values()) / n_test
  by_init = hidden["by_init"]["scratch"]
  assert by_init["lungs_hidden"] == report["table"]["lungs-hidden/scratch"]["accuracy"]["mean"]
  assert by_init["points_above_chance"] == pytest.approx(
      100 * (report["table"]["original/scratch"]["accuracy"]["mean"] - hidden["chance"]))
  for row, hide in (("lungs-hidden", 0.8), ("original", 0.0)):
    run = workdir / f"classifiers/{row}-scratch-seed0"
    assert json.loads((run / "config.json").read_text())["data"]["hide_center"] == hide
    assert json.loads((run / "classifier/model.json").read_text())["input"]["hide_center"] == hide
  # Grad-CAM's share of the centre: the smoke ResNet's 1 x 1 feature map cannot say where it
  # looked, and the report says so (the share itself: test_shortcuts.py)
  for key, row in report["table"].items():
    if "skipped" not in row:
      share = row["gradcam_center_share"]
      assert share["fraction"] == 0.8 and share["feature_map"] == [1, 1]
      assert share["mean"] is None and "feature map is 1 x 1" in share["note"]

  # The external set: own image and unreadable file out; every row evaluated on the rest.
  ext = report["external"]
  assert ext["set"]["n_exact_duplicates"] == 1 and ext["set"]["n_skipped"] == 1
  assert ext["set"]["skipped"][0]["file"] == "NORMAL/broken.png"
  assert ext["set"]["overlap"][0]["file"] == "NORMAL/copy-of-own.png"
  assert set(ext["rows"]) == {f"{r}/scratch" for r in rows}
  for key, row in ext["rows"].items():
    assert row["n"] == ext["set"]["n_kept"] == sum(ext["set"]["kept"].values())
    assert row["in_distribution_accuracy"] == report["table"][key]["accuracy"]["mean"]
    with open(workdir / f"classifiers/{key.replace('/', '-')}-seed0/external_predictions.csv",
              newline="") as f:
      predicted = list(csv.DictReader(f))
    assert len(predicted) == row["n"] and row["external_accuracy"]["mean"] == pytest.approx(
        np.mean([p["label"] == p["predicted"] for p in predicted]))
    assert "copy-of-own.png" not in {p["file"] for p in predicted}
  head = report["headline"]
  assert report["primary_comparison"] == head["primary_comparison"] == ["original",
                                                                       "enhanced-cyclegan"]
  assert head["answered"] and head["init"] == "scratch"
  # The headline's p agrees with an independent sign-flip test (scipy) on the runs' predictions,
  # the test image as the unit; its interval agrees with its p.
  diffs = []
  for seed in config.seeds:
    files_a, ca = report_classifier.read_correct(
        results.run_dir(workdir, "original", "scratch", seed) / "test_predictions.csv")
    files_b, cb = report_classifier.read_correct(
        results.run_dir(workdir, "enhanced-cyclegan", "scratch", seed) / "test_predictions.csv")
    assert files_a == files_b
    diffs.append(cb.astype(float) - ca.astype(float))
  d = np.mean(diffs, axis=0)
  ref = sps.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=20000,
                             rng=np.random.default_rng(1))
  assert head["difference"] == pytest.approx(d.mean())
  assert head["p_value"] == pytest.approx(ref.pvalue, abs=0.02)
  lo, hi = head["difference_ci"]
  assert (lo <= 0.0 <= hi) == (head["p_value"] >= 0.05)
  for tag in ("pix2pix", "cyclegan"):     # KID measured with the original row's classifier
    assert report["translation_quality"][tag]["kid"]["train"]["mean"] is not None
  md = (workdir / "report.md").read_text()
  for needle in ("## The answer", "97.8*", "96.1", "95.6", "## Skipped", "sign-flip",
                 "procedural images", "Class counts", "KID", "jax", "## Calibration",
                 "calibration/original-scratch.png", "## Is the classifier reading the lungs?",
                 "**Lungs hidden.**", "External test set", "Grad-CAM share"):
    assert needle in md, needle
  assert "pediatric" not in md and "real test images" not in md
  assert (workdir / "report.csv").read_text().startswith("training_data,init,split,seed,class,metric")

  # Every synthetic image traces to a training-split image of the run's manifest.
  with open(workdir / "split_manifest.csv", newline="") as f:
    split_rows = list(csv.DictReader(f))
  train = {(r["file"], r["sha256"]) for r in split_rows if r["split"] == "train"}
  for tag in ("pix2pix", "cyclegan"):
    with open(workdir / f"synthesize/{tag}/synthetic/manifest.csv", newline="") as f:
      synthetic = list(csv.DictReader(f))
    assert synthetic and all((r["source_file"], r["source_sha256"]) in train for r in synthetic)

  # A third run has nothing left to do.
  experiment.run_experiment(config, workdir)
  assert _stage_times(workdir) == after


def test_experiment_smoke_console_is_short_and_ends_with_the_report(smoke_experiment):
  """The README's job in small: the console stays under a bound (it was 927 lines before the
  quiet console), ends with where the report is, and the log file has the library records.
  `main.py` here resumes conftest's `smoke_experiment` run (preempted in its last-but-one row),
  so that the end-to-end test above and this one share one run."""
  result, run = smoke_experiment["resumed"], smoke_experiment["workdir"]
  assert result.returncode == 0, result.stderr[-3000:]
  lines = (result.stdout + result.stderr).splitlines()
  # 80: the bound of a whole smoke run; this resumed part (the last rows and the report) logs fewer
  assert len(lines) <= 80, "\n".join(lines)
  assert not [line for line in lines if "orbax" in line.lower() or "Warning:" in line]
  assert f"Report: {run / 'report.md'}" in lines
  assert lines[-1].startswith(f"Full log: {run / 'logs' / 'experiment-'}")
  log = next((run / "logs").glob("experiment-*.log")).read_text()
  assert "checkpoint" in log and "Config:" in log and len(log.splitlines()) > 5 * len(lines)
