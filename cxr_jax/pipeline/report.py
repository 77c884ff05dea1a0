"""The experiment's report: `report.md`, and the same numbers in `report.json` and `report.csv`.

The numbers come from `results.collect` (plain data read from the run tree, so the report can be
rebuilt without training); this module renders them. `report.md` is the concatenation of
`SECTIONS`, one function per section, each `(result, workdir) -> list of lines`: it opens with
the answer to the declared primary comparison (did GAN enhancement help, by how much, with the
test image as the unit), then the table with the paper's figures beside the rows they belong to,
the spread, the paired tests, calibration, class counts, translation quality and figures.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cxr_jax import workdir as workdir_lib
from cxr_jax.evaluation import plots
from cxr_jax.evaluation import subgroups as subgroups_lib
from cxr_jax.pipeline import results
from cxr_jax.pipeline import shortcuts
from cxr_jax.pipeline.results import ALPHA, INITS, PAPER, SplitRun, run_dir, split_root  # noqa: F401
from cxr_jax.utils import files

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
CALIBRATION_DIR = "calibration"

Section = Callable[[dict, pathlib.Path], list]


# ------------------------------------------------------------------------------- formatting


def _fmt(agg: dict[str, Any] | None, spread: bool = True) -> str:
  """'mean ± std [ci]' in %, or just the mean; undefined values (e.g. the precision of a class
  never predicted) as 'n/a'."""
  if agg is None:
    return "n/a"
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
  """A difference of two accuracies lies in [-1, 1]: its interval is shown clipped to that
  range, an unbounded end (too few images to bound it) as -100 / +100 (report.json: null)."""
  lo, hi = (-1.0 if ci[0] is None else ci[0]), (1.0 if ci[1] is None else ci[1])
  lo, hi = (min(max(v, -1.0), 1.0) for v in (lo, hi))
  return f"{_pts(lo)}, {_pts(hi)}"


def _p(p: float | None) -> str:
  return "n/a" if p is None else f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _img(path: str | None, width: int = 240) -> str:
  return "" if not path else f'<img src="{path}" width="{width}">'


def _counts_cells(counts: Mapping[str, int], names: Sequence[str], target: str) -> str:
  total = sum(counts.values())
  share = counts.get(target, 0) / total if total else math.nan
  return (" | ".join(str(counts.get(c, 0)) for c in names)
          + f" | {total} | {100 * share:.1f} %")


def _ran(r: dict) -> list[tuple[str, str, dict]]:
  return [(*key.split("/"), e) for key, e in r["table"].items() if "skipped" not in e]


# ------------------------------------------------------------------------------- the answer


def headline_lines(r: dict) -> list[str]:
  """The answer in three lines: the primary comparison, the other rows, the controls."""
  head, comps = r["headline"], r["comparisons"]
  a, b = head["primary_comparison"]
  if not head.get("answered"):
    return [f"**No answer:** the primary comparison ({b} against {a}, "
            f"config.primary_comparison) has no initialisation where both rows finished on the "
            "same test images, so it cannot be judged."]
  init = head["init"]
  ci = head["difference_ci"]
  units = f"{head['n_images']} test images"
  if head["n_splits"] > 1:
    units += f" of {head['n_splits']} splits"
  mdd = ("n/a (no image differs)" if head["mdd"] is None else
         f"{100 * head['mdd']:.1f} points")
  question = ("Did enhancement help?" if a == "original" and b.startswith("enhanced-")
              else "Primary comparison:")
  line1 = (f"**{question}** {head['verdict'].capitalize()}: {b} {100 * head['accuracy_b']:.1f} % "
           f"against {a} {100 * head['accuracy_a']:.1f} % ({init}), a difference of "
           f"{_pts(head['difference'])} points [95 % CI {_diff_ci(ci)}], p = "
           f"{_p(head['p_value'])}: paired sign-flip test with the test image as the unit "
           f"({units}, each image's correctness averaged over {head['n_seeds']} seed(s)); the "
           f"interval inverts the same test. The comparison was fixed before the run "
           f"(config.primary_comparison). At this size and spread the test detects a difference "
           f"of {mdd} with {100 * head['power']:.0f} % power.")
  others = []
  for o in head.get("other_rows", []):
    c = results.find(comps, a, o["row"], init)
    extra = "" if c is None else (f" ({o['row']} minus {a}: {_pts(c['image_level']['difference'])}"
                                  f" points, Holm p = {_p(c.get('p_holm'))})")
    others.append(f"{o['row']} {100 * o['accuracy']:.1f} %{extra}")
  line2 = (f"**The other rows** ({init}; secondary, Holm-corrected over every secondary "
           f"comparison; no row was chosen by test accuracy): "
           + ("; ".join(others) if others else "none ran") + ".")
  parts = [f"{c['control']} {100 * c['accuracy']:.1f} % ({b} minus {c['control']}: "
           f"{_pts(c['difference'])} points, Holm p = {_p(c['p_holm'])})"
           for c in head.get("controls", [])]
  if parts:
    beaten = all(c["beats"] for c in head["controls"])
    summary = (f"{b} beats every control" if beaten else
               f"{b} does not beat " + " or ".join(c["control"] for c in head["controls"]
                                                    if not c["beats"])
               + ", so a gain (if any) is not shown to come from the synthetic images")
    line3 = f"**Against the controls:** {'; '.join(parts)}: {summary}."
  else:
    line3 = "**Against the controls:** no control comparison with the primary row finished."
  return [line1, line2, line3]


def section_answer(r: dict, workdir: pathlib.Path) -> list[str]:
  lines = ["# GAN-enhanced COVID-19 chest X-ray classification: report", ""]
  if not r["real_data"]:
    lines += [SYNTHETIC_DATA_NOTE, ""]
  lines += ["## The answer", ""]
  lines += [f"{i + 1}. {line}" for i, line in enumerate(r["headline"]["lines"])]
  lines += shortcuts.answer_markdown(r)
  test_words = "real test images" if r["real_data"] else "test images (procedural)"
  n_test = sum(r["split_counts"].get("test", {}).values())
  n_splits = len(r["splits"])
  split_words = (f"the same {n_test} {test_words}" if n_splits == 1 else
                 f"its split's {n_test} {test_words} (split 0; {n_splits} splits, seeds "
                 f"{[s['split_seed'] for s in r['splits']]})")
  lines += ["", f"Created {r['created']}. Data: {r['data']} at {r['image_size']} px; every model "
            f"is evaluated on {split_words}. Seeds: {r['seeds']}. {r['what_varies']} Synthetic "
            f"images per translator: num_synthetic = {r['num_synthetic']}.", ""]
  if r["real_data"]:
    lines += [CONFOUND, ""]
  return lines


# ------------------------------------------------------------------------------- the tables


def section_results(r: dict, workdir: pathlib.Path) -> list[str]:
  target = r["target_class"]
  lines = ["## Results", "",
           f"Accuracy and macro-F1 in %, {results.CI_OVER_RUNS}. Every row of one initialisation "
           "trains the same number of optimizer steps (column steps: the budget of the original "
           "training split), so a larger training set sees fewer epochs. Per-run figures with "
           "exact (Clopper-Pearson) intervals follow below.", "",
           f"| training data | init | steps | accuracy | paper | macro-F1 | macro ROC-AUC | "
           f"{target} sensitivity | {target} specificity | {target} precision |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for key, e in r["table"].items():
    row, init = key.split("/")
    paper = "" if e.get("paper") is None else f"{100 * e['paper']:.1f}" + (
        "*" if row.startswith("enhanced-") else "")
    if "skipped" in e:
      lines.append(f"| {row} | {init} | | skipped: {e['skipped']} | {paper} | | | | | |")
      continue
    pc = e["per_class"][target]
    lines.append(f"| {row} | {init} | {e.get('train_steps', 'n/a')} | {_fmt(e['accuracy'])} | "
                 f"{paper} | {_fmt(e['macro_f1'])} | {_fmt(e['macro_roc_auc'], spread=False)} | "
                 f"{_fmt(e.get('target_sensitivity'), spread=False)} | "
                 f"{_fmt(e.get('target_specificity'), spread=False)} | "
                 f"{_fmt(pc['precision'], spread=False)} |")
  lines += ["", PAPER_NOTE, "",
            "Rows: `original` the training split as it is; `balanced-loss` the same data with a "
            "class-weighted loss (changes only the class prior); `oversampled` the target class "
            "topped up with classical augmented copies of its own training images, as many as "
            "the synthetic images (the prior and the count without a GAN); `enhanced-<translator>` "
            "the training split plus that translator's synthetic images; `lungs-hidden` the "
            "original row with the central box of every training and test image blacked out "
            "(what needs no lung pixels). Sensitivity and specificity at the argmax rule. See "
            "docs/experiment.md and docs/shortcuts.md.", ""]
  return lines


def section_spread(r: dict, workdir: pathlib.Path) -> list[str]:
  """The accuracy's spread between seeds (training runs on one split) and between splits."""
  lines = ["### Spread of the accuracy", "",
           "Between seeds: the std over seeds within a split, averaged over splits; between "
           "splits: the std over splits of each split's mean (in points; n/a with one seed or "
           "one split).", "",
           "| training data | init | runs | between seeds | between splits |", "|---|---|---|---|---|"]
  for row, init, e in _ran(r):
    s = e["accuracy_spread"]
    cell = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines.append(f"| {row} | {init} | {s['n_runs']} | {cell(s['between_seeds'])} | "
                 f"{cell(s['between_splits'])} |")
  return lines + [""]


