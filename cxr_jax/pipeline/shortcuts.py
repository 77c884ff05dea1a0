"""Is the classifier reading the lungs? The report's three figures on it (docs/shortcuts.md).

- **Lungs hidden**: the `lungs-hidden` row (the original row's data and recipe with the central
  box of every image blacked out) beside chance (the majority class's share of the test set) and
  the original row: how many of the original row's points above chance need no lung pixels.
- **External test set**: every row's classifiers on radiographs from elsewhere
  (`config.external_test_dir`): in-distribution against external accuracy, per-class recall, and
  how the external images of each class were called.
- **Saliency on the lungs**: per row, the mean share of Grad-CAM mass inside the central box of
  the test images (`gradcam_center_share` of each run's metrics.json).

`numbers` returns plain data (read from the run directory tree, as the rest of the report is);
`answer_markdown` and `section_markdown` turn it into the report's lines.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cxr_jax.evaluation import stats
from cxr_jax.pipeline import classify

LUNGS_HIDDEN = "lungs-hidden"
INITS = ("scratch", "transfer")
# "Far" in the report's wording: the lungs-hidden row this many points above chance, or the
# external accuracy this many points below the in-distribution one, and beyond the exact 95 %
# intervals of every seed (a few test images cannot make a shortcut).
FAR = 0.10


# (row, init) -> the folders of that row's finished runs, over splits and seeds.
RunDirs = Callable[[str, str], Sequence[pathlib.Path]]


def _read(path: pathlib.Path) -> dict:
  return json.loads(path.read_text()) if path.is_file() else {}


def _ci_bound(per_seed: Sequence[dict], side: int) -> float | None:
  """The lowest lower (side 0) or highest upper (side 1) exact interval bound over seeds."""
  bounds = [s["accuracy"]["ci"][side] for s in per_seed
            if s.get("accuracy", {}).get("ci") and s["accuracy"]["ci"][side] is not None]
  if not bounds:
    return None
  return min(bounds) if side == 0 else max(bounds)


def _mean(values: Sequence[float | None]) -> dict[str, Any] | None:
  values = [v for v in values if v is not None]
  return stats.mean_std_ci(values) if values else None


def gradcam_share(run_dirs: RunDirs, row: str, init: str) -> dict[str, Any] | None:
  """Mean over runs of each run's mean Grad-CAM share inside the central box, with the box's
  fraction, the share of an even spread, and the test images with a map (`n_images`) and without
  (`n_flat`: no mass, e.g. a 1 x 1 feature map) of the first run; None when no run measured it.
  `mean` is None when every map was flat."""
  per_seed = [_read(d / "metrics.json").get("gradcam_center_share") for d in run_dirs(row, init)]
  per_seed = [p for p in per_seed if p]
  if not per_seed:
    return None
  means = [p["mean"] for p in per_seed if p["mean"] is not None]
  return dict(_mean(means) or {"mean": None}, fraction=per_seed[0]["fraction"],
              uniform=per_seed[0]["uniform"], n_images=per_seed[0]["n"],
              n_flat=per_seed[0]["n_flat"], feature_map=per_seed[0].get("feature_map"),
              note=per_seed[0].get("note"))


def lungs_hidden(table: Mapping[str, dict], split_counts: Mapping[str, Mapping[str, int]],
                 fraction: float) -> dict[str, Any] | None:
  """The lungs-hidden row against chance and the original row, per initialisation where both
  ran; None when the row is not part of the run."""
  test = dict(split_counts.get("test", {}))
  total = sum(test.values())
  if not total or not any(k.startswith(LUNGS_HIDDEN + "/") for k in table):
    return None
  majority = max(test, key=test.get)
  chance = test[majority] / total
  out: dict[str, Any] = {"fraction": fraction, "chance": chance, "majority_class": majority,
                         "n_test": total, "by_init": {}}
  for init in INITS:
    orig, hidden = table.get(f"original/{init}", {}), table.get(f"{LUNGS_HIDDEN}/{init}", {})
    if "accuracy" not in orig or "accuracy" not in hidden:
      continue
    a_orig, a_hidden = orig["accuracy"]["mean"], hidden["accuracy"]["mean"]
    above = a_orig - chance
    lower = _ci_bound(hidden.get("per_seed", []), 0)
    no_lungs = min(max(a_hidden - chance, 0.0), max(above, 0.0))
    out["by_init"][init] = {
        "original": a_orig, "lungs_hidden": a_hidden,
        "lungs_hidden_per_seed": [s["accuracy"] for s in hidden.get("per_seed", [])],
        "points_above_chance": 100 * above, "points_without_lungs": 100 * no_lungs,
        "far_above_chance": bool(a_hidden - chance >= FAR
                                 and (lower is None or lower > chance))}
  return out


def external(run_dirs: RunDirs, summary_dir: pathlib.Path, table: Mapping[str, dict],
             rows: Sequence[str], class_names: Sequence[str]) -> dict[str, Any] | None:
  """Every row's external figures (mean over runs) beside its in-distribution accuracy; None
  when the run has no external set (its summary in `summary_dir`)."""
  summary = _read(pathlib.Path(summary_dir) / classify.EXTERNAL_SET)
  if not summary:
    return None
  out: dict[str, Any] = {"set": summary, "rows": {}}
  for row in rows:
    for init in INITS:
      runs = [_read(d / "external_metrics.json") for d in run_dirs(row, init)]
      runs = [r for r in runs if r]
      if not runs:
        continue
      entry = table.get(f"{row}/{init}", {})
      in_dist = entry.get("accuracy", {}).get("mean")
      acc = _mean([r["accuracy"]["value"] for r in runs])
      in_lower, ext_upper = _ci_bound(entry.get("per_seed", []), 0), _ci_bound(runs, 1)
      present = [c for c in class_names if runs[0]["per_class"][c]["n"]]
      out["rows"][f"{row}/{init}"] = {
          "row": row, "init": init, "seeds": len(runs), "n": runs[0]["n"],
          "in_distribution_accuracy": in_dist, "external_accuracy": acc,
          "external_accuracy_per_seed": [r["accuracy"] for r in runs],
          "recall": {c: _mean([r["per_class"][c]["recall"]["value"] for r in runs])["mean"]
                     for c in present},
          "called": {c: {p: float(np.mean([r["called"][c][p] for r in runs]))
                         for p in class_names} for c in present},
          "far_below": bool(in_dist is not None and in_dist - acc["mean"] >= FAR
                            and (None in (in_lower, ext_upper) or ext_upper < in_lower))}
  return out


def numbers(summary_dir: str | pathlib.Path, config, table: dict[str, dict],
            rows: Sequence[str], split_counts: Mapping[str, Mapping[str, int]],
            class_names: Sequence[str], *, run_dirs: RunDirs) -> dict[str, Any]:
  """report.json's `lungs_hidden`, `external` and `reading_lungs` entries, read from the runs'
  folders (`run_dirs`) and the external set's summary in `summary_dir`; also puts each row's
  `gradcam_center_share` into its `table` entry. `split_counts`: the test set whose majority
  class is chance."""
  for key, entry in table.items():
    if "skipped" not in entry:
      row, init = key.split("/")
      entry["gradcam_center_share"] = gradcam_share(run_dirs, row, init)
  hidden = lungs_hidden(table, split_counts, float(config.get("lungs_hidden", 0.0)))
  ext = external(run_dirs, pathlib.Path(summary_dir), table, rows, class_names)
  return {"lungs_hidden": hidden, "external": ext,
          "reading_lungs": reading(hidden, ext)}


def reading(hidden: dict | None, ext: dict | None) -> dict[str, Any]:
  """The answer's line on what the accuracy measures, from the two figures that can show it."""
  far_hidden = [i for i, v in (hidden or {}).get("by_init", {}).items() if v["far_above_chance"]]
  far_ext = [k for k, v in (ext or {}).get("rows", {}).items() if v["far_below"]]
  parts = []
  if far_hidden:
    i = far_hidden[0]
    v = hidden["by_init"][i]
    parts.append(f"with the central {100 * hidden['fraction']:.0f} % of every image blacked out "
                 f"the classifier still scores {100 * v['lungs_hidden']:.1f} % ({i}; chance "
                 f"{100 * hidden['chance']:.1f} %): {v['points_without_lungs']:.1f} of the "
                 f"{v['points_above_chance']:.1f} points the original row gains above chance need "
                 "no lung pixels")
  if far_ext:
    k = far_ext[0]
    v = ext["rows"][k]
    parts.append(f"on the external set {k.replace('/', ' (')}) scores "
                 f"{100 * v['external_accuracy']['mean']:.1f} % against "
                 f"{100 * v['in_distribution_accuracy']:.1f} % in distribution"
                 + (f" ({len(far_ext)} of {len(ext['rows'])} row(s) lose "
                    f"{100 * FAR:.0f} points or more)" if len(ext["rows"]) > 1 else ""))
  if parts:
    line = ("**Does the accuracy measure lung findings?** Not only: " + "; ".join(parts)
            + ". The accuracy measures more than lung findings (source, age, acquisition); read "
            "every comparison above with that in mind (docs/shortcuts.md).")
    return {"measures_more_than_lungs": True, "lines": [line]}
  if hidden is None and ext is None:
    return {"measures_more_than_lungs": None, "lines": []}
  seen = []
  if hidden is not None and hidden["by_init"]:
    if not any(v["points_above_chance"] >= 100 * FAR for v in hidden["by_init"].values()):
      return {"measures_more_than_lungs": None, "lines": [
          f"**Does the accuracy measure lung findings?** Not measurable here: the original row is "
          f"not {100 * FAR:.0f} points above chance, so the lungs-hidden row has nothing to "
          "explain."]}
    seen.append("the lungs-hidden row is not clearly above chance")
  if ext is not None and ext["rows"]:
    seen.append("external accuracy is not clearly below the in-distribution accuracy")
  if not seen:
    return {"measures_more_than_lungs": None, "lines": []}
  line = ("**Does the accuracy measure lung findings?** No sign of a shortcut here: "
          + " and ".join(seen) + f" (clearly: by {100 * FAR:.0f} points or more and beyond the "
          "exact 95 % intervals). A box is not a lung mask and one external set is not every "
          "hospital (docs/shortcuts.md).")
  return {"measures_more_than_lungs": False, "lines": [line]}


