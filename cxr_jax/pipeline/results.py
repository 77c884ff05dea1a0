"""The experiment's numbers, read from its run tree as plain data (`report.py` renders them).

Every classifier run is `<split root>/classifiers/<row>-<init>-seed<s>/` (metrics.json,
test_predictions.csv, classifier/model.json); a split root is the workdir itself with one split,
`<workdir>/split<k>` with several (`split_root`). Statistics (docs/experiment.md):

- the unit of inference is the test image (within its split): rows are compared by each image's
  mean correctness over seeds, a paired sign-flip permutation test with the interval that inverts
  it (`stats.sign_flip_test`); the comparison named by `config.primary_comparison` answers the
  question, every other one is Holm-corrected;
- per run, proportions carry exact Clopper-Pearson intervals (metrics.json), F1 and ROC-AUC their
  percentile bootstrap; means over runs a t-interval over runs, with the between-split and the
  between-seed spread apart;
- calibration (ECE, Brier, reliability bins) and the target class's sensitivity / specificity at
  the argmax rule, per row.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from cxr_jax import provenance
from cxr_jax.data import splits as splits_lib
from cxr_jax.evaluation import metrics as metrics_lib
from cxr_jax.evaluation import report_classifier
from cxr_jax.evaluation import stats
from cxr_jax.evaluation import subgroups as subgroups_lib
from cxr_jax.pipeline import shortcuts
from cxr_jax.training import export

INITS = ("scratch", "transfer")
ALPHA = 0.05
N_FLIPS = 20000     # random sign flips when exact enumeration is not feasible
FLIP_SEED = 0
POWER = 0.8
CALIBRATION_BINS = 10
# The paper's reported test accuracies (BIBM 2020, 3 classes), beside the rows they belong to.
PAPER = {("original", "scratch"): 0.956, ("original", "transfer"): 0.961,
         ("enhanced-pix2pix", "scratch"): 0.978, ("enhanced-pix2pix", "transfer"): 0.978}
CI_OVER_RUNS = "mean ± std over runs [95 % t-interval over runs]"


@dataclasses.dataclass(frozen=True)
class SplitRun:
  """One split of the experiment: where its runs live and what it trained on. `train_counts`
  maps a row (or `row/seed<s>`) to its training class counts, `synthetic_dirs` a translator tag
  to its synthesis folder."""
  root: pathlib.Path
  split_seed: int
  split_counts: Mapping[str, Mapping[str, int]]
  train_counts: Mapping[str, Mapping[str, int]]
  synthetic_dirs: Mapping[str, str | os.PathLike]
  class_names: tuple[str, ...] = ()


def split_root(workdir: str | os.PathLike, k: int, n_splits: int) -> pathlib.Path:
  """Where split k's stages write: the workdir itself with one split, else `split<k>/`."""
  return pathlib.Path(workdir) if n_splits == 1 else pathlib.Path(workdir) / f"split{k}"


def run_dir(root: str | os.PathLike, row: str, init: str, seed: int) -> pathlib.Path:
  """Where one classifier of the experiment lives: `classifiers/<row>-<init>-seed<seed>`."""
  return pathlib.Path(root) / "classifiers" / f"{row}-{init}-seed{int(seed)}"


def _read_json(path: pathlib.Path) -> dict:
  return json.loads(path.read_text()) if path.is_file() else {}


def _runs(splits: Sequence[SplitRun], row: str, init: str, seeds: Sequence[int]) -> list[dict]:
  """The finished runs of one row and initialisation, over splits and seeds."""
  runs = []
  for k, sp in enumerate(splits):
    for seed in seeds:
      d = run_dir(sp.root, row, init, seed)
      if (d / "metrics.json").is_file():
        runs.append({"split": k, "seed": int(seed), "dir": d,
                     "metrics": json.loads((d / "metrics.json").read_text())})
  return runs


def _train_steps(run_directory: pathlib.Path) -> int | None:
  meta = _read_json(run_directory / "classifier" / export.META_FILE)
  return None if meta.get("final_step") is None else int(meta["final_step"])


def spread(values: Sequence[float], split_of: Sequence[int]) -> dict[str, Any]:
  """The spread of one metric over runs, split apart: `between_seeds`, the mean over splits of
  the std over seeds within a split; `between_splits`, the std over splits of each split's mean
  over seeds. None where there is nothing to spread over (one seed, one split)."""
  by_split: dict[int, list[float]] = {}
  for v, k in zip(values, split_of):
    by_split.setdefault(k, []).append(float(v))
  within = [float(np.std(v, ddof=1)) for v in by_split.values() if len(v) > 1]
  means = [float(np.mean(v)) for v in by_split.values()]
  return {"between_seeds": float(np.mean(within)) if within else None,
          "between_splits": float(np.std(means, ddof=1)) if len(means) > 1 else None,
          "n_splits": len(by_split), "n_runs": len(values)}