def section_per_class(r: dict, workdir: pathlib.Path) -> list[str]:
  names = r["class_names"]
  lines = ["### Per class (mean over runs, precision / recall / F1, %)", "",
           "| training data | init | " + " | ".join(names) + " |",
           "|---|---|" + "---|" * len(names)]
  for row, init, e in _ran(r):
    lines.append(f"| {row} | {init} | " + " | ".join(
        " / ".join(_fmt(e["per_class"][c][m], spread=False) for m in ("precision", "recall", "f1"))
        for c in names) + " |")
  return lines + [""]


def section_per_run(r: dict, workdir: pathlib.Path) -> list[str]:
  target = r["target_class"]
  lines = ["### Per run", "",
           "Accuracy and the target class's recall and precision with exact Clopper-Pearson 95 % "
           "intervals; macro-F1 and macro ROC-AUC with percentile-bootstrap 95 % intervals (each "
           "run's metrics.json).", "",
           f"| training data | init | split | seed | steps | accuracy | {target} recall | "
           f"{target} precision | macro-F1 | macro ROC-AUC |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for row, init, e in _ran(r):
    for s in e["per_seed"]:
      lines.append(f"| {row} | {init} | {s['split']} | {s['seed']} | {s['train_steps']} | "
                   + " | ".join(_fmt(s[k]) for k in ("accuracy", "target_recall",
                                                     "target_precision", "macro_f1",
                                                     "macro_roc_auc")) + " |")
  return lines + [""]


def _run_cell(s: dict) -> str:
  tag = f"s{s['seed']}" if s["split"] == 0 else f"k{s['split']}s{s['seed']}"
  return f"{tag}: {_pts(s['difference'])} (p {_p(s['mcnemar']['p_value'])})"


def section_reading_lungs(r: dict, workdir: pathlib.Path) -> list[str]:
  lines = shortcuts.section_markdown(r)
  return lines + [""] if lines and lines[-1] else lines


def section_paired_tests(r: dict, workdir: pathlib.Path) -> list[str]:
  lines = ["## Paired tests on the same test images", ""]
  comps = r["comparisons"]
  if not comps:
    return lines + ["No pair of rows finished on the same test images.", ""]
  head = r["headline"]
  a, b = r["primary_comparison"]
  lines += [
      "Unit = the test image (within its split). Per image, its correctness averaged over the "
      "seeds where both rows finished, under row B minus under row A; the difference is the "
      "mean over images (in points), p the paired sign-flip permutation test of it (exact below "
      f"15 images, else {results.N_FLIPS} seeded flips), the 95 % interval the shifts that "
      "test does not reject (so it excludes 0 exactly when p < 0.05), MDD the smallest "
      f"difference it detects with {100 * results.POWER:.0f} % power at this size and spread. "
      "Per run: the accuracy difference and McNemar's p; the pooled Cochran-Mantel-Haenszel p "
      "counts every image once per run although the runs score the same images, so it and the "
      "per-run p are descriptive only.", "",
      "| A | B | init | difference [95 % CI] | p | Holm p | MDD | per run: difference (McNemar p) "
      "| pooled CMH p (detail) |", "|---|---|---|---|---|---|---|---|---|"]
  for c in comps:
    t = c["image_level"]
    mark = " **(primary)**" if c["primary"] else ""
    mdd = "n/a" if t["mdd"] is None else f"{100 * t['mdd']:.1f}"
    cmh = c["pooled_cmh"]
    cmh_p = cmh["exact_p_value"] if cmh["b"] + cmh["c"] < 25 else cmh["p_value"]
    lines.append(f"| {c['a']} | {c['b']}{mark} | {c['init']} | {_pts(t['difference'])} "
                 f"[{_diff_ci(t['ci'])}] | {_p(t['p_value'])} | "
                 f"{'primary' if c['primary'] else _p(c.get('p_holm'))} | {mdd} | "
                 + "; ".join(_run_cell(s) for s in c["per_seed"]) + f" | {_p(cmh_p)} |")
  n_secondary = sum(not c["primary"] for c in comps)
  primary_words = (f"{b} against {a} at {head['init']}" if head.get("answered") else
                   f"{b} against {a}")
  lines += ["", f"**Multiplicity.** The primary comparison ({primary_words}, marked; "
            f"config.primary_comparison, declared before the run) alone answers the question, "
            f"read at p < {ALPHA}. The other {n_secondary} comparisons are secondary: their "
            f"p-values are Holm-corrected over those {n_secondary} (column Holm p, read at "
            f"p < {ALPHA}).", ""]
  return lines


def section_calibration(r: dict, workdir: pathlib.Path) -> list[str]:
  target = r["target_class"]
  lines = ["## Calibration", "",
           f"Expected calibration error (top-class confidence, {results.CALIBRATION_BINS} "
           "equal-width bins) and multi-class Brier score, mean ± std over runs (lower is "
           f"better); {target} sensitivity and specificity at the argmax rule (%, mean over "
           "runs). The reliability diagrams (pooled over a row's runs) are among the figures.",
           "", f"| training data | init | ECE | Brier | {target} sensitivity | {target} "
           "specificity |", "|---|---|---|---|---|---|"]
  num = lambda agg: "n/a" if agg is None or agg.get("mean") is None else (  # noqa: E731
      f"{agg['mean']:.3f}" + ("" if agg.get("std") is None else f" ± {agg['std']:.3f}"))
  for row, init, e in _ran(r):
    cal = e.get("calibration") or {}
    lines.append(f"| {row} | {init} | {num(cal.get('ece'))} | {num(cal.get('brier'))} | "
                 f"{_fmt(e.get('target_sensitivity'), spread=False)} | "
                 f"{_fmt(e.get('target_specificity'), spread=False)} |")
  return lines + [""]


def section_subgroups(r: dict, workdir: pathlib.Path) -> list[str]:
  sub = r.get("subgroups")
  if not sub:
    return []
  return subgroups_lib.compare_markdown(sub["tables"]).splitlines() + [
      "", "One run per row (split 0's first seed); the rows score the same test images, so "
      "compare them with the paired tests above, not by their intervals.", ""]


def section_class_counts(r: dict, workdir: pathlib.Path) -> list[str]:
  names, target = r["class_names"], r["target_class"]
  lines = ["## Class counts", "",
           f"Training class counts of each row (`num_synthetic` = {r['num_synthetic']}), and the "
           "splits" + (" (split 0)." if len(r["splits"]) > 1 else "."), "",
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
  return lines + [""]


def section_quality(r: dict, workdir: pathlib.Path) -> list[str]:
  target = r["target_class"]
  lines = ["## Translation quality", ""]
  quality = r["translation_quality"]
  if not quality:
    return lines + ["No translator ran.", ""]
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
  return lines + [""]


def section_figures(r: dict, workdir: pathlib.Path) -> list[str]:
  lines = ["## Figures", ""]
  grid_cells = []
  for tag, dirs in r["translator_dirs"].items():
    grid_png = workdir / dirs["synthetic"] / "grid.png"
    samples = sorted((workdir / dirs["translator"] / "samples").glob("*.png"))
    curves = workdir / dirs["translator"] / "training_curves.png"
    rel = lambda p: os.path.relpath(p, workdir)  # noqa: E731
    grid_cells.append((tag, rel(grid_png) if grid_png.is_file() else None,
                       rel(samples[-1]) if samples else None,
                       rel(curves) if curves.is_file() else None))
  if grid_cells:
    lines += ["| translator | training normal -> synthetic | last training samples | training "
              "curves |", "|---|---|---|---|"]
    lines += [f"| {t} | {_img(g, 320)} | {_img(s, 320)} | {_img(c, 320)} |"
              for t, g, s, c in grid_cells]
    lines.append("")
  ran_inits = [i for i in INITS if any(init == i for _, init, _ in _ran(r))]
  if ran_inits:
    lines += ["Confusion matrices and ROC curves of each row's first run; reliability diagrams "
              "pooled over its runs.", "",
              "| training data | " + " | ".join(f"{i}: confusion | {i}: ROC | {i}: reliability"
                                                for i in ran_inits)
              + " |", "|---|" + "---|---|---|" * len(ran_inits)]
    row_names = list(dict.fromkeys(k.split("/")[0] for k in r["table"]))
    for row in row_names:
      cells = []
      for init in ran_inits:
        figs = r["table"][f"{row}/{init}"].get("figures", {})
        cells += [_img(figs.get("confusion_matrix.png"), 220),
                  _img(figs.get("roc_curves.png"), 220), _img(figs.get("reliability.png"), 220)]
      lines.append(f"| {row} | " + " | ".join(cells) + " |")
  return lines + [""]


def section_appendix(r: dict, workdir: pathlib.Path) -> list[str]:
  lines = []
  if r["skipped"]:
    lines += ["## Skipped", ""] + [f"- {k}: {v}" for k, v in r["skipped"].items()] + [""]
  if r["stage_seconds"]:
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in r["stage_seconds"].items()] + [""]
  lines += ["## Software and devices", ""]
  return lines + [f"- {k}: {v}" for k, v in r["software"].items()]


SECTIONS: tuple[Section, ...] = (
    section_answer, section_results, section_spread, section_per_class, section_per_run,
    section_reading_lungs, section_paired_tests, section_calibration, section_subgroups,
    section_class_counts, section_quality,
    section_figures, section_appendix)


def markdown(r: dict, workdir: pathlib.Path,
             sections: Sequence[Section] = SECTIONS) -> str:
  lines = []
  for section in sections:
    lines += section(r, pathlib.Path(workdir))
  while lines and lines[-1] == "":
    lines.pop()
  return "\n".join(lines) + "\n"


def write_csv(path: pathlib.Path, table: dict, class_names: Sequence[str], target: str) -> None:
  """One line per row, init, run ('mean' for the mean over runs), class and metric."""
  out = []
  for key, e in table.items():
    if "skipped" in e:
      continue
    data, init = key.split("/")
    paper = e.get("paper")
    items = [("all", "accuracy", e["accuracy"]), ("all", "macro_f1", e["macro_f1"]),
             ("all", "macro_roc_auc", e["macro_roc_auc"]),
             (target, "sensitivity", e["target_sensitivity"]),
             (target, "specificity", e["target_specificity"])]
    if e.get("calibration"):
      items += [("all", "ece", e["calibration"]["ece"]),
                ("all", "brier", e["calibration"]["brier"])]
    items += [(c, m, e["per_class"][c][m]) for c in class_names
              for m in ("precision", "recall", "f1")]
    for cls, metric, agg in items:
      ci = agg.get("ci") or (None, None)
      out.append([data, init, "all", "mean", cls, metric, agg.get("mean"), agg.get("std"),
                  ci[0], ci[1], "t-interval over runs", agg.get("n"), e.get("train_steps"),
                  paper if metric == "accuracy" else ""])
    for s in e["per_seed"]:
      for metric in ("accuracy", "macro_f1", "macro_roc_auc", "target_recall",
                     "target_precision"):
        v = s[metric]
        out.append([data, init, s["split"], s["seed"],
                    target if metric.startswith("target") else "all",
                    metric.replace("target_", ""), v.get("value"), "", v["ci"][0], v["ci"][1],
                    v.get("ci_method", ""), 1, s["train_steps"],
                    paper if metric == "accuracy" else ""])
  files.write_csv_atomic(path, ["training_data", "init", "split", "seed", "class", "metric",
                                "value", "std", "ci_low", "ci_high", "ci_method", "n_runs",
                                "train_steps", "paper"], out)


def reliability_figures(r: dict, workdir: pathlib.Path) -> None:
  """A reliability diagram per row and initialisation, `calibration/<row>-<init>.png`, its
  path added to the row's figures."""
  out = workdir / CALIBRATION_DIR
  for row, init, e in _ran(r):
    cal = e.get("calibration")
    if not cal:
      continue
    path = out / f"{row}-{init}.png"
    if workdir_lib.is_writer():
      out.mkdir(parents=True, exist_ok=True)
      plots.reliability_png(path, cal["pooled_bins"], title=f"{row} ({init})",
                            ece=cal["pooled_ece"])
    e.setdefault("figures", {})["reliability.png"] = os.path.relpath(path, workdir)


def _finite(obj: Any) -> Any:
  """Strict JSON: NaN / inf (an undefined metric, an unbounded interval) become null."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  if isinstance(obj, pathlib.Path):
    return str(obj)
  return obj


def write_report(workdir: str | os.PathLike, config, *, rows: Sequence[str],
                 class_names: Sequence[str], splits: Sequence[SplitRun],
                 skipped: Mapping[str, str],
                 stage_seconds: Mapping[str, float] | None = None) -> dict:
  """Builds the report from the run tree under `workdir` (`results.collect`), writes report.json
  / .md / .csv and the reliability diagrams; returns the table's accuracies and the headline."""
  workdir = pathlib.Path(workdir)
  r = _finite(results.collect(workdir, config, rows=rows, class_names=class_names,
                              splits=splits, skipped=skipped, stage_seconds=stage_seconds))
  r["headline"]["lines"] = headline_lines(r)
  reliability_figures(r, workdir)
  if workdir_lib.is_writer():
    files.write_text_atomic(workdir / "report.json",
                            json.dumps(r, indent=2, default=str, allow_nan=False))
    files.write_text_atomic(workdir / "report.md", markdown(r, workdir))
    write_csv(workdir / "report.csv", r["table"], r["class_names"], r["target_class"])
  return {"table": {k: v.get("accuracy", v) for k, v in r["table"].items()},
          "headline": r["headline"]}