# ------------------------------------------------------------------------------- the words


def _pct(x: float | None) -> str:
  return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.1f} %"


def answer_markdown(r: Mapping[str, Any]) -> list[str]:
  """The answer's line on shortcuts (after the answer's numbered lines), or nothing."""
  lines = (r.get("reading_lungs") or {}).get("lines", [])
  return ["", *lines] if lines else []


def section_markdown(r: Mapping[str, Any]) -> list[str]:
  """The report's section 'Is the classifier reading the lungs?'."""
  hidden, ext = r.get("lungs_hidden"), r.get("external")
  shares = {k: e["gradcam_center_share"] for k, e in r["table"].items()
            if e.get("gradcam_center_share")}
  if not hidden and not ext and not shares:
    return []
  lines = ["", "## Is the classifier reading the lungs?", "",
           "Three figures that accuracy alone does not give (docs/shortcuts.md explains them and "
           "their limits: a box is not a lung mask, an external set has its own shift)."]
  if hidden:
    f = 100 * hidden["fraction"]
    lines += ["", f"**Lungs hidden.** The `{LUNGS_HIDDEN}` row is the original row's data and "
              f"recipe with the central {f:.0f} % of the width and height of every training and "
              f"test image blacked out. Chance = the majority class ({hidden['majority_class']}) "
              f"share of the {hidden['n_test']} test images.", "",
              "| init | original | lungs hidden | chance | reading |", "|---|---|---|---|---|"]
    for init, v in hidden["by_init"].items():
      if v["points_above_chance"] <= 0:
        words = "the original row is not above chance"
      else:
        words = (f"{v['points_without_lungs']:.1f} of the {v['points_above_chance']:.1f} points "
                 "above chance need no lung pixels")
      lines.append(f"| {init} | {_pct(v['original'])} | {_pct(v['lungs_hidden'])} | "
                   f"{_pct(hidden['chance'])} | {words} |")
  if shares:
    first = next((v for v in shares.values() if v["mean"] is not None),
                 next(iter(shares.values())))
    counted = (f"over the test images with a map ({first['n_images']}; {first['n_flat']} "
               "without mass left out)" if first["mean"] is not None else "over the test images")
    lines += ["", f"**Saliency on the lungs.** Mean share of the Grad-CAM mass (predicted class) "
              f"inside the central {100 * first['fraction']:.0f} % box, {counted}; a map "
              f"spread evenly scores {_pct(first['uniform'])}.", "",
              "| training data | init | accuracy | Grad-CAM share in the centre |",
              "|---|---|---|---|"]
    for key, share in shares.items():
      row, init = key.split("/")
      acc = r["table"][key].get("accuracy", {}).get("mean")
      cell = _pct(share["mean"]) if share["mean"] is not None else (share.get("note") or "n/a")
      lines.append(f"| {row} | {init} | {_pct(acc)} | {cell} |")
  if ext:
    lines += [""] + external_summary_lines(ext["set"])
    if ext["rows"]:
      lines += ["", "| training data | init | in distribution | external | difference | "
                "recall per class | how external images were called |",
                "|---|---|---|---|---|---|---|"]
      for v in ext["rows"].values():
        acc = v["external_accuracy"]["mean"]
        diff = "n/a" if v["in_distribution_accuracy"] is None else (
            f"{100 * (acc - v['in_distribution_accuracy']):+.1f} points")
        recall = ", ".join(f"{c} {_pct(x)}" for c, x in v["recall"].items())
        called = "; ".join(f"external {c} called {p}: {_pct(share)}"
                           for c, row in v["called"].items() for p, share in row.items()
                           if p != c and share > 0)
        lines.append(f"| {v['row']} | {v['init']} | {_pct(v['in_distribution_accuracy'])} | "
                     f"{_pct(acc)} | {diff} | {recall} | {called or 'all called right'} |")
  return lines


