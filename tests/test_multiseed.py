"""A row's seeds trained as one program (`fit.SeedStack`): with `lax.map` each seed's result is
bitwise that seed trained alone on the CPU (steps, validation, best checkpoint, export, test
report), with `vmap` close to it; each seed's best is kept in the state (later step on ties);
outputs go to each seed's own folder; a resumed run equals an uninterrupted one."""

from __future__ import annotations

import csv
import json
import logging
import shutil

import jax
import numpy as np
import pytest

from cxr_jax import configlib
from cxr_jax.data.dataset import ImageSet
from cxr_jax.data.images import pixel_hash
from cxr_jax.errors import ConfigError
from cxr_jax.pipeline import classify
from cxr_jax.training import classifier
from cxr_jax.training import export
from cxr_jax.training import fit
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training import seeds as seeds_lib
from cxr_jax.training.summary import SummaryWriter

from conftest import REPO_ROOT
from conftest import assert_same_across_programs

NAMES = ("COVID", "NORMAL", "VIRAL_PNEUMONIA")


def smoke_config(**overrides):
  config = configlib.load_config_file(REPO_ROOT / "configs/classifier.py", "smoke")
  config.update(overrides)
  return config


def _image_set(n: int, seed: int, prefix: str) -> ImageSet:
  images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 1)).astype(np.uint8)
  return ImageSet(images=images, labels=(np.arange(n) % 3).astype(np.int32),
                  files=tuple(f"{prefix}/{i}.png" for i in range(n)),
                  hashes=tuple(pixel_hash(im[..., 0]) for im in images), class_names=NAMES)


def _leaves(tree) -> dict[str, np.ndarray]:
  paths, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): np.asarray(jax.device_get(
      jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x))
      for p, x in paths}


def _assert_same(a, b, seed=None, across_programs=False, **close):
  """Pytrees `a` and `b` (or seed `seed` of the stacked `a`) bitwise equal, or close; computed by
  two different programs, as `assert_same_across_programs` compares them."""
  la, lb = _leaves(a), _leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    x = la[k] if seed is None else la[k][seed]
    if close:
      np.testing.assert_allclose(x, lb[k], err_msg=k, **close)
    elif across_programs:
      assert_same_across_programs(x, lb[k], err_msg=k)
    else:
      np.testing.assert_array_equal(x, lb[k], err_msg=k)


def _assert_same_numbers(a, b, what: str) -> None:
  """JSON values or scalar rows written by two different programs: equal, or (with the suite's
  compiler settings, conftest.py) their numbers equal to float rounding."""
  assert type(a) is type(b), what
  if isinstance(a, dict):
    assert a.keys() == b.keys(), what
    for k in a:
      _assert_same_numbers(a[k], b[k], f"{what}/{k}")
  elif isinstance(a, (list, tuple)):
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_same_numbers(x, y, f"{what}[{i}]")
  elif isinstance(a, float):
    assert_same_across_programs(np.float64(a), np.float64(b), err_msg=what)
  else:
    assert a == b, what


@pytest.fixture(scope="module")
def tiny():
  """Two seeds of a tiny classifier (3 steps per epoch) on 4 devices, and their data."""
  mesh = mesh_lib.make_mesh()
  config = smoke_config()
  trainers = [classifier.Classifier(fit.seed_config(config, s), class_names=NAMES,
                                    steps_per_epoch=3, total_steps=6, mesh=mesh,
                                    val=_image_set(6, 9, "val"))
              for s in (0, 7)]
  train = _image_set(24, 1, "train")
  data = mesh_lib.put_replicated((train.images, train.labels), mesh)
  return trainers, data


def _stack(trainers, mode, tmp_path=None):
  dirs = [tmp_path or "unused"] * len(trainers)
  return fit.SeedStack(trainers, mode=mode, best_metric="macro_f1", export_dirs=dirs,
                       writer_dirs=dirs)