def _calibration(runs: list[dict]) -> dict[str, Any] | None:
  """ECE and Brier per run (mean over runs), the reliability bins pooled over the runs."""
  per_run, labels, probs = [], [], []
  for r in runs:
    path = r["dir"] / "test_predictions.csv"
    if not path.is_file():
      continue
    _, y, p, _ = report_classifier.read_predictions(path)
    per_run.append(metrics_lib.calibration(y, p, n_bins=CALIBRATION_BINS))
    labels.append(y)
    probs.append(p)
  if not per_run:
    return None
  pooled = metrics_lib.calibration(np.concatenate(labels), np.concatenate(probs),
                                   n_bins=CALIBRATION_BINS)
  return {"ece": stats.mean_std_ci([c["ece"] for c in per_run]),
          "brier": stats.mean_std_ci([c["brier"] for c in per_run]),
          "pooled_bins": pooled["bins"], "pooled_ece": pooled["ece"], "n_runs": len(per_run)}


def row_entry(splits: Sequence[SplitRun], row: str, init: str, seeds: Sequence[int],
              class_names: Sequence[str], target: str) -> dict[str, Any] | None:
  """One row of the table from its runs' metrics.json; None when no run finished."""
  runs = _runs(splits, row, init, seeds)
  if not runs:
    return None

  def agg(get) -> dict:
    return dict(stats.mean_std_ci([get(r["metrics"]) for r in runs]), method=CI_OVER_RUNS)

  steps = sorted({s for s in (_train_steps(r["dir"]) for r in runs) if s is not None})
  accuracy = [r["metrics"]["accuracy"]["value"] for r in runs]
  entry: dict[str, Any] = {
      "row": row, "init": init, "seeds": sorted({r["seed"] for r in runs}),
      "n_runs": len(runs),
      "train_steps": steps[0] if len(steps) == 1 else (steps or None),
      "accuracy": agg(lambda m: m["accuracy"]["value"]),
      "accuracy_spread": spread(accuracy, [r["split"] for r in runs]),
      "macro_f1": agg(lambda m: m["macro_f1"]["value"]),
      "macro_roc_auc": agg(lambda m: m["macro_roc_auc"]["value"]),
      "per_class": {c: {k: agg(lambda m, c=c, k=k: m["per_class"][c][k]["value"])
                        for k in ("precision", "recall", "f1")} for c in class_names},
      "target_sensitivity": agg(lambda m: m["per_class"][target]["recall"]["value"]),
      "target_specificity": agg(lambda m: m["per_class"][target]["specificity"]["value"]),
      "calibration": _calibration(runs),
      "paper": PAPER.get((row, init)),
      "per_seed": [], "figures": {}}
  for r in runs:
    m = r["metrics"]
    entry["per_seed"].append({
        "split": r["split"], "seed": r["seed"], "n_test": m.get("n"),
        "train_steps": _train_steps(r["dir"]),
        "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "macro_roc_auc": m["macro_roc_auc"],
        "target_recall": m["per_class"][target]["recall"],
        "target_specificity": m["per_class"][target]["specificity"],
        "target_precision": m["per_class"][target]["precision"]})
  first = runs[0]["dir"]
  for name in ("confusion_matrix.png", "roc_curves.png", "gradcam.png"):
    if (first / name).is_file():
      entry["figures"][name] = first / name
  return entry


def _correct(root: pathlib.Path, row: str, init: str, seed: int):
  path = run_dir(root, row, init, seed) / "test_predictions.csv"
  return report_classifier.read_correct(path) if path.is_file() else None


def image_differences(splits: Sequence[SplitRun], a: str, b: str, init: str,
                      seeds: Sequence[int]) -> tuple[np.ndarray, list[dict]]:
  """Per test image (within its split), B's mean correctness over the seeds where both rows
  finished minus A's; and per (split, seed) the correctness pairs. Images of every split are
  concatenated: each (split, image) is one unit."""
  diffs, runs = [], []
  for k, sp in enumerate(splits):
    pairs = []
    for seed in seeds:
      ca, cb = _correct(sp.root, a, init, seed), _correct(sp.root, b, init, seed)
      if ca is None or cb is None or ca[0] != cb[0]:
        continue
      pairs.append((ca[1], cb[1]))
      runs.append({"split": k, "seed": int(seed), "a": ca[1], "b": cb[1]})
    if pairs:
      ma = np.mean([p[0] for p in pairs], axis=0)
      mb = np.mean([p[1] for p in pairs], axis=0)
      diffs.append(mb - ma)
  return (np.concatenate(diffs) if diffs else np.zeros(0)), runs


