"""Accuracy and per-class recall within subgroups of the test images (sex, age band, view, source).

A classifier that reads the lungs should score alike across patients' sex, age and the view or
the source hospital of the film; a large gap in one subgroup is a shortcut or a data problem that
the overall accuracy hides. Each subgroup's accuracy and recall is a proportion k / n of test
images, with the exact Clopper-Pearson interval of the classification report (`stats`), so a
small subgroup shows a wide interval instead of a confident number.

The subgroup of an image comes from its metadata (the split manifest's columns: patient_id, age,
sex, view, source and a labels CSV's other columns); `age_band` is derived from `age` by decade
('40-49', '90+'); an image without the value is in subgroup 'unknown'. Numbers (`subgroup_table`,
plain data for JSON) and rendering (`markdown`) are separate so that the classifier's report and
the experiment's report render the same table.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from cxr_jax.data import splits as splits_lib
from cxr_jax.errors import ConfigError
from cxr_jax.evaluation import stats

AGE_BAND = "age_band"
UNKNOWN = "unknown"
CI_METHOD = "clopper-pearson"


def age_band(age: str | float | None) -> str:
  """Decade of an age in years: '0-9', ..., '80-89', '90+'; 'unknown' when missing or invalid."""
  try:
    years = float(age)  # type: ignore[arg-type]
  except (TypeError, ValueError):
    return UNKNOWN
  if not math.isfinite(years) or years < 0:
    return UNKNOWN
  low = int(years // 10) * 10
  return "90+" if low >= 90 else f"{low}-{low + 9}"


def available(metadata: Mapping[str, Mapping[str, str]]) -> list[str]:
  """The subgroup columns the metadata offer (age_band when there are ages), sorted."""
  columns = {k for m in metadata.values() for k, v in m.items() if v}
  if "age" in columns:
    columns.add(AGE_BAND)
  return sorted(columns)


def check(keys: Iterable[str] | str, metadata: Mapping[str, Mapping[str, str]],
          key: str = "subgroups") -> tuple[str, ...]:
  """`config.<key>` as a tuple of columns, each present in the metadata; else a ConfigError that
  lists the columns there are. Call it once the data are loaded, before training."""
  if isinstance(keys, str):
    keys = [k for k in keys.split(",")]
  wanted = tuple(str(k).strip() for k in keys if str(k).strip())
  if not wanted:
    return ()
  have = available(metadata)
  missing = [k for k in wanted if k not in have]
  if missing:
    raise ConfigError(f"config.{key}: {', '.join(repr(k) for k in missing)} is not a metadata "
                      f"column of the data (columns: {', '.join(have) or 'none'}; metadata come "
                      "from the labels CSV, DICOM headers and <Class>.metadata.xlsx)")
  return wanted


def value_of(meta: Mapping[str, str] | None, key: str) -> str:
  """The subgroup of one image for `key` (age_band derived from age)."""
  meta = meta or {}
  if key == AGE_BAND:
    return age_band(meta.get("age"))
  return meta.get(key, "") or UNKNOWN


def _proportion(k: int, n: int, confidence: float) -> dict[str, Any]:
  lo, hi = stats.clopper_pearson_interval(k, n, confidence)
  return {"value": k / n if n else math.nan, "ci": [lo, hi], "k": int(k), "n": int(n)}


def subgroup_table(files: Sequence[str], labels: Sequence[int], predicted: Sequence[int],
                   class_names: Sequence[str], metadata: Mapping[str, Mapping[str, str]],
                   keys: Sequence[str], *, confidence: float = 0.95) -> dict[str, Any]:
  """Per subgroup of each column in `keys`: n, accuracy and each class's recall, exact CIs.

  Returns plain data: {'keys', 'class_names', 'confidence', 'ci_method', 'groups': [{'column',
  'value', 'n', 'support': {class: n}, 'accuracy': {value, ci, k, n}, 'recall': {class: {...}}}]}
  with the subgroups of a column sorted by value ('unknown' last).
  """
  labels = np.asarray(labels, np.int64)
  predicted = np.asarray(predicted, np.int64)
  if not len(files) == len(labels) == len(predicted):
    raise ValueError(f"lengths differ: {len(files)} files, {len(labels)} labels, "
                     f"{len(predicted)} predictions")
  groups = []
  for key in keys:
    values = np.array([value_of(metadata.get(f), key) for f in files], dtype=object)
    for value in sorted(set(values), key=lambda v: (v == UNKNOWN, _sort_key(v))):
      rows = values == value
      right = labels[rows] == predicted[rows]
      recall = {}
      support = {}
      for c, name in enumerate(class_names):
        of_class = labels[rows] == c
        support[name] = int(of_class.sum())
        recall[name] = _proportion(int(right[of_class].sum()), int(of_class.sum()), confidence)
      groups.append({"column": key, "value": str(value), "n": int(rows.sum()), "support": support,
                     "accuracy": _proportion(int(right.sum()), int(rows.sum()), confidence),
                     "recall": recall})
  return {"keys": list(keys), "class_names": list(class_names), "confidence": float(confidence),
          "ci_method": CI_METHOD, "groups": groups}


def _sort_key(value: str):
  """Numeric bands in numeric order ('9-9' < '10-19' < '90+'), others alphabetically."""
  head = value.split("-")[0].rstrip("+")
  return (0, int(head), value) if head.isdigit() else (1, 0, value)


def from_predictions(predictions_csv: str | os.PathLike,
                     metadata: Mapping[str, Mapping[str, str]], keys: Sequence[str],
                     class_names: Sequence[str], *, confidence: float = 0.95) -> dict[str, Any]:
  """`subgroup_table` of a run's `test_predictions.csv` (file, label, predicted): the experiment's
  report calls this per run with the split manifest's metadata (`read_metadata`)."""
  with open(predictions_csv, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  index = {c: k for k, c in enumerate(class_names)}
  try:
    labels = [index[r["label"]] for r in rows]
    predicted = [index[r["predicted"]] for r in rows]
  except KeyError as e:
    raise ValueError(f"{predictions_csv}: class {e} is not among {list(class_names)}") from None
  return subgroup_table([r["file"] for r in rows], labels, predicted, class_names, metadata, keys,
                        confidence=confidence)


def read_metadata(manifest_csv: str | os.PathLike) -> dict[str, dict[str, str]]:
  """file -> metadata from a split_manifest.csv (the columns after file, sha256, class, split,
  note)."""
  return {r.file: dict(r.metadata) for r in splits_lib.read_manifest(manifest_csv)}


def _cell(entry: Mapping[str, Any]) -> str:
  if not entry["n"]:
    return "n/a"
  lo, hi = entry["ci"]
  return f"{entry['value']:.3f} [{lo:.3f}, {hi:.3f}] ({entry['k']}/{entry['n']})"


def markdown(table: Mapping[str, Any], *, heading: str = "## Subgroups") -> str:
  """The table as Markdown: one row per subgroup, accuracy and each class's recall with CIs."""
  names = table["class_names"]
  pct = f"{100 * table['confidence']:g} %"
  lines = [heading, "",
           f"Accuracy and recall per subgroup of the test images, {pct} exact (Clopper-Pearson) "
           "intervals (k/n in brackets after them); 'unknown': the image has no value.", "",
           "| Column | Subgroup | Images | Accuracy | " + " | ".join(f"Recall {c}" for c in names)
           + " |", "|---|---|---:|---|" + "---|" * len(names)]
  for g in table["groups"]:
    lines.append(f"| {g['column']} | {g['value']} | {g['n']} | {_cell(g['accuracy'])} | "
                 + " | ".join(_cell(g["recall"][c]) for c in names) + " |")
  return "\n".join(lines) + "\n"


def compare_markdown(tables: Mapping[str, Mapping[str, Any]], *,
                     heading: str = "## Subgroups") -> str:
  """Several runs' tables (e.g. the experiment's rows, one seed each: `{row: from_predictions(
  ...)}`) side by side: one line per subgroup, each run's accuracy with its exact interval. The
  runs score the same test images, so their intervals are not independent evidence of a
  difference: the paired tests of the report compare rows."""
  runs = list(tables)
  if not runs:
    return ""
  first = tables[runs[0]]
  pct = f"{100 * first['confidence']:g} %"
  lines = [heading, "",
           f"Accuracy per subgroup of the test images, {pct} exact (Clopper-Pearson) intervals "
           "(k/n after them); 'unknown': the image has no value.", "",
           "| Column | Subgroup | Images | " + " | ".join(runs) + " |",
           "|---|---|---:|" + "---|" * len(runs)]
  cells: dict[tuple[str, str], dict[str, str]] = {}
  sizes: dict[tuple[str, str], int] = {}
  for run in runs:
    for g in tables[run]["groups"]:
      key = (g["column"], g["value"])
      sizes.setdefault(key, g["n"])
      cells.setdefault(key, {})[run] = _cell(g["accuracy"])
  for key, n in sizes.items():
    lines.append(f"| {key[0]} | {key[1]} | {n} | "
                 + " | ".join(cells[key].get(run, "n/a") for run in runs) + " |")
  return "\n".join(lines) + "\n"
