"""`predict` in one workdir with several inputs: each input has its own predictions file, none is
overwritten, and only `input` (of the predict task only) may change between runs."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from cxr_jax import configlib, tasks
from cxr_jax import workdir as workdir_lib
from cxr_jax.data import images as images_lib
from cxr_jax.errors import UserError
from cxr_jax.evaluation import predict
from cxr_jax.models import build
from cxr_jax.training import export
from cxr_jax.training.functional import Functional
from cxr_jax.utils import grid

from conftest import REPO_ROOT

SIZE = 32
CLASSES = ["COVID", "NORMAL", "VIRAL_PNEUMONIA"]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
  arch = {"variant": "v1.5", "stage_sizes": [1, 1, 1, 1], "width": 8, "in_channels": 1}
  model = build.build_resnet(arch, num_classes=3, compute_dtype="float32", seed=2)
  _, params, stats = Functional.split(model)
  meta = {"kind": "classifier", "class_names": CLASSES, "arch": arch,
          "input": build.InputSpec(SIZE, 1).to_json(), "image_size": SIZE,
          "data_image_size": SIZE, "compute_dtype": "float32"}
  directory = tmp_path_factory.mktemp("clf") / "classifier"
  export.save(directory, params, stats, meta)
  return directory


def _folder(root, names, seed):
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True)
  for name in names:
    grid.save_png(root / name, rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
  return root


def _config(classifier, input_path):
  config = configlib.load_config_file(REPO_ROOT / "configs/predict.py", "smoke")
  config.classifier_dir = str(classifier)
  config.input = str(input_path)
  return config


def _run(config, workdir):
  path = workdir_lib.prepare(workdir, config)
  return tasks.get("predict")(config, path)


def _rows(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def test_a_second_input_gets_its_own_file(classifier_dir, tmp_path, capsys):
  first = _folder(tmp_path / "one" / "images", ["a.png", "b.png"], 0)
  second = _folder(tmp_path / "two" / "images", ["c.png", "d.png", "e.png"], 1)
  work = tmp_path / "work"
  out1 = _run(_config(classifier_dir, first), work)
  before = (work / predict.predictions_file(first)).read_bytes()
  out2 = _run(_config(classifier_dir, second), work)  # same workdir, another input: accepted
  printed = capsys.readouterr().out
  assert out1["predictions"] != out2["predictions"]  # two folders both named 'images'
  assert sorted(p.name for p in work.glob("predictions-*.csv")) == sorted(
      [predict.predictions_file(first), predict.predictions_file(second)])
  assert (work / predict.predictions_file(first)).read_bytes() == before  # untouched
  rows = _rows(out2["predictions"])
  assert [r["file"] for r in rows] == ["c.png", "d.png", "e.png"] and out2["count"] == 3
  trained = export.load_classifier(classifier_dir)
  pixels = np.stack([images_lib.decode(second / r["file"], SIZE).pixels for r in rows])[..., None]
  probs = trained.predict(pixels)
  for row, p in zip(rows, probs):
    np.testing.assert_allclose([float(row[f"p_{c}"]) for c in CLASSES], p, atol=1e-4)
    assert row["predicted"] == CLASSES[int(p.argmax())]
    assert f"{row['file']}: {row['predicted']}" in printed  # the console table
  # The same input again rewrites its own file with the same predictions.
  again = _run(_config(classifier_dir, second), work)
  assert _rows(again["predictions"]) == rows
  assert workdir_lib.CONFIG_FILE in {p.name for p in work.iterdir()}


def test_other_keys_and_other_tasks_are_still_guarded(classifier_dir, tmp_path):
  images = _folder(tmp_path / "images", ["a.png"], 2)
  work = tmp_path / "work"
  _run(_config(classifier_dir, images), work)
  other = _config(classifier_dir, images)
  other.classifier_dir = str(tmp_path / "another")
  with pytest.raises(UserError, match="classifier_dir"):
    workdir_lib.prepare(work, other)
  # `input` is resume-safe for predict only: the translate task's input is part of its run.
  translate = configlib.load_config_file(REPO_ROOT / "configs/translate.py")
  translate.input = "x"
  workdir_lib.prepare(tmp_path / "tr", translate)
  (tmp_path / "tr" / "manifest.csv").write_text("")
  translate.input = "y"
  with pytest.raises(UserError, match=r"input \('x' -> 'y'\)"):
    workdir_lib.prepare(tmp_path / "tr", translate)


def test_predictions_file_names():
  a, b = predict.predictions_file("/data/x/images"), predict.predictions_file("/data/y/images")
  assert a.startswith("predictions-images-") and a.endswith(".csv") and a != b
  assert a == predict.predictions_file("/data/x/images/")
  assert predict.predictions_file("/data/scan 1.dcm").startswith("predictions-scan_1.dcm-")