@pytest.mark.parametrize("mode, calls", [("map", (3, 1)), ("vmap", (1,))])
def test_stacked_steps_equal_each_seed_alone(tiny, mode, calls):
  """Both seeds' steps in 3-step chunks (the programs of the test below): with `map`, 3 then 1,
  across an epoch boundary (a new batch order)."""
  trainers, data = tiny

  def run(t):
    chunk = fit.compile_chunk(t, 3)
    state = fit.place_state(t.init_state(), t.mesh)
    metrics = []
    for steps in calls:
      state, m = chunk(state, data, np.int32(steps))
      metrics.append(m)
    return state, metrics

  alone = [run(t) for t in trainers]
  state, metrics = run(_stack(trainers, mode))
  assert int(state.step) == sum(calls)
  for i, (one, one_metrics) in enumerate(alone):
    if mode == "map":   # bitwise: parameters, statistics, optimiser, RNG, step, metrics
      _assert_same(state.seeds, one, seed=i)
      for got, want in zip(metrics, one_metrics):
        for k, v in want.items():
          np.testing.assert_array_equal(np.asarray(got[fit.seed_key(k, i)]), np.asarray(v))
    else:  # vmap: per-seed kernels become a grouped convolution on a CPU (other rounding)
      _assert_same(state.seeds.net.params, one.net.params, seed=i, rtol=1e-3, atol=1e-5)
      _assert_same(state.seeds.net.stats, one.net.stats, seed=i, rtol=1e-3, atol=1e-5)
  # The two seeds really differ (initialisation, batch order): no seed is a copy of another.
  a, b = _leaves(state.seeds.net.params), _leaves(alone[1][0].net.params)
  assert not all(np.array_equal(a[k][0], b[k]) for k in b)


def test_keep_best_per_seed_takes_the_later_step_on_ties(tiny):
  trainers, data = tiny
  stack = _stack(trainers, "map")
  chunk = fit.compile_chunk(stack, 3)
  state = fit.place_state(stack.init_state(), stack.mesh)
  state, _ = chunk(state, data, np.int32(3))
  at3 = jax.device_get(state.seeds)
  state = stack.keep_best(state, {"macro_f1@0": 0.5, "macro_f1@1": 0.4, "accuracy@0": 0.9})
  state, _ = chunk(state, data, np.int32(3))
  at6 = jax.device_get(state.seeds)
  # Seed 0 ties (the later step wins, as Orbax's BestN for a run alone); seed 1 got worse.
  state = stack.keep_best(state, {"macro_f1@0": 0.5, "macro_f1@1": 0.1})
  np.testing.assert_array_equal(np.asarray(state.best_step), [6, 3])
  np.testing.assert_array_equal(np.asarray(state.best_metric), np.float32([0.5, 0.4]))
  best = jax.device_get(state.best)
  _assert_same(jax.tree.map(lambda x: x[0], best), jax.tree.map(lambda x: x[0], at6))
  _assert_same(jax.tree.map(lambda x: x[1], best), jax.tree.map(lambda x: x[1], at3))
  assert jax.random.key_data(best.rng).shape == jax.random.key_data(at3.rng).shape
  np.testing.assert_array_equal(jax.random.key_data(best.rng), jax.random.key_data(at3.rng))


def _scalars(path):
  with open(path, encoding="utf-8") as f:
    return [(int(r["step"]), r["tag"], float(r["value"])) for r in csv.DictReader(f)]


def test_seed_writers_send_each_seed_to_its_own_folder(tmp_path):
  writers = fit.SeedWriters([SummaryWriter(tmp_path / f"s{i}") for i in range(2)])
  writers.scalars(5, {"train/loss@0": 1.5, "train/loss@1": 2.5, "perf/steps_per_sec": 3.0,
                      "val/macro_f1@1": 0.25})
  writers.close()
  assert _scalars(tmp_path / "s0" / "scalars.csv") == [
      (5, "train/loss", 1.5), (5, "perf/steps_per_sec", 3.0)]
  assert _scalars(tmp_path / "s1" / "scalars.csv") == [
      (5, "train/loss", 2.5), (5, "perf/steps_per_sec", 3.0), (5, "val/macro_f1", 0.25)]
  assert fit.split_seed_key("a@b@12") == ("a@b", 12) and fit.split_seed_key("x@y") == ("x@y", None)


