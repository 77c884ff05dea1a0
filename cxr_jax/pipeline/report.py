"""The experiment's report: `report.md`, and the same numbers in `report.json` and `report.csv`.

It opens with the answer to the paper's question (did GAN enhancement help, by how much, which
translator, against the controls that change only the class prior or add classical augmented
copies), then the table with the paper's figures beside the rows they belong to. Statistics
(docs/experiment.md): per-seed proportions carry exact Clopper-Pearson intervals (from each run's
metrics.json), F1 and ROC-AUC their percentile bootstrap, means over seeds a t-interval; rows are
compared on the same test images by McNemar per seed and Cochran-Mantel-Haenszel pooled over seeds.
Everything is read from the run directory tree, so the report can be rebuilt without training.
"""

from __future__ import annotations

import datetime
import json
import math
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

from cxr_jax import workdir as workdir_lib
from cxr_jax.data import splits as splits_lib
from cxr_jax.evaluation import report_classifier
from cxr_jax.evaluation import stats
from cxr_jax.pipeline import shortcuts
from cxr_jax.utils import files

INITS = ("scratch", "transfer")
ALPHA = 0.05
# The paper's reported test accuracies (BIBM 2020, 3 classes), beside the rows they belong to.
PAPER = {("original", "scratch"): 0.956, ("original", "transfer"): 0.961,
         ("enhanced-pix2pix", "scratch"): 0.978, ("enhanced-pix2pix", "transfer"): 0.978}
PAPER_NOTE = (
    "Paper column: the accuracies reported by the paper (BIBM 2020): 95.6 % (original data, from "
    "scratch), 96.1 % (original data, transfer) and 97.8 % (pix2pix-enhanced data). The abstract "
    "does not say which initialisation the 97.8 % row used, so it stands beside both "
    "enhanced-pix2pix rows (marked *).")
CONFOUND = (
    "**Known confound.** In the COVID-19 Radiography Database the normal and viral-pneumonia "
    "images come from a pediatric collection, while the COVID-19 images are from adults. A "
    "classifier can separate COVID-19 from the rest partly by patient age and acquisition source "
    "rather than by lung findings; high accuracy here is not evidence of clinical performance. "
    "Synthetic COVID-19 images are translated from normal training images and inherit their "
    "sources' anatomy (pediatric here): the enhanced rows add adult-labelled images with "
    "children's chests, which changes what the age shortcut is worth.")
SYNTHETIC_DATA_NOTE = (
    "**This run shows the pipeline on procedural images (the embedded synthetic default), not a "
    "result:** its numbers say nothing about radiographs or about the paper's claim.")
_CI_T = "mean ± std over seeds [95 % t-interval over seeds]"


def run_dir(workdir: str | os.PathLike, row: str, init: str, seed: int) -> pathlib.Path:
  """Where one classifier of the experiment lives: `classifiers/<row>-<init>-seed<seed>`."""
  return pathlib.Path(workdir) / "classifiers" / f"{row}-{init}-seed{int(seed)}"


def _fmt(agg: dict[str, Any], spread: bool = True) -> str:
  """'mean ± std [ci]' in %, or just the mean; undefined values (e.g. the precision of a class
  never predicted) as 'n/a'."""
  mean = agg.get("mean", agg.get("value"))
  if mean is None or not np.isfinite(mean):
    return "n/a"
  s = 100.0
  text = f"{mean * s:.1f}"
  if not spread:
    return text
  if agg.get("std") is not None:
    text += f" ± {agg['std'] * s:.1f}"
  if agg.get("ci") is not None and agg["ci"][0] is not None and np.isfinite(agg["ci"][0]):
    lo, hi = (min(max(v * s, 0.0), s) for v in agg["ci"])  # a proportion's interval, clipped
    text += f" [{lo:.1f}, {hi:.1f}]"
  return text


def _pts(x: float | None) -> str:
  return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:+.1f}"


