"""The experiment's report on a constructed run tree (metrics and predictions written as the
classifier task writes them, no training): the headline answer and its image-level test against
hand-computed values, the declared primary comparison and Holm correction, train steps,
calibration, splits, the paper column, exact intervals, translation quality with KID and no FID,
near-duplicates, figures in tables, and the wording with and without real data."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from cxr_jax import configlib
from cxr_jax.evaluation import metrics as metrics_lib
from cxr_jax.evaluation import report_classifier
from cxr_jax.evaluation import stats
from cxr_jax.pipeline import report
from cxr_jax.pipeline import results

from conftest import REPO_ROOT

NAMES = ("COVID", "NORMAL", "VIRAL_PNEUMONIA")
N = 60
SEEDS = (0, 1, 2)
ROWS = ["original", "balanced-loss", "oversampled", "enhanced-pix2pix", "enhanced-cyclegan"]
# Images that only the enhanced-pix2pix run of each seed gets right (c) ; it also loses image 0.
# Per seed (b, c) = (1, 5), (1, 6), (1, 7): exact McNemar p 0.22, 0.13, 0.07, and the pooled
# Cochran-Mantel-Haenszel test (every image counted once per seed) p = 0.0015. With the image as
# the unit: one image loses 1, five gain 1, one 2/3 and one 1/3 (mean over seeds).
PIX2PIX_GAINS = {0: 5, 1: 6, 2: 7}
STEPS = 12


def _labels() -> np.ndarray:
  labels = np.array([0] * 12 + [1] * 24 + [2] * 24)
  return np.random.default_rng(0).permutation(labels)


def _correct(row: str, seed: int) -> np.ndarray:
  """original (and balanced-loss) right on the first 48 images; the others flip some."""
  c = np.arange(N) < 48
  if row == "enhanced-pix2pix":
    c[48:48 + PIX2PIX_GAINS[seed]] = True
    c[0] = False
  elif row == "enhanced-cyclegan":
    c[48] = True
    c[1] = False
  elif row == "oversampled":
    c[48:51] = True
  return c


def _write_run(workdir, row, init, seed):
  labels = _labels()
  correct = _correct(row, seed)
  pred = np.where(correct, labels, (labels + 1) % 3)
  probs = np.full((N, 3), 0.1)
  probs[np.arange(N), pred] = 0.8
  d = report.run_dir(workdir, row, init, seed)
  rep = metrics_lib.classification_report(labels, probs, NAMES, n_bootstrap=50, seed=seed)
  metrics_lib.write_metrics(d, rep, title=f"{row}-{init}-seed{seed}")
  report_classifier.write_predictions(d / "test_predictions.csv",
                                      [f"test/{i}.png" for i in range(N)], labels, probs, NAMES)
  (d / "confusion_matrix.png").write_bytes(b"png")
  (d / "roc_curves.png").write_bytes(b"png")
  (d / "classifier").mkdir()
  (d / "classifier" / "model.json").write_text(json.dumps({"kind": "classifier",
                                                           "final_step": STEPS}))


def _config(data_dir: str = "", primary=("original", "enhanced-pix2pix")):
  config = configlib.load_config_file(REPO_ROOT / "configs/experiment.py", "smoke")
  config.seeds = SEEDS
  config.data.data_dir = data_dir
  config.primary_comparison = primary
  return config


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  for row in ROWS:
    for seed in SEEDS:
      _write_run(workdir, row, "scratch", seed)
  (workdir / "split_summary.json").write_text(json.dumps(
      {"near_duplicate_pairs": 3, "drop_near_duplicates": True, "totals": {"dropped": 2}}))
  syn = {}
  for t, kid in (("pix2pix", 0.0123), ("cyclegan", 0.0456)):
    d = workdir / "synthesize" / t / "synthetic"
    d.mkdir(parents=True)
    (d / "synthesis.json").write_text(json.dumps({"num_synthetic": 17, "num_sources": 17}))
    # as synthesize.translation_figures writes it
    (d / "quality.json").write_text(json.dumps(
        {"fid": 55.5, "kid": kid, "kid_std": 0.001, "n_real_target": 40, "target_share": 0.9,
         "share_called_COVID": 0.9, "input_dependence": 0.25, "relative_diversity": 0.8,
         "kid_train": {"mean": kid, "std": 0.001, "n_real": 40, "seen_by_generator": True},
         "kid_val": {"mean": 2 * kid, "std": 0.002, "n_real": 12, "seen_by_generator": False}}))
    (d / "grid.png").write_bytes(b"png")
    syn[t] = d
  return workdir, syn


def _split(workdir, syn=None):
  train = {"COVID": 10, "NORMAL": 40, "VIRAL_PNEUMONIA": 40}
  counts = {"original": train, "balanced-loss": train,
            **{r: dict(train, COVID=40) for r in ROWS[2:]}}
  return results.SplitRun(
      root=workdir, split_seed=42,
      split_counts={"train": train, "val": {c: 2 for c in NAMES}, "test": {c: 20 for c in NAMES}},
      train_counts=counts, synthetic_dirs=syn or {}, class_names=NAMES)


def _write(tree, data_dir="", primary=("original", "enhanced-pix2pix")):
  workdir, syn = tree
  skipped = {f"{r}/transfer": "no ImageNet weights configured" for r in ROWS}
  out = report.write_report(
      workdir, _config(data_dir, primary), rows=ROWS, class_names=NAMES,
      splits=[_split(workdir, syn)], skipped=skipped, stage_seconds={"split": 1.0})
  return out, json.loads((workdir / "report.json").read_text()), \
      (workdir / "report.md").read_text()


def _image_differences() -> np.ndarray:
  """enhanced-pix2pix minus original per image, mean over the three seeds, by hand."""
  d = np.zeros(N)
  d[0] = -1.0
  d[48:53] = 1.0
  d[53], d[54] = 2 / 3, 1 / 3
  return d


def test_pseudo_replication_fixture_is_no_detectable_difference(tree):
  out, r, md = _write(tree)
  head = r["headline"]
  assert r["primary_comparison"] == ["original", "enhanced-pix2pix"]
  assert out["headline"]["verdict"] == head["verdict"] == "no detectable difference"
  assert head["init"] == "scratch" and head["n_images"] == N and head["n_seeds"] == 3
  d = _image_differences()
  assert head["difference"] == pytest.approx(d.mean()) == pytest.approx(5 / N)
  # Exact over the 8 images that differ: sum = 7 - 2 (mass of the negative signs); |sum| >= 5
  # when that mass is <= 1 (10 of 256 sign vectors) or >= 6 (10): p = 20 / 256. Over all 60
  # images, 20,000 seeded flips estimate it (Monte-Carlo sd 0.002).
  assert head["p_value"] == pytest.approx(20 / 256, abs=0.008)
  lo, hi = head["difference_ci"]
  assert lo <= 0.0 <= hi                      # p >= 0.05: the interval keeps 0
  # the pooled CMH over seeds (the old headline) stays in the paired tests as detail, p 0.0015
  primary = next(c for c in r["comparisons"] if c["primary"])
  assert (primary["a"], primary["b"]) == ("original", "enhanced-pix2pix")
  exact = 2 * sum(math.comb(21, k) for k in range(18, 22)) / 2 ** 21
  assert primary["pooled_cmh"]["exact_p_value"] == pytest.approx(exact)
  assert "p_holm" not in primary
  # the three lines come first, after the title and the synthetic-data line
  answer = md.split("## The answer\n\n")[1].split("\n\n")[0].splitlines()
  assert len(answer) == 3
  assert answer[0].startswith("1. **Did enhancement help?** No detectable difference: "
                              "enhanced-pix2pix 88.3 % against original 80.0 % (scratch), a "
                              "difference of +8.3 points [95 % CI ")
  assert f"p = {head['p_value']:.2g}: paired sign-flip test" in answer[0]
  assert "config.primary_comparison" in answer[0] and "80 % power" in answer[0]
  assert "enhanced-cyclegan 80.0 %" in answer[1] and "Holm p" in answer[1]
  assert "balanced-loss 80.0 %" in answer[2] and "oversampled 85.0 %" in answer[2]


def test_secondary_comparisons_are_holm_corrected(tree):
  _, r, md = _write(tree)
  secondary = [c for c in r["comparisons"] if not c["primary"]]
  raw = [c["image_level"]["p_value"] for c in secondary]
  assert [c["p_holm"] for c in secondary] == pytest.approx(stats.holm(raw))
  assert all(c["p_holm"] >= c["image_level"]["p_value"] for c in secondary)
  assert f"The other {len(secondary)} comparisons are secondary" in md
  assert "Holm-corrected" in md


def test_primary_comparison_is_the_declared_one(tree):
  # Declaring cyclegan answers for cyclegan even though pix2pix scores higher on the test set.
  _, r, md = _write(tree, primary=("original", "enhanced-cyclegan"))
  head = r["headline"]
  assert head["primary_comparison"] == ["original", "enhanced-cyclegan"]
  assert head["verdict"] == "no detectable difference" and head["difference"] == 0.0
  assert head["p_value"] == 1.0      # one image gained, one lost in every seed: d = 0
  assert "| original | enhanced-cyclegan **(primary)** | scratch |" in md
  missing = results.headline({"original/scratch": {"accuracy": {"mean": 0.8}}}, [], ROWS,
                             ("original", "enhanced-cyclegan"))
  assert not missing["answered"]
  r2 = dict(r, headline=dict(missing, primary_comparison=["original", "enhanced-cyclegan"]))
  assert report.headline_lines(r2)[0].startswith("**No answer:**")


def test_rows_carry_their_train_steps_and_calibration(tree):
  _, r, md = _write(tree)
  ran = {k: e for k, e in r["table"].items() if "skipped" not in e}
  assert {e["train_steps"] for e in ran.values()} == {STEPS}
  assert all(s["train_steps"] == STEPS for e in ran.values() for s in e["per_seed"])
  # every prediction has confidence 0.8: ECE = |accuracy - 0.8|, Brier by hand
  e = r["table"]["original/scratch"]
  acc = 48 / N
  assert e["calibration"]["ece"]["mean"] == pytest.approx(abs(acc - 0.8))
  brier = acc * (0.2 ** 2 + 2 * 0.1 ** 2) + (1 - acc) * (0.8 ** 2 + 0.1 ** 2 + 0.9 ** 2)
  assert e["calibration"]["brier"]["mean"] == pytest.approx(brier)
  assert (tree[0] / e["figures"]["reliability.png"]).read_bytes()[:4] == b"\x89PNG"
  labels = _labels()
  covid_right = _correct("original", 0)[labels == 0].mean()
  assert e["target_sensitivity"]["mean"] == pytest.approx(covid_right)
  assert "## Calibration" in md and "COVID sensitivity" in md


def test_splits_pool_images_and_separate_the_spread(tmp_path):
  # Two splits of the same construction: twice the images, the same per-image differences.
  split_runs = []
  for k in range(2):
    root = results.split_root(tmp_path, k, 2)
    for row in ("original", "enhanced-pix2pix"):
      for seed in SEEDS:
        _write_run(root, row, "scratch", seed)
    split_runs.append(_split(root))
  d = results.image_differences(split_runs, "original", "enhanced-pix2pix", "scratch", SEEDS)[0]
  np.testing.assert_allclose(d, np.tile(_image_differences(), 2))
  entry = results.row_entry(split_runs, "enhanced-pix2pix", "scratch", SEEDS, NAMES, "COVID")
  accs = np.array([48 + PIX2PIX_GAINS[s] - 1 for s in SEEDS]) / N
  assert entry["n_runs"] == 6
  assert entry["accuracy_spread"]["between_seeds"] == pytest.approx(accs.std(ddof=1))
  assert entry["accuracy_spread"]["between_splits"] == pytest.approx(0.0)
  assert [(s["split"], s["seed"]) for s in entry["per_seed"]][:4] == [(0, 0), (0, 1), (0, 2),
                                                                      (1, 0)]


def test_paper_column_and_exact_intervals(tree):
  _, r, md = _write(tree)
  lines = md.splitlines()
  row_of = lambda prefix: next(line for line in lines if line.startswith(prefix))  # noqa: E731
  assert "| 95.6 |" in row_of(f"| original | scratch | {STEPS} | 80.0")
  assert "| 97.8* |" in row_of("| enhanced-pix2pix | scratch |")
  assert "97.8" not in row_of("| enhanced-cyclegan | scratch |")
  assert "96.1" in row_of("| original | transfer | | skipped")
  assert md.count("does not say which initialisation") == 1
  assert r["table"]["original/scratch"]["paper"] == 0.956
  # per-seed accuracy: Clopper-Pearson of 48 / 60, shown beside the value
  lo, hi = stats.clopper_pearson_interval(48, 60)
  seed_row = row_of(f"| original | scratch | 0 | 0 | {STEPS} |")
  assert f"80.0 [{100 * lo:.1f}, {100 * hi:.1f}]" in seed_row
  entry = r["table"]["original/scratch"]["per_seed"][0]["accuracy"]
  assert entry["ci_method"] == "clopper-pearson" and entry["ci"] == pytest.approx([lo, hi])
  assert r["table"]["original/scratch"]["per_seed"][0]["macro_f1"]["ci_method"] == \
      "percentile bootstrap"
  # the mean over runs keeps the t-interval, labelled
  assert "mean ± std over runs [95 % t-interval over runs]" in md
  csv_text = (tree[0] / "report.csv").read_text().splitlines()
  assert csv_text[0] == ("training_data,init,split,seed,class,metric,value,std,ci_low,ci_high,"
                         "ci_method,n_runs,train_steps,paper")
  rows = list(csv.DictReader(csv_text))
  mean_acc = next(x for x in rows if (x["training_data"], x["init"], x["seed"], x["metric"]) ==
                  ("original", "scratch", "mean", "accuracy"))
  assert float(mean_acc["value"]) == pytest.approx(0.8) and float(mean_acc["paper"]) == 0.956
  seed_acc = next(x for x in rows if (x["training_data"], x["seed"], x["metric"]) ==
                  ("original", "0", "accuracy"))
  assert float(seed_acc["ci_low"]) == pytest.approx(lo) and seed_acc["ci_method"] == \
      "clopper-pearson"
  # the paired tests: one compact line per comparison, seeds inline, and the primary marked
  primary = row_of("| original | enhanced-pix2pix **(primary)** | scratch |")
  assert "s0: +6.7" in primary and "s2: +10.0" in primary and "| primary |" in primary
  assert "**Multiplicity.**" in md


def test_quality_near_duplicates_counts_and_figures(tree):
  _, r, md = _write(tree)
  quality = md.split("## Translation quality")[1].split("## Figures")[0]
  header = next(line for line in quality.splitlines() if line.startswith("| translator"))
  assert header.index("KID") < header.index("input dependence")
  assert ("| pix2pix | 17 (17) | 0.0123 ± 0.001 (40; seen) | 0.0246 ± 0.002 (12; not seen) | "
          "0.250 | 0.800 | 90.0 % |") in quality
  assert "55.5" not in md and "| FID" not in md
  assert "Near-duplicate train/test pairs (perceptual hash, see the split manifest): 3; their " \
         "test images are dropped (2 dropped)." in md
  assert "| oversampled | 40 | 40 | 40 | 120 | 33.3 % |" in md
  assert "| original | 10 | 40 | 40 | 90 | 11.1 % |" in md
  figures = md.split("## Figures")[1]
  assert ('| original | <img src="classifiers/original-scratch-seed0/confusion_matrix.png"'
          in figures)
  assert '| pix2pix | <img src="synthesize/pix2pix/synthetic/grid.png"' in figures
  assert "![" not in md          # no column of bare thumbnails
  assert "transfer: confusion" not in figures    # the skipped initialisation has no column


def test_wording_with_and_without_real_data(tree):
  _, r, md = _write(tree)
  assert not r["real_data"]
  assert md.splitlines()[2] == report.SYNTHETIC_DATA_NOTE
  assert "real test images" not in md and "pediatric" not in md
  _, r, md = _write(tree, data_dir="/data/COVID-19_Radiography_Database")
  assert r["real_data"]
  assert report.SYNTHETIC_DATA_NOTE not in md
  assert "every model is evaluated on the same 60 real test images" in md
  assert "**Known confound.**" in md and "inherit their sources' anatomy (pediatric" in md
  assert "Across seeds: each classifier's initialisation, batch order and augmentation only" in md


def test_report_json_records_its_provenance(tree):
  from cxr_jax import provenance  # pylint: disable=import-outside-toplevel
  _, r, _ = _write(tree)
  assert r["provenance"] == provenance.provenance(_config())
  assert r["provenance"]["config_sha256"] == provenance.config_sha256(_config())


def test_subgroup_table_per_row_from_the_manifest_metadata(tmp_path):
  """config.classifier.subgroups: one run per row (split 0's first seed), each subgroup's accuracy
  counted from the run's test predictions and the split manifest's metadata."""
  from cxr_jax.data import splits as splits_lib
  for row in ROWS:
    _write_run(tmp_path, row, "scratch", 0)
  labels = _labels()
  splits_lib.write_manifest(tmp_path, [
      splits_lib.ManifestRow(f"test/{i}.png", f"h{i}", NAMES[labels[i]], "test", "",
                             {"sex": "FM"[i % 2]}) for i in range(N)], class_names=NAMES)
  config = _config()
  config.classifier.subgroups = ("sex",)
  report.write_report(tmp_path, config, rows=ROWS, class_names=NAMES, splits=[_split(tmp_path)],
                      skipped={}, stage_seconds={})
  r = json.loads((tmp_path / "report.json").read_text())
  tables = r["subgroups"]["tables"]
  assert r["subgroups"]["keys"] == ["sex"] and set(tables) == {f"{row}/scratch (seed 0)"
                                                               for row in ROWS}
  for row in ("original", "enhanced-pix2pix"):
    groups = {g["value"]: g for g in tables[f"{row}/scratch (seed 0)"]["groups"]}
    correct = _correct(row, 0)
    for value, part in (("F", correct[0::2]), ("M", correct[1::2])):   # by hand
      assert (groups[value]["accuracy"]["k"], groups[value]["accuracy"]["n"]) == (
          int(part.sum()), N // 2)
  md = (tmp_path / "report.md").read_text()
  f_orig = int(_correct("original", 0)[0::2].sum())
  assert "## Subgroups" in md and f"| sex | F | {N // 2} | " in md and f"({f_orig}/{N // 2})" in md
  # without config.classifier.subgroups: no section
  config.classifier.subgroups = ()
  report.write_report(tmp_path, config, rows=ROWS, class_names=NAMES, splits=[_split(tmp_path)],
                      skipped={}, stage_seconds={})
  assert json.loads((tmp_path / "report.json").read_text())["subgroups"] is None
  assert "## Subgroups" not in (tmp_path / "report.md").read_text()
