"""The experiment's report on a constructed run tree (metrics and predictions written as the
classifier task writes them, no training): the headline answer and its pooled test against hand
computed values, the paper column, exact intervals, translation quality with KID and no FID,
near-duplicates, figures in tables, and the wording with and without real data."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from cxr_jax import configlib
from cxr_jax.evaluation import metrics as metrics_lib
from cxr_jax.evaluation import report_classifier
from cxr_jax.evaluation import stats
from cxr_jax.pipeline import report

from conftest import REPO_ROOT

NAMES = ("COVID", "NORMAL", "VIRAL_PNEUMONIA")
N = 60
SEEDS = (0, 1, 2)
ROWS = ["original", "balanced-loss", "oversampled", "enhanced-pix2pix", "enhanced-cyclegan"]
# Images that only the enhanced-pix2pix run of each seed gets right (c) ; it also loses image 0.
PIX2PIX_GAINS = {0: 5, 1: 6, 2: 7}


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


def _config(data_dir: str = ""):
  config = configlib.load_config_file(REPO_ROOT / "configs/experiment.py", "smoke")
  config.seeds = SEEDS
  config.data.data_dir = data_dir
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


def _write(tree, data_dir=""):
  workdir, syn = tree
  train = {"COVID": 10, "NORMAL": 40, "VIRAL_PNEUMONIA": 40}
  counts = {"original": train, "balanced-loss": train,
            **{r: dict(train, COVID=40) for r in ROWS[2:]}}
  skipped = {f"{r}/transfer": "no ImageNet weights configured" for r in ROWS}
  out = report.write_report(
      workdir, _config(data_dir), rows=ROWS, class_names=NAMES,
      split_counts={"train": train, "val": {c: 2 for c in NAMES}, "test": {c: 20 for c in NAMES}},
      train_counts=counts, skipped=skipped, synthetic_dirs=syn, stage_seconds={"split": 1.0})
  return out, json.loads((workdir / "report.json").read_text()), \
      (workdir / "report.md").read_text()


def test_headline_answer_and_pooled_test(tree):
  out, r, md = _write(tree)
  head = r["headline"]
  assert out["headline"]["verdict"] == head["verdict"] == "yes"
  assert head["translator"] == "pix2pix" and head["init"] == "scratch"
  # pooled over 3 seeds: b = 3 (image 0 each seed), c = 5 + 6 + 7 = 18; 21 discordant images <
  # 25: the exact conditional test, 2 P(X >= 18), X ~ Binomial(21, 1/2)
  exact = 2 * sum(math.comb(21, k) for k in range(18, 22)) / 2 ** 21
  assert head["p_method"] == "exact conditional"
  assert head["p_value"] == pytest.approx(exact, rel=1e-9) == pytest.approx(1.4896e-3, rel=1e-3)
  # per-seed differences (c_s - 1) / 60 = 4/60, 5/60, 6/60: mean 5/60, t-interval over 3 seeds
  d = np.array([4, 5, 6]) / N
  half = sps.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
  assert head["difference"] == pytest.approx(5 / N)
  assert head["difference_ci"] == pytest.approx([5 / N - half, 5 / N + half])
  primary = next(c for c in r["comparisons"] if (c["a"], c["b"]) == ("original",
                                                                      "enhanced-pix2pix"))
  assert (primary["pooled"]["b"], primary["pooled"]["c"]) == (3, 18)
  # the three lines come first, after the title and the synthetic-data line
  answer = md.split("## The answer\n\n")[1].split("\n\n")[0].splitlines()
  assert len(answer) == 3
  assert answer[0].startswith("1. **Did enhancement help?** Yes: enhanced-pix2pix 88.3 % against "
                              "original 80.0 % (scratch), a difference of +8.3 points")
  assert f"p = {exact:.2g} (exact conditional) over 3 seed(s)" in answer[0]
  assert "pix2pix" in answer[1] and "enhanced-cyclegan 80.0 %" in answer[1]
  # oversampled gets 3 of pix2pix's 5-7 extra images: enhanced minus oversampled 2-4 images per seed
  assert "balanced-loss 80.0 %" in answer[2] and "oversampled 85.0 %" in answer[2]


def test_no_detectable_difference_and_no_answer(tree):
  workdir, _ = tree
  rows = ["original", "balanced-loss", "oversampled", "enhanced-cyclegan"]
  table = {f"{row}/scratch": report.row_entry(workdir, row, "scratch", SEEDS, NAMES, "COVID")
           for row in rows}
  comps = report.comparisons(workdir, rows, SEEDS)
  head = report.headline(table, comps, rows)
  assert head["verdict"] == "no detectable difference" and head["difference"] == 0.0
  assert head["p_value"] == 1.0       # b = c = 3
  missing = report.headline({"original/scratch": table["original/scratch"]}, [], rows)
  assert not missing["answered"] and missing["lines"][0].startswith("**No answer:**")


def test_paper_column_and_exact_intervals(tree):
  _, r, md = _write(tree)
  lines = md.splitlines()
  row_of = lambda prefix: next(l for l in lines if l.startswith(prefix))  # noqa: E731
  assert "| 95.6 |" in row_of("| original | scratch | 80.0")
  assert "| 97.8* |" in row_of("| enhanced-pix2pix | scratch |")
  assert "97.8" not in row_of("| enhanced-cyclegan | scratch |")
  assert "96.1" in row_of("| original | transfer | skipped")
  assert md.count("does not say which initialisation") == 1
  assert r["table"]["original/scratch"]["paper"] == 0.956
  # per-seed accuracy: Clopper-Pearson of 48 / 60, shown beside the value
  lo, hi = stats.clopper_pearson_interval(48, 60)
  seed_row = row_of("| original | scratch | 0 |")
  assert f"80.0 [{100 * lo:.1f}, {100 * hi:.1f}]" in seed_row
  entry = r["table"]["original/scratch"]["per_seed"][0]["accuracy"]
  assert entry["ci_method"] == "clopper-pearson" and entry["ci"] == pytest.approx([lo, hi])
  assert r["table"]["original/scratch"]["per_seed"][0]["macro_f1"]["ci_method"] == \
      "percentile bootstrap"
  # the mean over seeds keeps the t-interval, labelled
  assert "mean ± std over seeds [95 % t-interval over seeds]" in md
  csv_text = (tree[0] / "report.csv").read_text().splitlines()
  assert csv_text[0] == ("training_data,init,seed,class,metric,value,std,ci_low,ci_high,ci_method,"
                         "n_seeds,paper")
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
  assert "s0: +6.7" in primary and "s2: +10.0" in primary and "| 3 / 18 |" in primary
  assert "**Multiplicity.**" in md and "among 2" in md


def test_quality_near_duplicates_counts_and_figures(tree):
  _, r, md = _write(tree)
  quality = md.split("## Translation quality")[1].split("## Figures")[0]
  header = next(l for l in quality.splitlines() if l.startswith("| translator"))
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