def compare(splits: Sequence[SplitRun], a: str, b: str, init: str,
            seeds: Sequence[int]) -> dict[str, Any] | None:
  """Row b against row a at one initialisation, on the same test images. The test: the paired
  sign-flip test on per-image differences of mean correctness (`image_level`), with the minimum
  detectable difference at 80 % power. Detail: McNemar per run, and the Cochran-Mantel-Haenszel
  statistic pooled over runs (it counts each image once per run, so it is no test of rows)."""
  d, runs = image_differences(splits, a, b, init, seeds)
  if not runs:
    return None
  test = stats.sign_flip_test(d, n_resamples=N_FLIPS, seed=FLIP_SEED, confidence=1 - ALPHA)
  return {"a": a, "b": b, "init": init,
          "image_level": dict(test, n_images=int(d.size), n_runs=len(runs),
                              mdd=stats.minimum_detectable_difference(d, alpha=ALPHA,
                                                                      power=POWER),
                              power=POWER),
          "per_seed": [{"split": r["split"], "seed": r["seed"],
                        "mcnemar": stats.mcnemar(r["a"], r["b"]),
                        "difference": float(np.mean(r["b"]) - np.mean(r["a"]))} for r in runs],
          "pooled_cmh": stats.cochran_mantel_haenszel_paired([(r["a"], r["b"]) for r in runs])}


def wanted_comparisons(rows: Sequence[str], primary: tuple[str, str]) -> list[tuple[str, str]]:
  """Every enhanced row and control against `original`, every enhanced row against each
  control, and the primary comparison whatever its rows."""
  enhanced_rows = [r for r in rows if r.startswith("enhanced-")]
  # The lungs-hidden row answers another question (shortcuts.py): not a control of enhancement.
  controls = [r for r in rows if r not in enhanced_rows
              and r not in ("original", shortcuts.LUNGS_HIDDEN)]
  wanted = [("original", r) for r in enhanced_rows + controls]
  wanted += [(c, e) for e in enhanced_rows for c in controls]
  if tuple(primary) not in wanted:
    wanted.insert(0, tuple(primary))
  return wanted


def primary_init(table: Mapping[str, dict], primary: tuple[str, str]) -> str | None:
  """The initialisation the question is answered at: transfer when both rows ran, else
  scratch; None when neither ran both."""
  ran = lambda row, init: "accuracy" in table.get(f"{row}/{init}", {})  # noqa: E731
  return next((i for i in ("transfer", "scratch") if all(ran(r, i) for r in primary)), None)


def comparisons(splits: Sequence[SplitRun], rows: Sequence[str], seeds: Sequence[int],
                primary: tuple[str, str], init: str | None) -> list[dict]:
  """Every comparison at each initialisation; the primary one (at `init`) marked `primary`,
  every other one with its Holm-adjusted p (`p_holm`) over all of them."""
  out = []
  for i in INITS:
    for a, b in wanted_comparisons(rows, primary):
      c = compare(splits, a, b, i, seeds)
      if c is not None:
        c["primary"] = (a, b, i) == (*primary, init)
        out.append(c)
  secondary = [c for c in out if not c["primary"]]
  for c, p in zip(secondary, stats.holm([c["image_level"]["p_value"] for c in secondary])):
    c["p_holm"] = p
  return out


def find(comps: Sequence[dict], a: str, b: str, init: str) -> dict | None:
  return next((c for c in comps if (c["a"], c["b"], c["init"]) == (a, b, init)), None)


def verdict(difference: float, p: float) -> str:
  if p < ALPHA:
    return "yes" if difference > 0 else "no, it hurt"
  return "no detectable difference"


