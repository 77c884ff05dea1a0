"""The experiment's report: `report.md`, and the same numbers in `report.json` and `report.csv`."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
from typing import Any

import flax
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from cxr_jax import workdir as workdir_lib
from cxr_jax.evaluation import report_classifier
from cxr_jax.evaluation import stats
from cxr_jax.utils import files

# The paper's reported accuracies (BIBM 2020, 3 classes, real test images).
PAPER = {"enhanced": 0.978, "original (the paper's two baselines)": (0.961, 0.956)}
CONFOUND = (
    "**Known confound.** In the COVID-19 Radiography Database the normal and viral-pneumonia "
    "images come from a pediatric collection, while the COVID-19 images are from adults. A "
    "classifier can separate COVID-19 from the rest partly by patient age and acquisition source "
    "rather than by lung findings; high accuracy here is not evidence of clinical performance.")


def _row_runs(workdir: pathlib.Path, train_data: str, init: str, seeds) -> list[dict]:
  runs = []
  for seed in seeds:
    run_dir = workdir / "classifiers" / f"{train_data}-{init}-seed{seed}"
    path = run_dir / "metrics.json"
    if path.exists():
      runs.append({"seed": seed, "dir": run_dir, "metrics": json.loads(path.read_text())})
  return runs


def _fmt(agg: dict[str, Any], spread: bool = True) -> str:
  """'mean ± std [ci]' in %, or just the mean; undefined values (e.g. the precision of a class
  never predicted) as 'n/a'."""
  mean = agg.get("mean")
  if mean is None or not np.isfinite(mean):
    return "n/a"
  s = 100.0
  text = f"{mean * s:.1f}"
  if not spread:
    return text
  if agg.get("std") is not None:
    text += f" ± {agg['std'] * s:.1f}"
  if agg.get("ci") is not None and agg["ci"][0] is not None:
    lo, hi = (min(max(v * s, 0.0), s) for v in agg["ci"])  # a proportion's interval, clipped
    text += f" [{lo:.1f}, {hi:.1f}]"
  return text


def _versions() -> dict[str, str]:
  return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "orbax-checkpoint": getattr(ocp, "__version__", "?"),
          "numpy": np.__version__,
          "devices": ", ".join(sorted({f"{jax.device_count()} x {d.device_kind}"
                                       for d in jax.devices()}))}


def write_report(workdir: pathlib.Path, config, *, splits, skipped: dict[str, str], stages,
                 synthetic_dir: pathlib.Path) -> dict:
  workdir = pathlib.Path(workdir)
  class_names = list(splits["train"].class_names)
  table: dict[str, Any] = {}
  for train_data, init in (("original", "scratch"), ("original", "transfer"),
                           ("enhanced", "scratch"), ("enhanced", "transfer")):
    key = f"{train_data}/{init}"
    runs = _row_runs(workdir, train_data, init, config.seeds)
    if not runs:
      table[key] = {"skipped": skipped.get(f"{train_data}-{init}-seed{config.seeds[0]}",
                                           "not run")}
      continue
    entry = {"seeds": [r["seed"] for r in runs],
             "accuracy": stats.mean_std_ci([r["metrics"]["accuracy"]["value"] for r in runs]),
             "macro_f1": stats.mean_std_ci([r["metrics"]["macro_f1"]["value"] for r in runs]),
             "per_class": {}}
    for name in class_names:
      entry["per_class"][name] = {
          m: stats.mean_std_ci([r["metrics"]["per_class"][name][m]["value"] for r in runs])
          for m in ("precision", "recall", "f1")}
    entry["confusion_matrices"] = [str((r["dir"] / "confusion_matrix.png").relative_to(workdir))
                                   for r in runs]
    table[key] = entry

  paired = []
  for init in ("scratch", "transfer"):
    for seed in config.seeds:
      a = workdir / "classifiers" / f"original-{init}-seed{seed}"
      b = workdir / "classifiers" / f"enhanced-{init}-seed{seed}"
      if (a / "test_predictions.csv").exists() and (b / "test_predictions.csv").exists():
        files_a, correct_a = report_classifier.read_correct(a / "test_predictions.csv")
        files_b, correct_b = report_classifier.read_correct(b / "test_predictions.csv")
        if files_a != files_b:
          continue
        paired.append({"init": init, "seed": seed, "mcnemar": stats.mcnemar(correct_a, correct_b),
                       "paired_bootstrap": stats.paired_bootstrap(correct_a, correct_b)})

  synthesis = json.loads((synthetic_dir / "synthesis.json").read_text()) \
      if (synthetic_dir / "synthesis.json").exists() else {}
  quality_path = synthetic_dir / "quality.json"
  quality = json.loads(quality_path.read_text()) if quality_path.exists() else {}
  counts = {name: s.counts() for name, s in splits.items()}
  enhanced_counts = dict(counts["train"])
  target = synthesis.get("target_class", "COVID")
  enhanced_counts[target] = enhanced_counts.get(target, 0) + synthesis.get("num_synthetic", 0)
  durations = {p.stem: json.loads(p.read_text())["seconds"]
               for p in sorted(stages.dir.glob("*.json"), key=lambda p: p.stat().st_mtime)}
  result = {"created": datetime.datetime.now().isoformat(timespec="seconds"),
            "data": "embedded synthetic default" if not config.data.data_dir
                    else str(config.data.data_dir),
            "image_size": config.data.image_size, "seeds": list(config.seeds),
            "class_names": class_names, "table": table, "paired_tests": paired,
            "paper": PAPER, "split_counts": counts, "enhanced_train_counts": enhanced_counts,
            "synthesis": synthesis, "synthetic_quality": quality, "skipped": skipped,
            "stage_seconds": durations, "software": _versions()}
  if workdir_lib.is_writer():
    files.write_text_atomic(workdir / "report.json", json.dumps(result, indent=2, default=str))
    files.write_text_atomic(workdir / "report.md", _markdown(result, workdir, synthetic_dir))
    _write_csv(workdir / "report.csv", table, class_names)
  return {"table": {k: v.get("accuracy", v) for k, v in table.items()}}


def _markdown(r: dict, workdir: pathlib.Path, synthetic_dir: pathlib.Path) -> str:
  names = r["class_names"]
  lines = ["# GAN-enhanced COVID-19 chest X-ray classification: report", "",
           f"Created {r['created']}. Data: {r['data']} at {r['image_size']} px. "
           f"Seeds: {r['seeds']}. Values are mean ± std over seeds [95 % t-interval, clipped to "
           "0-100], in %; every model is evaluated on the same real test images.", "", CONFOUND,
           "",
           "## Results", "",
           "| training data | init | accuracy | macro-F1 | "
           + " | ".join(f"{c} P / R / F1" for c in names) + " |",
           "|---|---|---|---|" + "---|" * len(names)]
  for key, e in r["table"].items():
    data, init = key.split("/")
    if "skipped" in e:
      lines.append(f"| {data} | {init} | skipped: {e['skipped']} |" + " |" * (1 + len(names)))
      continue
    cells = [" / ".join(_fmt(e["per_class"][c][m], spread=False) for m in
                        ("precision", "recall", "f1")) for c in names]
    lines.append(f"| {data} | {init} | {_fmt(e['accuracy'])} | {_fmt(e['macro_f1'])} | "
                 + " | ".join(cells) + " |")
  lines += ["", "Per-class cells show the mean over seeds (precision / recall / F1, %).", "",
            "Paper (BIBM 2020): 97.8 % accuracy with GAN-enhanced training data, against 96.1 % "
            "and 95.6 % for its two baselines on the original data.", ""]
  lines += ["## Original vs enhanced, paired on the same test images", ""]
  if r["paired_tests"]:
    lines += ["| init | seed | discordant (orig only / enh only) | McNemar p | accuracy "
              "difference (enh - orig) [95 % CI] | bootstrap p |", "|---|---|---|---|---|---|"]
    for p in r["paired_tests"]:
      m, b = p["mcnemar"], p["paired_bootstrap"]
      lines.append(f"| {p['init']} | {p['seed']} | {m['b']} / {m['c']} | {m['p_value']:.3g} "
                   f"({m['test']}) | {100 * b['difference']:.2f} [{100 * b['ci'][0]:.2f}, "
                   f"{100 * b['ci'][1]:.2f}] | {b['p_value']:.3g} |")
  else:
    lines.append("No pair of original and enhanced runs finished.")
  lines += ["", "## Class counts", "", "| split | " + " | ".join(names) + " | total |",
            "|---|" + "---|" * (len(names) + 1)]
  rows = dict(r["split_counts"], **{"enhanced train": r["enhanced_train_counts"]})
  for split, counts in rows.items():
    lines.append(f"| {split} | " + " | ".join(str(counts.get(c, 0)) for c in names)
                 + f" | {sum(counts.values())} |")
  lines += ["", "## Synthetic images", ""]
  syn, q = r["synthesis"], r["synthetic_quality"]
  if syn:
    lines.append(f"{syn.get('num_synthetic')} synthetic {syn.get('target_class')} images from "
                 f"{syn.get('num_sources')} normal training images "
                 f"(manifest: `{os.path.relpath(synthetic_dir / 'manifest.csv', workdir)}`).")
  if q:
    parts = [f"FID {q['fid']:.2f}" if "fid" in q else None,
             f"KID {q['kid']:.4f} ± {q['kid_std']:.4f}" if "kid" in q else None,
             f"{100 * q['share_called_COVID']:.1f} % called COVID" if "share_called_COVID" in q
             else None]
    lines.append("Quality against the real COVID training images: "
                 + ", ".join(p for p in parts if p) + f". Features: {q.get('features')}.")
  grid_png = synthetic_dir / "grid.png"
  if grid_png.exists():
    lines += ["", f"![normal | synthetic]({os.path.relpath(grid_png, workdir)})"]
  samples = sorted((workdir / "pix2pix" / "samples").glob("*.png"))
  if samples:
    lines += ["", f"pix2pix training samples (normal | generated | real COVID): "
              f"![last]({os.path.relpath(samples[-1], workdir)})"]
  lines += ["", "## Confusion matrices (first seed)", ""]
  for key, e in r["table"].items():
    if "confusion_matrices" in e:
      lines.append(f"- {key}: ![]({e['confusion_matrices'][0]})")
  if r["skipped"]:
    lines += ["", "## Skipped", ""] + [f"- {k}: {v}" for k, v in r["skipped"].items()]
  lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.0f} |" for k, v in r["stage_seconds"].items()]
  lines += ["", "## Software and devices", ""]
  lines += [f"- {k}: {v}" for k, v in r["software"].items()]
  return "\n".join(lines) + "\n"


def _write_csv(path: pathlib.Path, table: dict, class_names) -> None:
  rows = []
  for key, e in table.items():
    data, init = key.split("/")
    if "skipped" in e:
      continue
    items = [("all", "accuracy", e["accuracy"]), ("all", "macro_f1", e["macro_f1"])]
    items += [(c, m, e["per_class"][c][m]) for c in class_names
              for m in ("precision", "recall", "f1")]
    for cls, metric, agg in items:
      ci = agg.get("ci") or (None, None)
      rows.append([data, init, cls, metric, agg.get("mean"), agg.get("std"), ci[0], ci[1],
                   agg.get("n")])
  files.write_csv_atomic(path, ["training_data", "init", "class", "metric", "mean", "std",
                                "ci_low", "ci_high", "n_seeds"], rows)