def _diff_ci(ci) -> str:
  """A difference of two accuracies lies in [-1, 1]: its t-interval over few seeds is shown
  clipped to that range (report.json keeps it as computed)."""
  lo, hi = (min(max(v, -1.0), 1.0) for v in ci)
  return f"{_pts(lo)}, {_pts(hi)}"


def _p(p: float | None) -> str:
  return "n/a" if p is None else f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _versions() -> dict[str, str]:
  return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "orbax-checkpoint": getattr(ocp, "__version__", "?"),
          "numpy": np.__version__,
          "devices": ", ".join(sorted({f"{jax.device_count()} x {d.device_kind}"
                                       for d in jax.devices()}))}


def _read_json(path: pathlib.Path) -> dict:
  return json.loads(path.read_text()) if path.is_file() else {}


# ------------------------------------------------------------------------------- the numbers


def row_entry(workdir: pathlib.Path, row: str, init: str, seeds: Sequence[int],
              class_names: Sequence[str], target: str) -> dict[str, Any] | None:
  """One row of the table from its runs' metrics.json; None when no seed finished."""
  runs = []
  for seed in seeds:
    d = run_dir(workdir, row, init, seed)
    if (d / "metrics.json").is_file():
      runs.append({"seed": int(seed), "dir": d, "metrics": json.loads((d / "metrics.json")
                                                                     .read_text())})
  if not runs:
    return None

  def agg(get) -> dict:
    return dict(stats.mean_std_ci([get(r["metrics"]) for r in runs]), method=_CI_T)

  entry: dict[str, Any] = {
      "row": row, "init": init, "seeds": [r["seed"] for r in runs],
      "accuracy": agg(lambda m: m["accuracy"]["value"]),
      "macro_f1": agg(lambda m: m["macro_f1"]["value"]),
      "macro_roc_auc": agg(lambda m: m["macro_roc_auc"]["value"]),
      "per_class": {c: {k: agg(lambda m, c=c, k=k: m["per_class"][c][k]["value"])
                        for k in ("precision", "recall", "f1")} for c in class_names},
      "paper": PAPER.get((row, init)),
      "per_seed": [], "figures": {}}
  for r in runs:
    m = r["metrics"]
    entry["per_seed"].append({
        "seed": r["seed"], "n_test": m.get("n"),
        "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "macro_roc_auc": m["macro_roc_auc"],
        "target_recall": m["per_class"][target]["recall"],
        "target_precision": m["per_class"][target]["precision"]})
  first = runs[0]["dir"]
  for name in ("confusion_matrix.png", "roc_curves.png", "gradcam.png"):
    if (first / name).is_file():
      entry["figures"][name] = os.path.relpath(first / name, workdir)
  return entry


def _correct(workdir: pathlib.Path, row: str, init: str, seed: int):
  path = run_dir(workdir, row, init, seed) / "test_predictions.csv"
  return report_classifier.read_correct(path) if path.is_file() else None


def compare(workdir: pathlib.Path, a: str, b: str, init: str, seeds: Sequence[int], *,
            n_bootstrap: int = 2000) -> dict[str, Any] | None:
  """Row b against row a at one initialisation, on the same test images: McNemar and a paired
  bootstrap per seed, Cochran-Mantel-Haenszel pooled over the seeds where both finished."""
  per_seed, pairs = [], []
  for seed in seeds:
    ca, cb = _correct(workdir, a, init, seed), _correct(workdir, b, init, seed)
    if ca is None or cb is None or ca[0] != cb[0]:
      continue
    pairs.append((ca[1], cb[1]))
    per_seed.append({"seed": int(seed), "mcnemar": stats.mcnemar(ca[1], cb[1]),
                     "paired_bootstrap": stats.paired_bootstrap(ca[1], cb[1],
                                                                n_bootstrap=n_bootstrap,
                                                                seed=int(seed))})
  if not pairs:
    return None
  return {"a": a, "b": b, "init": init, "per_seed": per_seed,
          "pooled": stats.cochran_mantel_haenszel_paired(pairs)}


