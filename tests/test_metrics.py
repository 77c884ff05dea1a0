"""Classification metrics against numbers worked out by hand, and the bootstrap's behaviour."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from cxr_jax.evaluation import metrics

NAMES = ["COVID", "NORMAL", "VIRAL_PNEUMONIA"]
# 10 hand-made predictions; argmax per row gives PREDS.
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
PREDS = np.array([0, 0, 0, 1, 1, 1, 1, 2, 0, 0])
PROBS = np.array([
    [0.7, 0.2, 0.1],
    [0.6, 0.3, 0.1],
    [0.5, 0.2, 0.3],
    [0.3, 0.6, 0.1],
    [0.2, 0.7, 0.1],
    [0.1, 0.8, 0.1],
    [0.2, 0.5, 0.3],
    [0.2, 0.2, 0.6],
    [0.5, 0.2, 0.3],
    [0.6, 0.3, 0.1],
])


def _value(entry):
  return entry["value"]


@pytest.fixture(scope="module")
def hand_report():
  return metrics.classification_report(LABELS, PROBS, NAMES, n_bootstrap=200, seed=0)


def test_hand_example_predictions_are_as_designed():
  np.testing.assert_array_equal(PROBS.argmax(1), PREDS)


def test_confusion_matrix_and_support(hand_report):
  # true 0: predicted 0,0,0,1 -> [3, 1, 0]; true 1: 1,1,1 -> [0, 3, 0]; true 2: 2,0,0 -> [2, 0, 1]
  assert hand_report["confusion_matrix"] == [[3, 1, 0], [0, 3, 0], [2, 0, 1]]
  assert hand_report["support"] == [4, 3, 3]
  assert [hand_report["per_class"][n]["support"] for n in NAMES] == [4, 3, 3]
  assert hand_report["n"] == 10


def test_accuracy_and_averages(hand_report):
  assert _value(hand_report["accuracy"]) == pytest.approx(7 / 10)       # 3 + 3 + 1 correct
  # F1 = 2tp / (2tp + fp + fn): COVID 6/9, NORMAL 6/7, VIRAL 2/4
  assert _value(hand_report["macro_f1"]) == pytest.approx((6 / 9 + 6 / 7 + 2 / 4) / 3)
  # weighted by support 4, 3, 3
  assert _value(hand_report["weighted_f1"]) == pytest.approx((4 * 6 / 9 + 3 * 6 / 7 + 3 * 2 / 4) / 10)


@pytest.mark.parametrize("name,precision,recall,specificity,f1", [
    # COVID: tp 3, fp 2 (two VIRAL predicted COVID), fn 1, tn 4
    ("COVID", 3 / 5, 3 / 4, 4 / 6, 6 / 9),
    # NORMAL: tp 3, fp 1 (one COVID predicted NORMAL), fn 0, tn 6
    ("NORMAL", 3 / 4, 3 / 3, 6 / 7, 6 / 7),
    # VIRAL_PNEUMONIA: tp 1, fp 0, fn 2, tn 7
    ("VIRAL_PNEUMONIA", 1 / 1, 1 / 3, 7 / 7, 2 / 4),
])
def test_per_class_against_hand_values(hand_report, name, precision, recall, specificity, f1):
  entry = hand_report["per_class"][name]
  assert _value(entry["precision"]) == pytest.approx(precision)
  assert _value(entry["recall"]) == pytest.approx(recall)
  assert _value(entry["specificity"]) == pytest.approx(specificity)
  assert _value(entry["f1"]) == pytest.approx(f1)


def test_roc_auc_against_hand_mann_whitney(hand_report):
  # COVID scores, positives 0.7 0.6 0.5 0.3 vs negatives 0.2 0.1 0.2 0.2 0.5 0.6:
  # wins 6 + (5 + 0.5 tie) + (4 + 0.5 tie) + 4 = 20 of 4 * 6 pairs
  covid = 20 / 24
  # NORMAL, positives 0.7 0.8 0.5 vs negatives 0.2 0.3 0.2 0.6 0.2 0.2 0.3: 7 + 7 + 6 of 21
  normal = 20 / 21
  # VIRAL, positives 0.6 0.3 0.1 vs negatives 0.1 0.1 0.3 0.1 0.1 0.1 0.3:
  # 7 + (5 + 2 * 0.5) + (0 + 5 * 0.5) = 15.5 of 21
  viral = 15.5 / 21
  per_class = hand_report["per_class"]
  assert _value(per_class["COVID"]["roc_auc"]) == pytest.approx(covid)
  assert _value(per_class["NORMAL"]["roc_auc"]) == pytest.approx(normal)
  assert _value(per_class["VIRAL_PNEUMONIA"]["roc_auc"]) == pytest.approx(viral)
  assert _value(hand_report["macro_roc_auc"]) == pytest.approx((covid + normal + viral) / 3)


def test_cis_bracket_the_point_estimates(hand_report):
  entries = [hand_report[k] for k in ("accuracy", "macro_f1", "weighted_f1", "macro_roc_auc")]
  entries += [e[m] for e in hand_report["per_class"].values()
              for m in ("precision", "recall", "specificity", "f1", "roc_auc")]
  for entry in entries:
    lo, hi = entry["ci"]
    assert 0.0 <= lo <= entry["value"] <= hi <= 1.0


def test_report_is_plain_json(hand_report):
  text = json.dumps(hand_report, allow_nan=False)
  assert json.loads(text) == hand_report
  assert type(hand_report["accuracy"]["value"]) is float


def test_confusion_metrics_match_sklearn_on_random_data():
  rng = np.random.default_rng(1)
  labels, preds = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
  cm = skm.confusion_matrix(labels, preds, labels=range(4))
  got = metrics.metrics_from_confusion(cm[None])   # a batch of one resample
  p, r, f, _ = skm.precision_recall_fscore_support(labels, preds, labels=range(4),
                                                   zero_division=np.nan)
  np.testing.assert_allclose(got["precision"][0], p)
  np.testing.assert_allclose(got["recall"][0], r)
  np.testing.assert_allclose(got["f1"][0], f)
  assert got["accuracy"][0] == pytest.approx(skm.accuracy_score(labels, preds))
  assert got["macro_f1"][0] == pytest.approx(skm.f1_score(labels, preds, average="macro"))
  assert got["weighted_f1"][0] == pytest.approx(skm.f1_score(labels, preds, average="weighted"))


def test_vectorised_auc_matches_sklearn_with_ties_and_weights():
  rng = np.random.default_rng(2)
  y = rng.random(200) < 0.3
  scores = np.round(rng.random(200) + 0.3 * y, 1)   # coarse scores: many ties
  assert metrics.weighted_auc(y, scores, np.ones(200))[0] == pytest.approx(
      skm.roc_auc_score(y, scores))
  # integer weights are multiplicities: same as repeating the samples
  w = rng.integers(0, 4, size=(3, 200))
  got = metrics.weighted_auc(y, scores, w)
  for row, weights in zip(got, w):
    idx = np.repeat(np.arange(200), weights)
    assert row == pytest.approx(skm.roc_auc_score(y[idx], scores[idx]))
  # a resample without positives has no AUC
  assert np.isnan(metrics.weighted_auc(y, scores, np.where(y, 0, 1)[None])[0])


@pytest.mark.parametrize("name,key,k,n", [
    ("COVID", "precision", 3, 5), ("COVID", "recall", 3, 4), ("COVID", "specificity", 4, 6),
    ("NORMAL", "recall", 3, 3), ("NORMAL", "specificity", 6, 7),
    ("VIRAL_PNEUMONIA", "precision", 1, 1), ("VIRAL_PNEUMONIA", "specificity", 7, 7),
])
def test_proportions_get_clopper_pearson_intervals(hand_report, name, key, k, n):
  from scipy import stats as sps
  entry = hand_report["per_class"][name][key]
  ref = sps.binomtest(k, n).proportion_ci(method="exact")
  assert entry["ci"] == pytest.approx([ref.low, ref.high])
  assert entry["ci_method"] == metrics.CLOPPER_PEARSON
  ref = sps.binomtest(7, 10).proportion_ci(method="exact")
  assert hand_report["accuracy"]["ci"] == pytest.approx([ref.low, ref.high])
  assert hand_report["accuracy"]["ci_method"] == metrics.CLOPPER_PEARSON
  for key in ("f1", "roc_auc"):
    assert hand_report["per_class"][name][key]["ci_method"] == metrics.BOOTSTRAP
  assert hand_report["macro_f1"]["ci_method"] == metrics.BOOTSTRAP


def test_perfect_recall_no_longer_gets_a_zero_width_interval():
  # the case: 44/44 COVID recall was [100, 100] under the bootstrap
  labels = np.array([0] * 44 + [1] * 100)
  preds = np.array([0] * 44 + [1] * 99 + [0])
  r = metrics.classification_report(labels, np.eye(2)[preds], NAMES[:2], n_bootstrap=50)
  lo, hi = r["per_class"]["COVID"]["recall"]["ci"]
  assert round(lo, 3) == 0.920 and hi == 1.0
  # 44 of 45 COVID predictions are right: precision 44/45
  assert r["per_class"]["COVID"]["precision"]["value"] == pytest.approx(44 / 45)
  assert r["per_class"]["COVID"]["precision"]["ci"][1] < 1.0


def test_bootstrap_narrows_with_more_data():
  def width(reps):
    r = metrics.classification_report(np.tile(LABELS, reps), np.tile(PROBS, (reps, 1)), NAMES,
                                      n_bootstrap=300, seed=0)
    lo, hi = r["macro_f1"]["ci"]
    assert lo <= r["macro_f1"]["value"] <= hi
    return hi - lo
  assert width(20) < width(1)
  assert width(20) < 0.15


def test_perfect_classifier_has_degenerate_cis():
  labels = np.array([0, 1, 2] * 10)
  r = metrics.classification_report(labels, np.eye(3)[labels], NAMES, n_bootstrap=100)
  for key in ("macro_f1", "weighted_f1", "macro_roc_auc"):
    assert r[key] == {"value": 1.0, "ci": [1.0, 1.0], "ci_method": metrics.BOOTSTRAP}
  # the proportion is exact: 30/30 has a lower bound of 0.025^(1/30), not 1
  assert r["accuracy"] == {"value": 1.0, "ci": [pytest.approx(0.025 ** (1 / 30)), 1.0],
                           "ci_method": metrics.CLOPPER_PEARSON}
  assert r["confusion_matrix"] == [[10, 0, 0], [0, 10, 0], [0, 0, 10]]


def test_seed_makes_the_bootstrap_reproducible():
  a = metrics.classification_report(LABELS, PROBS, NAMES, n_bootstrap=50, seed=3)
  b = metrics.classification_report(LABELS, PROBS, NAMES, n_bootstrap=50, seed=3)
  assert a == b


def test_absent_class_gives_nan_and_a_note_not_a_crash(tmp_path):
  labels = np.array([0, 0, 1, 1, 1, 0])
  probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1],
                    [0.1, 0.2, 0.7], [0.4, 0.5, 0.1], [0.9, 0.05, 0.05]])
  r = metrics.classification_report(labels, probs, NAMES, n_bootstrap=50)
  viral = r["per_class"]["VIRAL_PNEUMONIA"]
  assert viral["support"] == 0
  assert math.isnan(viral["roc_auc"]["value"]) and math.isnan(viral["recall"]["value"])
  assert viral["f1"]["value"] == 0.0                      # predicted once, never right
  assert any("VIRAL_PNEUMONIA is absent" in note for note in r["notes"])
  # macro ROC-AUC averages the two defined classes
  auc0 = skm.roc_auc_score(labels == 0, probs[:, 0])
  auc1 = skm.roc_auc_score(labels == 1, probs[:, 1])
  assert r["macro_roc_auc"]["value"] == pytest.approx((auc0 + auc1) / 2)
  json_path, _ = metrics.write_metrics(tmp_path, r)
  with open(json_path, encoding="utf-8") as f:
    loaded = json.load(f)
  assert loaded["per_class"]["VIRAL_PNEUMONIA"]["roc_auc"] == {
      "value": None, "ci": [None, None], "ci_method": metrics.BOOTSTRAP}
  # recall of an absent class: n = 0, no Clopper-Pearson interval either
  assert loaded["per_class"]["VIRAL_PNEUMONIA"]["recall"] == {
      "value": None, "ci": [None, None], "ci_method": metrics.CLOPPER_PEARSON}


def test_write_metrics_writes_json_and_markdown(tmp_path, hand_report):
  out = tmp_path / "eval"
  json_path, md_path = metrics.write_metrics(out, hand_report, title="original / scratch")
  assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "metrics.md"]
  with open(json_path, encoding="utf-8") as f:
    assert json.load(f) == hand_report
  with open(md_path, encoding="utf-8") as f:
    md = f.read()
  assert md.startswith("# original / scratch")
  assert "| Metric | Value | 95 % CI |" in md
  assert "exact Clopper-Pearson for proportions" in md
  lo, hi = hand_report["accuracy"]["ci"]
  assert f"| accuracy | 0.7000 | [{lo:.4f}, {hi:.4f}] |" in md
  assert "| Class | Support | precision | recall | specificity | f1 | roc_auc |" in md
  assert "| COVID | 4 | 0.6000 " in md
  assert "| VIRAL_PNEUMONIA | 2 | 0 | 1 |" in md                 # confusion matrix row


def test_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="probs"):
    metrics.classification_report(LABELS, PROBS[:, :2], NAMES)
  with pytest.raises(ValueError, match="labels"):
    metrics.classification_report(LABELS + 1, PROBS, NAMES)


def test_plots_write_pngs(tmp_path):
  from PIL import Image
  from cxr_jax.evaluation import plots
  cm_path, roc_path, curves_path = (tmp_path / f"{n}.png" for n in ("cm", "roc", "curves"))
  plots.confusion_matrix_png(cm_path, [[3, 1, 0], [0, 3, 0], [0, 0, 0]], NAMES, title="test")
  # the class absent from the labels gets no curve, and no crash
  plots.roc_curves_png(roc_path, np.array([0, 0, 1, 1, 0]), PROBS[:5], NAMES, title="test")
  plots.training_curves_png(curves_path, {"loss": [(0, 1.0), (10, 0.5)], "accuracy": [(10, 0.7)]})
  for path in (cm_path, roc_path, curves_path):
    with Image.open(path) as im:
      assert im.format == "PNG" and min(im.size) > 100
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "curves.png", "roc.png"]


def test_subgroup_table_counts_and_exact_intervals_by_hand():
  from cxr_jax.evaluation import stats as stats_lib
  from cxr_jax.evaluation import subgroups
  files = [f"{i}.png" for i in range(8)]
  labels = [0, 0, 1, 1, 0, 1, 1, 0]
  predicted = [0, 1, 1, 1, 0, 0, 1, 0]
  metadata = {"0.png": {"sex": "F", "age": "34"}, "1.png": {"sex": "F", "age": "39.5"},
              "2.png": {"sex": "F", "age": "41"}, "3.png": {"sex": "M", "age": "95"},
              "4.png": {"sex": "M", "age": "5"}, "5.png": {"sex": "M"},
              "6.png": {"sex": "F", "age": "30"}}  # 7.png: no metadata
  table = subgroups.subgroup_table(files, labels, predicted, ("A", "B"), metadata,
                                   ("sex", "age_band"))
  by = {(g["column"], g["value"]): g for g in table["groups"]}
  assert [k for k in by] == [("sex", "F"), ("sex", "M"), ("sex", "unknown"),
                             ("age_band", "0-9"), ("age_band", "30-39"), ("age_band", "40-49"),
                             ("age_band", "90+"), ("age_band", "unknown")]
  f = by[("sex", "F")]  # images 0, 1, 2, 6: right 0, 2, 6
  assert f["n"] == 4 and (f["accuracy"]["k"], f["accuracy"]["n"]) == (3, 4)
  assert f["accuracy"]["ci"] == list(stats_lib.clopper_pearson_interval(3, 4))
  assert (f["recall"]["A"]["k"], f["recall"]["A"]["n"]) == (1, 2)  # 0 right, 1 wrong
  assert (f["recall"]["B"]["k"], f["recall"]["B"]["n"]) == (2, 2)
  m = by[("sex", "M")]  # images 3, 4, 5: 5 (B -> A) wrong
  assert (m["recall"]["B"]["k"], m["recall"]["B"]["n"]) == (1, 2)
  unknown_age = by[("age_band", "unknown")]  # 5 and 7
  assert unknown_age["n"] == 2 and unknown_age["accuracy"]["k"] == 1
  assert math.isnan(by[("age_band", "0-9")]["recall"]["B"]["value"])  # no B image there
  text = subgroups.markdown(table)
  assert "| sex | F | 4 | 0.750 [0.194, 0.994] (3/4) | 0.500" in text
  assert "| age_band | 0-9 | 1 | 1.000 [0.025, 1.000] (1/1) | 1.000 [0.025, 1.000] (1/1) | n/a |" \
      in text


def test_subgroups_config_names_the_missing_column():
  from cxr_jax.errors import ConfigError
  from cxr_jax.evaluation import subgroups
  meta = {"a.png": {"sex": "F", "age": "30"}}
  assert subgroups.check(("sex", "age_band"), meta) == ("sex", "age_band")
  assert subgroups.check((), meta) == ()
  with pytest.raises(ConfigError, match=r"config.subgroups: 'view' is not a metadata column of the "
                     r"data \(columns: age, age_band, sex"):
    subgroups.check(("sex", "view"), meta)


def test_subgroups_from_predictions_files_side_by_side(tmp_path):
  from cxr_jax.data import splits
  from cxr_jax.evaluation import subgroups
  splits.write_manifest(tmp_path, [
      splits.ManifestRow("a.png", "h1", "A", "test", "", {"sex": "F"}),
      splits.ManifestRow("b.png", "h2", "B", "test", "", {"sex": "M"}),
      splits.ManifestRow("c.png", "h3", "B", "test", "", {"sex": "F"})], class_names=("A", "B"))
  meta = subgroups.read_metadata(tmp_path / splits.MANIFEST)
  assert meta == {"a.png": {"sex": "F"}, "b.png": {"sex": "M"}, "c.png": {"sex": "F"}}
  tables = {}
  for run, predicted in (("original", "ABA"), ("enhanced", "ABB")):
    path = tmp_path / f"{run}.csv"
    path.write_text("file,label,predicted,p_A,p_B\n" + "".join(
        f"{f}.png,{lbl},{p},0.5,0.5\n" for f, lbl, p in zip("abc", "ABB", predicted)))
    tables[run] = subgroups.from_predictions(path, meta, ("sex",), ("A", "B"))
  f_orig = tables["original"]["groups"][0]
  assert f_orig["value"] == "F" and (f_orig["accuracy"]["k"], f_orig["accuracy"]["n"]) == (1, 2)
  text = subgroups.compare_markdown(tables)
  assert "| Column | Subgroup | Images | original | enhanced |" in text
  assert "| sex | F | 2 | 0.500 [0.013, 0.987] (1/2) | 1.000 [0.158, 1.000] (2/2) |" in text
def test_calibration_by_hand_and_brier_against_sklearn():
  labels = np.array([0, 0, 1, 1, 2])
  probs = np.array([[0.9, 0.05, 0.05],     # right, confidence 0.9
                    [0.6, 0.3, 0.1],       # right, 0.6
                    [0.7, 0.2, 0.1],       # wrong, 0.7
                    [0.1, 0.85, 0.05],     # right, 0.85
                    [0.2, 0.2, 0.6]])      # right, 0.6
  c = metrics.calibration(labels, probs, n_bins=5)
  # bins (0.4, 0.6]: 0.6, 0.6 both right -> |1 - 0.6| * 2/5; (0.6, 0.8]: 0.7 wrong -> 0.7 * 1/5;
  # (0.8, 1]: 0.9, 0.85 right -> |1 - 0.875| * 2/5
  assert c["ece"] == pytest.approx(0.4 * 0.4 + 0.7 * 0.2 + 0.125 * 0.4)
  assert [b["count"] for b in c["bins"]] == [0, 0, 2, 1, 2]
  assert c["bins"][4]["confidence"] == pytest.approx(0.875) and c["bins"][3]["accuracy"] == 0.0
  assert c["bins"][0]["accuracy"] is None
  onehot = np.eye(3)[labels]
  assert c["brier"] == pytest.approx(np.mean(np.sum((probs - onehot) ** 2, 1)))
  # for two classes the multi-class Brier score is twice sklearn's binary one
  p1 = np.array([0.2, 0.7, 0.9, 0.4])
  y = np.array([0, 1, 1, 0])
  two = metrics.calibration(y, np.stack([1 - p1, p1], 1))
  assert two["brier"] == pytest.approx(2 * skm.brier_score_loss(y, p1))