def test_bad_options_are_refused(tiny):
  with pytest.raises(ConfigError, match="seeds_in_one_program"):
    classifier.validate(smoke_config(seeds_in_one_program="grouped"))
  assert fit.seeds_mode(smoke_config(seeds_in_one_program="off")) is None
  assert fit.seeds_mode(smoke_config(seeds_in_one_program="auto")) is None  # on a CPU
  assert fit.seeds_mode(smoke_config(seeds_in_one_program="vmap")) == "vmap"
  with pytest.raises(ConfigError, match="repeats"):
    seeds_lib.train_seeds(smoke_config(), [1, 1], ["a", "b"], None, None, tiny[0][0].mesh)
  with pytest.raises(ValueError, match="2 seeds for 1 workdirs"):
    seeds_lib.train_seeds(smoke_config(), [1, 2], ["a"], None, None, tiny[0][0].mesh)


def _export_tree(directory):
  exported = export.load_classifier(directory)
  return exported.meta, (exported.params, exported.stats)


def test_row_in_one_program_equals_runs_alone_and_resumes_exactly(tmp_path, caplog):
  """classify.train_and_evaluate_seeds one run after another vs in one program (`map`): the same
  exports (bitwise), best steps, validation scalars and test reports in each seed's folder; then
  the one-program run interrupted after its first epoch and resumed gives the same again."""
  splits = {"train": _image_set(24, 1, "train"), "val": _image_set(6, 9, "val"),
            "test": _image_set(6, 5, "test")}
  seeds = [0, 3]
  results = {}
  for mode in ("off", "map"):
    config = smoke_config(seeds_in_one_program=mode, name="row")
    dirs = [tmp_path / mode / f"row-seed{s}" for s in seeds]
    results[mode] = classify.train_and_evaluate_seeds(config, seeds, dirs, splits=splits,
                                                      train_set=splits["train"])
  assert [r["summary"] for r in results["off"]] == [r["summary"] for r in results["map"]]
  stack_dir = seeds_lib.checkpoint_dir([tmp_path / "map" / "row-seed0"], seeds)
  assert sorted(p.name for p in (stack_dir / "checkpoints").iterdir()) == ["3", "6"]
  for s in seeds:
    alone, together = tmp_path / "off" / f"row-seed{s}", tmp_path / "map" / f"row-seed{s}"
    meta_a, tree_a = _export_tree(alone / "classifier")
    meta_b, tree_b = _export_tree(together / "classifier")
    assert meta_a["best_step"] == meta_b["best_step"]
    assert meta_b["workdir"] == str(together)
    _assert_same(tree_b, tree_a, across_programs=True)
    for name in ("metrics.json", "metrics.md", "confusion_matrix.png", "roc_curves.png",
                 "gradcam.png", "test_predictions.csv"):
      assert (together / name).exists(), name
    _assert_same_numbers(json.loads((together / "metrics.json").read_text()),
                         json.loads((alone / "metrics.json").read_text()), "metrics.json")
    val = lambda d: [r for r in _scalars(d / "tensorboard" / "scalars.csv")  # noqa: E731
                     if r[1].startswith(("val/", "test/", "train/loss"))]
    assert val(alone)
    _assert_same_numbers(val(together), val(alone), "validation and loss scalars")
  # Interrupted after the first epoch: the last checkpoint and the exports are gone.
  shutil.rmtree(stack_dir / "checkpoints" / "6")
  for s in seeds:
    shutil.rmtree(tmp_path / "map" / f"row-seed{s}" / "classifier")
  caplog.set_level(logging.INFO)
  mesh = mesh_lib.make_mesh()
  seeds_lib.train_seeds(smoke_config(seeds_in_one_program="map"), seeds,
                         [tmp_path / "map" / f"row-seed{s}" for s in seeds], splits["train"],
                         splits["val"], mesh)
  assert any("Resumed from" in r.getMessage() and "at step 3" in r.getMessage()
             for r in caplog.records)
  for s in seeds:
    meta_a, tree_a = _export_tree(tmp_path / "off" / f"row-seed{s}" / "classifier")
    meta_b, tree_b = _export_tree(tmp_path / "map" / f"row-seed{s}" / "classifier")
    assert meta_a["best_step"] == meta_b["best_step"]
    _assert_same(tree_b, tree_a, across_programs=True)