def comparisons(workdir: pathlib.Path, rows: Sequence[str], seeds: Sequence[int]) -> list[dict]:
  """Every enhanced row and control against `original`, and every enhanced row against each
  control, at each initialisation."""
  enhanced_rows = [r for r in rows if r.startswith("enhanced-")]
  # The lungs-hidden row answers another question (shortcuts.py): not a control of enhancement.
  controls = [r for r in rows if r not in enhanced_rows
              and r not in ("original", shortcuts.LUNGS_HIDDEN)]
  wanted = [("original", r) for r in enhanced_rows + controls]
  wanted += [(c, e) for e in enhanced_rows for c in controls]
  out = []
  for init in INITS:
    for a, b in wanted:
      c = compare(workdir, a, b, init, seeds)
      if c is not None:
        out.append(c)
  return out


def _find(comps: list[dict], a: str, b: str, init: str) -> dict | None:
  return next((c for c in comps if (c["a"], c["b"], c["init"]) == (a, b, init)), None)


def pooled_p(pooled: dict) -> tuple[float, str]:
  """The pooled test's p-value: the conditional exact test below 25 discordant images (where the
  chi-square approximation is poor, as for McNemar), else the continuity-corrected CMH
  chi-square."""
  if pooled["b"] + pooled["c"] < 25:
    return pooled["exact_p_value"], "exact conditional"
  return pooled["p_value"], "chi-square"


def _difference_ci(comp: dict) -> tuple[list[float] | None, str]:
  """The pooled comparison's CI of the accuracy difference: the t-interval over seeds, or with
  one seed that seed's paired bootstrap."""
  pooled = comp["pooled"]
  if pooled.get("difference_ci") is not None:
    return pooled["difference_ci"], "t-interval over seeds"
  boot = comp["per_seed"][0]["paired_bootstrap"]
  return boot["ci"], "paired bootstrap over test images, one seed"


def _verdict(diff: float, p: float) -> str:
  if p < ALPHA:
    return "yes" if diff > 0 else "no, it hurt"
  return "no detectable difference"