def headline(table: Mapping[str, dict], comps: Sequence[dict], rows: Sequence[str],
             primary: tuple[str, str]) -> dict[str, Any]:
  """The answer as data: the primary comparison at its initialisation (read at p < ALPHA), and
  its B row against each control row (Holm-corrected)."""
  a, b = primary
  init = primary_init(table, primary)
  out: dict[str, Any] = {"primary_comparison": [a, b], "answered": False, "init": init}
  if init is None:
    return out
  comp = find(comps, a, b, init)
  if comp is None:
    return out
  t = comp["image_level"]
  acc = lambda row: table[f"{row}/{init}"]["accuracy"]["mean"]  # noqa: E731
  out.update(answered=True, verdict=verdict(t["difference"], t["p_value"]),
             accuracy_a=acc(a), accuracy_b=acc(b), difference=t["difference"],
             difference_ci=t["ci"], difference_ci_method=t["ci_method"], p_value=t["p_value"],
             p_method=t["test"], n_images=t["n_images"], n_runs=t["n_runs"], mdd=t["mdd"],
             power=t["power"], n_splits=len({s["split"] for s in comp["per_seed"]}),
             n_seeds=len({s["seed"] for s in comp["per_seed"]}))
  controls = []
  for control in ("balanced-loss", "oversampled"):
    if control in (a, b) or control not in rows:
      continue
    c = find(comps, control, b, init)
    if c is None:
      continue
    ct = c["image_level"]
    controls.append({"control": control, "accuracy": acc(control), "difference": ct["difference"],
                     "ci": ct["ci"], "p_value": ct["p_value"], "p_holm": c.get("p_holm"),
                     "beats": c.get("p_holm", ct["p_value"]) < ALPHA and ct["difference"] > 0})
  out["controls"] = controls
  out["other_rows"] = [{"row": r, "accuracy": acc(r)} for r in rows
                       if r not in (a, b) and f"{r}/{init}" in table
                       and "accuracy" in table[f"{r}/{init}"]]
  return out


def subgroup_tables(splits: Sequence[SplitRun], rows: Sequence[str], seeds: Sequence[int],
                    class_names: Sequence[str], keys: Sequence[str]) -> dict[str, Any] | None:
  """Per row and initialisation, the subgroup table (evaluation/subgroups.py) of one run: split
  0's first finished seed, on the metadata of its split manifest; None without `keys`
  (config.classifier.subgroups) or metadata."""
  if not keys:
    return None
  first = splits[0]
  manifest = first.root / splits_lib.MANIFEST
  if not manifest.is_file():
    return None
  metadata = subgroups_lib.read_metadata(manifest)
  tables = {}
  for row in rows:
    for init in INITS:
      for seed in seeds:
        predictions = run_dir(first.root, row, init, seed) / "test_predictions.csv"
        if predictions.is_file():
          tables[f"{row}/{init} (seed {seed})"] = subgroups_lib.from_predictions(
              predictions, metadata, keys, class_names)
          break
  return {"keys": list(keys), "split": 0, "tables": tables} if tables else None


def near_duplicates(root: pathlib.Path) -> dict[str, Any]:
  summary = _read_json(root / splits_lib.SUMMARY)
  if not summary:
    return {}
  return {"pairs": summary.get("near_duplicate_pairs"),
          "dropped": summary.get("totals", {}).get(splits_lib.DROPPED),
          "drop_near_duplicates": summary.get("drop_near_duplicates")}


def _kid_entries(q: dict) -> dict[str, dict]:
  """KID against the real target-class training images (which the translator saw) and, when
  synthesis measured it, against the validation ones (which it did not)."""
  out = {}
  for split in ("train", "val"):
    k = q.get(f"kid_{split}")
    if isinstance(k, dict):
      out[split] = {"mean": k.get("mean"), "std": k.get("std"), "n_real": k.get("n_real"),
                    "seen_by_translator": bool(k.get("seen_by_generator", split == "train")),
                    "note": k.get("note")}
  if "train" not in out and q.get("kid") is not None:
    out["train"] = {"mean": q["kid"], "std": q.get("kid_std"),
                    "n_real": q.get("n_real_target", q.get("num_real")),
                    "seen_by_translator": True, "note": None}
  return out


def quality(synthetic_dir: pathlib.Path, target: str) -> dict[str, Any]:
  """One translator's synthesis summary and translation-quality figures, KID first, FID left
  out (at these sample sizes its bias dominates: see docs/experiment.md)."""
  syn = _read_json(synthetic_dir / "synthesis.json")
  q = _read_json(synthetic_dir / "quality.json")
  return {"num_synthetic": syn.get("num_synthetic"), "num_sources": syn.get("num_sources"),
          "kid": _kid_entries(q),
          "input_dependence": q.get("input_dependence"),
          "relative_diversity": q.get("relative_diversity"),
          "target_share": q.get("target_share", q.get(f"share_called_{target}")),
          "features": q.get("features"), "note": q.get("note")}


def what_varies(config, n_splits: int) -> str:
  split = (f"The split varies too: {n_splits} stratified splits (data.split_seed + k), each with "
           "its own translators." if n_splits > 1 else
           "The split is fixed (data.split_seed; config.splits > 1 varies it).")
  if getattr(config, "translator_per_seed", False):
    return ("Across seeds: each classifier's initialisation, batch order and augmentation, and "
            "each translator's training, its synthesis and the oversampled row's augmented "
            "copies (translator_per_seed=True), so the GAN's own variance counts. " + split)
  return ("Across seeds: each classifier's initialisation, batch order and augmentation only; "
          "each translator is trained once and synthesises once, and the oversampled row's "
          "augmented copies are made once, for all seeds (set translator_per_seed=True to vary "
          "them too). " + split)