def external_summary_lines(s: Mapping[str, Any]) -> list[str]:
  """What the external set held, what was left out and why."""
  kept = ", ".join(f"{c} {k}" for c, k in s["kept"].items())
  words = [f"**External test set** ({s['source']}): {s['n_kept']} images kept ({kept}); never "
           "split, trained on or used to choose anything."]
  if s["missing_classes"]:
    words.append(f"No external image of {', '.join(s['missing_classes'])}: its recall is not "
                 "measured.")
  if s["ignored_classes"]:
    words.append("Classes the run does not use, left out: "
                 + ", ".join(f"{c} ({k} images)" for c, k in s["ignored_classes"].items()) + ".")
  n_dup = s["n_exact_duplicates"] + s["n_near_duplicates"]
  words.append(f"Left out as also in the run's own data: {s['n_exact_duplicates']} exact "
               f"(same pixels) and {s['n_near_duplicates']} near duplicate(s) (perceptual hash)"
               + (" (listed in external_set.json)." if n_dup else "."))
  if s["n_skipped"]:
    shown = ", ".join(x["file"] for x in s["skipped"][:5])
    words.append(f"Unreadable, skipped: {s['n_skipped']} ({shown}"
                 + (" ..." if s["n_skipped"] > 5 else "") + ").")
  return [" ".join(words)]