def headline(table: dict[str, dict], comps: list[dict], rows: Sequence[str]) -> dict[str, Any]:
  """The answer: the best translator's enhanced row against `original` at the same
  initialisation (transfer when it ran, else scratch), and that row against each control."""
  enhanced_rows = [r for r in rows if r.startswith("enhanced-")]
  ran = lambda row, init: "accuracy" in table.get(f"{row}/{init}", {})  # noqa: E731
  inits = [i for i in ("transfer", "scratch")
           if ran("original", i) and any(ran(r, i) for r in enhanced_rows)]
  if not inits:
    return {"answered": False, "lines": [
        "**No answer:** the original row or every enhanced row is missing (not run or not "
        "finished), so enhancement cannot be judged."]}
  init = inits[0]
  candidates = [r for r in enhanced_rows if ran(r, init)]
  best = max(candidates, key=lambda r: table[f"{r}/{init}"]["accuracy"]["mean"])
  acc = lambda row: table[f"{row}/{init}"]["accuracy"]["mean"]  # noqa: E731
  primary = _find(comps, "original", best, init)
  out: dict[str, Any] = {"answered": primary is not None, "init": init, "best_row": best,
                         "translator": best[len("enhanced-"):]}
  if primary is None:
    out["lines"] = [f"**No answer:** {best} and original ({init}) share no seed with matching "
                    "test predictions."]
    return out
  pooled = primary["pooled"]
  ci, ci_method = _difference_ci(primary)
  p, p_method = pooled_p(pooled)
  verdict = _verdict(pooled["difference"], p)
  out.update(verdict=verdict, difference=pooled["difference"], difference_ci=ci,
             difference_ci_method=ci_method, p_value=p, p_method=p_method,
             n_seeds=pooled["n_seeds"])
  ci_text = "" if ci is None else f" [95 % CI {_diff_ci(ci)}; {ci_method}]"
  line1 = (f"**Did enhancement help?** {verdict.capitalize()}: {best} {100 * acc(best):.1f} % "
           f"against original {100 * acc('original'):.1f} % ({init}), a difference of "
           f"{_pts(pooled['difference'])} points{ci_text}; pooled Cochran-Mantel-Haenszel "
           f"p = {_p(p)} ({p_method}) over {pooled['n_seeds']} seed(s) ({pooled['b']} test "
           f"images right only with original, {pooled['c']} only with {best}).")
  others = [f"{r} {100 * acc(r):.1f} %" for r in candidates if r != best]
  line2 = (f"**Which translator:** {out['translator']}, the best enhanced row by mean test "
           f"accuracy ({init})" + (f"; the others: {', '.join(others)}." if others else
                                   "; it is the only translator run."))
  parts, beats = [], []
  for control in ("balanced-loss", "oversampled"):
    comp = _find(comps, control, best, init)
    if comp is None:
      continue
    cp = comp["pooled"]
    cp_p = pooled_p(cp)[0]
    parts.append(f"{control} {100 * acc(control):.1f} % ({best} minus {control}: "
                 f"{_pts(cp['difference'])} points, p = {_p(cp_p)})")
    beats.append(cp_p < ALPHA and cp["difference"] > 0)
  if parts:
    summary = ("the synthetic images beat every control" if all(beats) else
               "the synthetic images do not beat " + " or ".join(
                   c for c, b in zip(("balanced-loss", "oversampled"), beats) if not b)
               + ", so the gain (if any) is not shown to come from the translation")
    line3 = f"**Against the controls:** {'; '.join(parts)}: {summary}."
  else:
    line3 = "**Against the controls:** no control row finished."
  out["lines"] = [line1, line2, line3]
  return out


def _near_duplicates(workdir: pathlib.Path) -> dict[str, Any]:
  summary = _read_json(workdir / splits_lib.SUMMARY)
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


def _quality(synthetic_dir: pathlib.Path, target: str) -> dict[str, Any]:
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


def _what_varies(config) -> str:
  if getattr(config, "translator_per_seed", False):
    return ("Across seeds: each classifier's initialisation, batch order and augmentation, and "
            "each translator's training, its synthesis and the oversampled row's augmented "
            "copies (translator_per_seed=True), so the GAN's own variance counts. The split is "
            "fixed (data.split_seed).")
  return ("Across seeds: each classifier's initialisation, batch order and augmentation only; "
          "each translator is trained once and synthesises once, and the oversampled row's "
          "augmented copies are made once, for all seeds (set translator_per_seed=True to vary "
          "them too). The split is fixed (data.split_seed).")