def versions() -> dict[str, str]:
  return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "orbax-checkpoint": getattr(ocp, "__version__", "?"),
          "numpy": np.__version__,
          "devices": ", ".join(sorted({f"{jax.device_count()} x {d.device_kind}"
                                       for d in jax.devices()}))}


def _relative(obj: Any, workdir: pathlib.Path) -> Any:
  """Paths inside the result as strings relative to the workdir (figures in report.md)."""
  if isinstance(obj, pathlib.Path):
    return os.path.relpath(obj, workdir)
  if isinstance(obj, dict):
    return {k: _relative(v, workdir) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_relative(v, workdir) for v in obj]
  return obj


def _tag(k: int, tag: str, n_splits: int) -> str:
  return tag if n_splits == 1 else f"split{k}/{tag}"


def collect(workdir: str | os.PathLike, config, *, rows: Sequence[str],
            class_names: Sequence[str], splits: Sequence[SplitRun], skipped: Mapping[str, str],
            stage_seconds: Mapping[str, float] | None = None) -> dict[str, Any]:
  """Everything report.json holds, as plain data (paths relative to `workdir`)."""
  workdir = pathlib.Path(workdir)
  class_names = list(class_names)
  target = config.synthesize.target_class
  seeds = [int(s) for s in config.seeds]
  primary = tuple(config.primary_comparison)
  table: dict[str, Any] = {}
  for row in rows:
    for init in INITS:
      key = f"{row}/{init}"
      entry = row_entry(splits, row, init, seeds, class_names, target)
      table[key] = entry if entry is not None else {"skipped": skipped.get(key, "not run")}
      table[key].setdefault("paper", PAPER.get((row, init)))
  init = primary_init(table, primary)
  comps = comparisons(splits, rows, seeds, primary, init)
  real = bool(config.data.data_dir) or bool(config.data.get("labels_csv", ""))
  first = splits[0]
  # The external set is the same for every split; its summary (overlap, skipped) is split 0's.
  reading_lungs = shortcuts.numbers(
      first.root, config, table, rows, first.split_counts, class_names,
      run_dirs=lambda row, i: [r["dir"] for r in _runs(splits, row, i, seeds)])
  result = {
      "created": datetime.datetime.now().isoformat(timespec="seconds"),
      "data": str(config.data.data_dir or config.data.get("labels_csv", "")) if real
              else "embedded synthetic default (procedural images)",
      "real_data": real, "image_size": config.data.image_size, "seeds": seeds,
      "splits": [{"split": k, "split_seed": sp.split_seed, "root": sp.root,
                  "split_counts": {n: dict(v) for n, v in sp.split_counts.items()},
                  "train_counts": {n: dict(v) for n, v in sp.train_counts.items()}}
                 for k, sp in enumerate(splits)],
      "translator_per_seed": bool(getattr(config, "translator_per_seed", False)),
      "what_varies": what_varies(config, len(splits)),
      "num_synthetic": str(config.synthesize.num_synthetic),
      "class_names": class_names, "target_class": target,
      "primary_comparison": list(primary), "alpha": ALPHA,
      "headline": headline(table, comps, rows, primary), "table": table,
      "comparisons": comps, "paper": {f"{r}/{i}": v for (r, i), v in PAPER.items()},
      # the first split's counts (every split's are in `splits`)
      "split_counts": {n: dict(v) for n, v in first.split_counts.items()},
      "train_counts": {n: dict(v) for n, v in first.train_counts.items()},
      "near_duplicates": near_duplicates(first.root),
      "subgroups": subgroup_tables(splits, rows, seeds, class_names,
                                   tuple(config.classifier.get("subgroups", ()))),
      "translation_quality": {_tag(k, tag, len(splits)): quality(pathlib.Path(d), target)
                              for k, sp in enumerate(splits)
                              for tag, d in sp.synthetic_dirs.items()},
      "translator_dirs": {_tag(k, tag, len(splits)): {
          "synthetic": pathlib.Path(d), "translator": sp.root / "translators" / tag}
          for k, sp in enumerate(splits) for tag, d in sp.synthetic_dirs.items()},
      "skipped": dict(skipped), "stage_seconds": dict(stage_seconds or {}),
      "software": versions(), "provenance": provenance.provenance(config), **reading_lungs}
  return _relative(result, workdir)