def write_report(workdir: str | os.PathLike, config, *, rows: Sequence[str],
                 class_names: Sequence[str], split_counts: Mapping[str, Mapping[str, int]],
                 train_counts: Mapping[str, Mapping[str, int]], skipped: Mapping[str, str],
                 synthetic_dirs: Mapping[str, str | os.PathLike],
                 stage_seconds: Mapping[str, float] | None = None) -> dict:
  """Builds the report from the run directory tree under `workdir`; returns the table's
  accuracies and the headline. `train_counts` maps a row (or `row/seed<s>`) to its training
  class counts, `synthetic_dirs` a translator (or `translator-seed<s>`) to its synthesis folder."""
  workdir = pathlib.Path(workdir)
  class_names = list(class_names)
  target = config.synthesize.target_class
  seeds = [int(s) for s in config.seeds]
  table: dict[str, Any] = {}
  for row in rows:
    for init in INITS:
      key = f"{row}/{init}"
      entry = row_entry(workdir, row, init, seeds, class_names, target)
      table[key] = entry if entry is not None else {"skipped": skipped.get(key, "not run")}
      table[key].setdefault("paper", PAPER.get((row, init)))
  comps = comparisons(workdir, rows, seeds)
  head = headline(table, comps, rows)
  reading_lungs = shortcuts.numbers(workdir, config, table, rows, split_counts, class_names,
                                    run_dir=run_dir)
  real = bool(config.data.data_dir) or bool(config.data.get("labels_csv", ""))
  result = {
      "created": datetime.datetime.now().isoformat(timespec="seconds"),
      "data": str(config.data.data_dir or config.data.get("labels_csv", "")) if real
              else "embedded synthetic default (procedural images)",
      "real_data": real, "image_size": config.data.image_size, "seeds": seeds,
      "translator_per_seed": bool(getattr(config, "translator_per_seed", False)),
      "what_varies": _what_varies(config), "num_synthetic": str(config.synthesize.num_synthetic),
      "class_names": class_names, "target_class": target, "headline": head, "table": table,
      "comparisons": comps, "paper": {f"{r}/{i}": v for (r, i), v in PAPER.items()},
      "split_counts": {k: dict(v) for k, v in split_counts.items()},
      "train_counts": {k: dict(v) for k, v in train_counts.items()},
      "near_duplicates": _near_duplicates(workdir),
      "translation_quality": {tag: _quality(pathlib.Path(d), target)
                              for tag, d in synthetic_dirs.items()},
      "skipped": dict(skipped), "stage_seconds": dict(stage_seconds or {}),
      "software": _versions(), **reading_lungs}
  if workdir_lib.is_writer():
    files.write_text_atomic(workdir / "report.json",
                            json.dumps(_finite(result), indent=2, default=str, allow_nan=False))
    files.write_text_atomic(workdir / "report.md",
                            markdown(result, workdir, synthetic_dirs=synthetic_dirs))
    write_csv(workdir / "report.csv", table, class_names, target)
  return {"table": {k: v.get("accuracy", v) for k, v in table.items()}, "headline": head}


def _finite(obj: Any) -> Any:
  """Strict JSON: NaN / inf (an undefined metric) become null."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  if isinstance(obj, pathlib.Path):
    return str(obj)
  return obj


# ------------------------------------------------------------------------------- the words


def _img(path: str | None, width: int = 240) -> str:
  return "" if not path else f'<img src="{path}" width="{width}">'


def _counts_cells(counts: Mapping[str, int], names: Sequence[str], target: str) -> str:
  total = sum(counts.values())
  share = counts.get(target, 0) / total if total else math.nan
  return (" | ".join(str(counts.get(c, 0)) for c in names)
          + f" | {total} | {100 * share:.1f} %")


def _seed_cell(p: dict) -> str:
  m, b = p["mcnemar"], p["paired_bootstrap"]
  return f"s{p['seed']}: {_pts(b['difference'])} (p {_p(m['p_value'])})"


def markdown(r: dict, workdir: pathlib.Path, *, synthetic_dirs: Mapping[str, Any]) -> str:
  names, target = r["class_names"], r["target_class"]
  real = r["real_data"]
  lines = ["# GAN-enhanced COVID-19 chest X-ray classification: report", ""]
  if not real:
    lines += [SYNTHETIC_DATA_NOTE, ""]
  lines += ["## The answer", ""]
  lines += [f"{i + 1}. {line}" for i, line in enumerate(r["headline"]["lines"])]
  lines += shortcuts.answer_markdown(r)
  test_words = "real test images" if real else "test images (procedural)"
  n_test = sum(r["split_counts"].get("test", {}).values())
  lines += ["", f"Created {r['created']}. Data: {r['data']} at {r['image_size']} px; every model "
            f"is evaluated on the same {n_test} {test_words}. Seeds: {r['seeds']}. "
            f"{r['what_varies']} Synthetic images per translator: num_synthetic = "
            f"{r['num_synthetic']}.", ""]
  if real:
    lines += [CONFOUND, ""]

  lines += ["## Results", "",
            f"Accuracy and macro-F1 in %, {_CI_T}. Per-seed figures with exact (Clopper-Pearson) "
            "intervals follow below.", "",
            f"| training data | init | accuracy | paper | macro-F1 | macro ROC-AUC | {target} "
            f"recall | {target} precision |", "|---|---|---|---|---|---|---|---|"]
  for key, e in r["table"].items():
    row, init = key.split("/")
    paper = "" if e.get("paper") is None else f"{100 * e['paper']:.1f}" + (
        "*" if row.startswith("enhanced-") else "")
    if "skipped" in e:
      lines.append(f"| {row} | {init} | skipped: {e['skipped']} | {paper} | | | | |")
      continue
    pc = e["per_class"][target]
    lines.append(f"| {row} | {init} | {_fmt(e['accuracy'])} | {paper} | {_fmt(e['macro_f1'])} | "
                 f"{_fmt(e['macro_roc_auc'], spread=False)} | {_fmt(pc['recall'], spread=False)}"
                 f" | {_fmt(pc['precision'], spread=False)} |")
  lines += ["", PAPER_NOTE, "",
            "Rows: `original` the training split as it is; `balanced-loss` the same data with a "
            "class-weighted loss (changes only the class prior); `oversampled` the target class "
            "topped up with classical augmented copies of its own training images, as many as "
            "the synthetic images (the prior and the count without a GAN); `enhanced-<translator>` "
            "the training split plus that translator's synthetic images. See docs/experiment.md.",
            ""]

  lines += ["### Per class (mean over seeds, precision / recall / F1, %)", "",
            "| training data | init | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names)]
  for key, e in r["table"].items():
    if "skipped" in e:
      continue
    row, init = key.split("/")
    lines.append(f"| {row} | {init} | " + " | ".join(
        " / ".join(_fmt(e["per_class"][c][m], spread=False) for m in ("precision", "recall", "f1"))
        for c in names) + " |")

  lines += ["", "### Per seed", "",
            "Accuracy and the target class's recall and precision with exact Clopper-Pearson 95 % "
            "intervals; macro-F1 and macro ROC-AUC with percentile-bootstrap 95 % intervals (each "
            "run's metrics.json).", "",
            f"| training data | init | seed | accuracy | {target} recall | {target} precision | "
            "macro-F1 | macro ROC-AUC |", "|---|---|---|---|---|---|---|---|"]
  for key, e in r["table"].items():
    if "skipped" in e:
      continue
    row, init = key.split("/")
    for s in e["per_seed"]:
      lines.append(f"| {row} | {init} | {s['seed']} | " + " | ".join(
          _fmt(s[k]) for k in ("accuracy", "target_recall", "target_precision", "macro_f1",
                               "macro_roc_auc")) + " |")

  lines += shortcuts.section_markdown(r)
  lines += ["", "## Paired tests on the same test images", ""]
  comps = r["comparisons"]
  head = r["headline"]
  if comps:
    n_tests = len(comps)
    lines += [
        f"Difference = accuracy of B minus A in points. Per seed: McNemar p (exact binomial below "
        f"25 discordant images). Pooled: Cochran-Mantel-Haenszel over seeds (the stratified "
        f"McNemar; its conditional exact p below 25 discordant images, else the continuity-"
        f"corrected chi-square), with the mean per-seed difference and its t-interval over "
        f"seeds.", "",
        "| A | B | init | per seed: difference (McNemar p) | pooled: only A / only B right | "
        "pooled p | mean difference [95 % CI] |", "|---|---|---|---|---|---|---|"]
    for c in comps:
      p = c["pooled"]
      ci = p.get("difference_ci")
      ci_text = "" if ci is None else f" [{_diff_ci(ci)}]"
      primary = head.get("answered") and (c["a"], c["b"], c["init"]) == (
          "original", head.get("best_row"), head.get("init"))
      mark = " **(primary)**" if primary else ""
      lines.append(f"| {c['a']} | {c['b']}{mark} | {c['init']} | "
                   + "; ".join(_seed_cell(s) for s in c["per_seed"])
                   + f" | {p['b']} / {p['c']} | {_p(pooled_p(p)[0])} | {_pts(p['difference'])}"
                   f"{ci_text} |")
    n_translators = len({k.split("/")[0] for k in r["table"] if k.startswith("enhanced-")})
    picked = (f"The translator is picked by test accuracy among {n_translators}, which favours "
              f"it (Bonferroni for the pick: p < {ALPHA / n_translators:.2g}). "
              if n_translators > 1 else "")
    lines += ["", f"**Multiplicity.** The primary comparison is the best translator's enhanced "
              f"row against original at the answer's initialisation (marked); it alone is read "
              f"at p < {ALPHA}. {picked}The other {n_tests - 1} comparisons are secondary, "
              f"uncorrected "
              f"(Bonferroni over all {n_tests} would ask p < {ALPHA / n_tests:.2g}), and the "
              f"per-seed p-values are descriptive: the pooled test is the test."]
  else:
    lines.append("No pair of rows finished on the same test images.")

  lines += ["", "## Class counts", "",
            "Training class counts of each row (`num_synthetic` = "
            f"{r['num_synthetic']}), and the splits.", "",
            "| training set | " + " | ".join(names) + f" | total | {target} share |",
            "|---|" + "---|" * (len(names) + 2)]
  for name, counts in r["train_counts"].items():
    lines.append(f"| {name} | {_counts_cells(counts, names, target)} |")
  for split, counts in r["split_counts"].items():
    lines.append(f"| split: {split} | {_counts_cells(counts, names, target)} |")
  nd = r["near_duplicates"]
  if nd:
    lines += ["", f"Near-duplicate train/test pairs (perceptual hash, see the split manifest): "
              f"{nd['pairs']}; " + (f"their test images are dropped ({nd['dropped']} dropped)."
                                    if nd["drop_near_duplicates"] else
                                    "kept in the test split (data.drop_near_duplicates=False).")]

  lines += ["", "## Translation quality", ""]
  quality = r["translation_quality"]
  if quality:
    lines += ["KID (kernel inception distance, unbiased; ± its std over subsets) of the "
              "synthetic images against real target-class images (training images, which the "
              "translator saw, and validation images, which it did not), on pooled features of "
              "a classifier trained on the original data, with the number of real images; "
              "input dependence = mean SSIM to the own source minus to another "
              "source (~0: the output ignores its input); relative diversity = diversity of the "
              "synthetic images over that of real ones; share called target = fraction a "
              "classifier of the original data calls the target class. FID is not shown: at "
              "these sample sizes its bias exceeds the differences it would measure.", "",
              f"| translator | synthetic (sources) | KID vs training {target} (n; seen) | KID vs "
              f"validation {target} (n; seen) | input dependence | relative diversity | share "
              f"called {target} |", "|---|---|---|---|---|---|---|"]
    for tag, q in quality.items():
      kids = []
      for split in ("train", "val"):
        k = q["kid"].get(split)
        if k is None:
          kids.append("n/a")
          continue
        seen = "seen" if k["seen_by_translator"] else "not seen"
        value = "n/a" if k["mean"] is None else (
            f"{k['mean']:.4g}" + ("" if k["std"] is None else f" ± {k['std']:.2g}"))
        kids.append(f"{value} ({k['n_real'] if k['n_real'] is not None else '?'}; {seen})")
      num = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
      share = "n/a" if q["target_share"] is None else f"{100 * q['target_share']:.1f} %"
      lines.append(f"| {tag} | {q['num_synthetic']} ({q['num_sources']}) | {kids[0]} | "
                   f"{kids[1]} | {num(q['input_dependence'])} | {num(q['relative_diversity'])} "
                   f"| {share} |")
  else:
    lines.append("No translator ran.")

  lines += ["", "## Figures", ""]
  grid_cells = []
  for tag, d in synthetic_dirs.items():
    grid_png = pathlib.Path(d) / "grid.png"
    samples = sorted((workdir / "translators" / tag / "samples").glob("*.png"))
    curves = workdir / "translators" / tag / "training_curves.png"
    grid_cells.append((tag, os.path.relpath(grid_png, workdir) if grid_png.is_file() else None,
                       os.path.relpath(samples[-1], workdir) if samples else None,
                       os.path.relpath(curves, workdir) if curves.is_file() else None))
  if grid_cells:
    lines += ["| translator | training normal -> synthetic | last training samples | training "
              "curves |", "|---|---|---|---|"]
    lines += [f"| {t} | {_img(g, 320)} | {_img(s, 320)} | {_img(c, 320)} |"
              for t, g, s, c in grid_cells]
    lines.append("")
  ran_inits = [i for i in INITS if any(k.endswith("/" + i) and "skipped" not in e
                                       for k, e in r["table"].items())]
  if ran_inits:
    lines += ["Confusion matrices and ROC curves of each row's first seed.", "",
              "| training data | " + " | ".join(f"{i}: confusion | {i}: ROC" for i in ran_inits)
              + " |", "|---|" + "---|---|" * len(ran_inits)]
    row_names = list(dict.fromkeys(k.split("/")[0] for k in r["table"]))
    for row in row_names:
      cells = []
      for init in ran_inits:
        figs = r["table"][f"{row}/{init}"].get("figures", {})
        cells += [_img(figs.get("confusion_matrix.png"), 220),
                  _img(figs.get("roc_curves.png"), 220)]
      lines.append(f"| {row} | " + " | ".join(cells) + " |")
  if r["skipped"]:
    lines += ["", "## Skipped", ""] + [f"- {k}: {v}" for k, v in r["skipped"].items()]
  if r["stage_seconds"]:
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in r["stage_seconds"].items()]
  lines += ["", "## Software and devices", ""]
  lines += [f"- {k}: {v}" for k, v in r["software"].items()]
  return "\n".join(lines) + "\n"


def write_csv(path: pathlib.Path, table: dict, class_names: Sequence[str], target: str) -> None:
  """One line per row, init, seed ('mean' for the mean over seeds), class and metric."""
  out = []
  for key, e in table.items():
    if "skipped" in e:
      continue
    data, init = key.split("/")
    paper = e.get("paper")
    items = [("all", "accuracy", e["accuracy"]), ("all", "macro_f1", e["macro_f1"]),
             ("all", "macro_roc_auc", e["macro_roc_auc"])]
    items += [(c, m, e["per_class"][c][m]) for c in class_names
              for m in ("precision", "recall", "f1")]
    for cls, metric, agg in items:
      ci = agg.get("ci") or (None, None)
      out.append([data, init, "mean", cls, metric, agg.get("mean"), agg.get("std"), ci[0], ci[1],
                  "t-interval over seeds", agg.get("n"), paper if metric == "accuracy" else ""])
    for s in e["per_seed"]:
      for metric in ("accuracy", "macro_f1", "macro_roc_auc", "target_recall",
                     "target_precision"):
        v = s[metric]
        out.append([data, init, s["seed"], target if metric.startswith("target") else "all",
                    metric.replace("target_", ""), v.get("value"), "", v["ci"][0], v["ci"][1],
                    v.get("ci_method", ""), 1, paper if metric == "accuracy" else ""])
  files.write_csv_atomic(path, ["training_data", "init", "seed", "class", "metric", "value", "std",
                                "ci_low", "ci_high", "ci_method", "n_seeds", "paper"], out)
