"""The benchmark's comparison logic: which reference each goal is measured against, and the ratio.

The timings themselves are never asserted (they are measured by `python -m benchmarks.bench`)."""

from __future__ import annotations

import json
import pathlib
import re

import pytest
from absl import logging as absl_logging

from benchmarks import bench


def _ours(name, batch, step_s, variant="float32"):
  r = bench.Result(name, variant, batch, 12.0, step_s, step_s, step_s, 1.5, None)
  return r.to_json()


def _torch(workload, batch, step_ms, *, bf16, cl, compiled=False):
  return {"workload": workload, "framework": "torch", "size": 256, "batch": batch, "bf16": bf16,
          "channels_last": cl, "compiled": compiled, "step_ms": step_ms,
          "images_per_s": round(batch / step_ms * 1e3, 1), "warmup_s": 3.0, "device": "GPU X"}


@pytest.fixture
def results_dir(tmp_path):
  (tmp_path / "jax-a.json").write_text(json.dumps({"device_kind": "1 x GPU X (gpu)", "results": [
      _ours("pix2pix_b1", 1, 1 / 400), _ours("pix2pix_b1", 1, 1 / 300, "bfloat16"),
      _ours("pix2pix_b16", 16, 16 / 900), _ours("resnet50_rgb", 256, 256 / 7000, "bfloat16")]}))
  (tmp_path / "torch.json").write_text(json.dumps([
      _torch("pix2pix", 1, 1e3 / 78, bf16=False, cl=False),
      _torch("pix2pix", 1, 1e3 / 90, bf16=True, cl=True),      # the better eager: the reference
      _torch("pix2pix", 16, 16e3 / 700, bf16=True, cl=True),
      _torch("resnet50", 256, 256e3 / 4700, bf16=True, cl=True),
      _torch("resnet50", 256, 256e3 / 6700, bf16=True, cl=True, compiled=True)]))
  (tmp_path / "jax-exp.json").write_text(json.dumps({"results": [], "experiment": {
      "variant": "paper", "args": [], "complete": False, "total_s": 300.0,
      "stages_s": {"data": 20.0, "pix2pix": 250.0}}}))
  return tmp_path


def test_goals_pick_the_strongest_reference(results_dir):
  results = bench.load_results(results_dir)
  assert results["devices"] == ["1 x GPU X (gpu)", "GPU X"]
  goals = {g["goal"].split(",")[0]: g for g in bench.goals(results)}
  b1 = goals["pix2pix batch 1"]
  assert b1["ours_images_per_s"] == pytest.approx(400)       # the best of our variants
  assert b1["reference_images_per_s"] == pytest.approx(90, rel=1e-3)
  assert b1["ratio"] == pytest.approx(400 / 90, rel=1e-3) and b1["met"]
  b16 = goals["pix2pix batch 16"]
  assert b16["ratio"] == pytest.approx(900 / 700, rel=1e-3) and not b16["met"]
  # The better of torch.compile (6,700) and eager (4,700), both measured in the same call.
  resnet = goals["ResNet-50 bf16 batch 256 (3-channel)"]
  assert resnet["reference"] == "torch torch.compile, bf16 autocast + channels_last"
  assert resnet["ratio"] == pytest.approx(7000 / 6700, rel=1e-3) and not resnet["met"]


def test_goals_and_targets_come_from_the_data_file(results_dir, tmp_path):
  goals_file = tmp_path / "goals.json"
  goals_file.write_text(json.dumps({"goals": [
      {"label": "b16 vs compiled torch", "workload": "pix2pix_b16",
       "reference": {"workload": "pix2pix", "batch": 16, "bf16": True}, "target": 1.2}]}))
  (goal,) = bench.goals(bench.load_results(results_dir), goals_file)
  assert goal["goal"] == "b16 vs compiled torch" and goal["target"] == 1.2
  assert goal["ratio"] == pytest.approx(900 / 700, rel=1e-3) and goal["met"]
  shipped = json.loads(bench.GOALS_FILE.read_text())["goals"]
  assert [g["workload"] for g in shipped] == ["pix2pix_b1", "pix2pix_b16", "resnet50_rgb"]


def test_table_lists_every_row_and_the_experiment(results_dir):
  table = bench.format_table(bench.load_results(results_dir))
  assert table.count("\npix2pix_b1 ") == 4 and table.count("\nresnet50_rgb ") == 3
  assert "torch.compile, bf16 autocast + channels_last" in table
  assert "GOAL pix2pix batch 1" in table and "NOT met" in table
  assert "experiment:paper one seed  (stopped early, 300 s in all): data 20 s, pix2pix 250 s" in table


def test_stage_times_of_a_recorded_experiment(tmp_path):
  """The experiment mode reads the stage records pipeline/experiment.py writes."""
  (tmp_path / "stages").mkdir()
  for name, seconds in (("split", 0.5), ("pix2pix", 230.0), ("classifier-original-scratch", 95.5)):
    (tmp_path / "stages" / f"{name}.json").write_text(json.dumps(
        {"stage": name, "seconds": seconds, "result": {}}))
  (tmp_path / "config.json").write_text(json.dumps({"name": "experiment-demo"}))
  recorded = bench.recorded_experiment(tmp_path)
  assert recorded["stages_s"] == {"split": 0.5, "pix2pix": 230.0,
                                  "classifier-original-scratch": 95.5}
  assert recorded["total_s"] == pytest.approx(326.0) and not recorded["complete"]
  table = bench.format_table({"ours": [], "torch": [], "devices": [], "experiments": [recorded]})
  assert "experiment:demo" in table and "classifier-original-scratch 96 s" in table
  with pytest.raises(Exception, match="no stage records"):
    bench.recorded_experiment(tmp_path / "nothing")


def test_multi_seed_rows_report_images_summed_over_seeds(results_dir):
  data = json.loads((results_dir / "jax-a.json").read_text())
  data["results"].append(_ours("resnet50_seeds3", 3 * 64, 3 * 64 / 9000, "bfloat16+vmap"))
  (results_dir / "jax-a.json").write_text(json.dumps(data))
  table = bench.format_table(bench.load_results(results_dir))
  (row,) = [line for line in table.splitlines() if line.startswith("resnet50_seeds3 ")]
  assert "bfloat16+vmap" in row and "192" in row and "9000.0" in row
  assert set(bench.SEED_COUNTS) <= set(bench.STEP_WORKLOADS)
  assert not set(bench.SEED_COUNTS) & set(bench.DEFAULT_WORKLOADS)


def test_the_gpu_script_asks_only_for_workloads_the_benchmark_has():
  """scripts/gpu_bench.sh runs in scarce device time: a misspelt workload would cost a call."""
  script = (pathlib.Path(bench.__file__).resolve().parents[1] / "scripts/gpu_bench.sh").read_text()
  asked = {name for value in re.findall(r"--only=([\w,]+)", script) for name in value.split(",")}
  assert "cyclegan_b1" in asked and "pix2pix_b1" in asked
  assert asked <= set(bench.STEP_WORKLOADS) | {"experiment"}, asked - set(bench.STEP_WORKLOADS)


def test_a_cpu_sized_workload_runs_through_the_timing_path():
  """The benchmark's own timing path (ahead-of-time compiled chunk, warm-up, timed blocks) on
  experiment:demo's pix2pix, shrunk by `--override`, in the CPU's chunk form (one dispatch per
  step; both forms compute the same steps: tests/test_pix2pix.py); only that it runs and
  reports, never how fast."""
  absl_logger = absl_logging.get_absl_logger()
  level = absl_logger.level   # unparsing resets --verbosity, which sets the absl logger's level
  bench.FLAGS.unparse_flags()
  bench.FLAGS(["bench", "--chunk=dispatch", "--blocks=1",
               f"--override=model.ngf=4,model.ndf=4,{TINY_DATA}"])
  try:
    result = bench.bench_demo("pix2pix", 1)
  finally:
    bench.FLAGS.unparse_flags()
    absl_logger.setLevel(level)   # later tests read INFO records (tests/test_training_infra.py)
  assert result.name == "demo_pix2pix" and result.batch == 4
  assert result.variant.startswith("float32+") and result.variant.endswith("+dispatch")
  assert "model.ngf=4" in result.variant and "data.image_size=32" in result.variant
  assert result.step_s > 0 and result.compile_s > 0


def _with_flags(*args):
  """Runs the body with bench's flags parsed from `args`, then restores them (and the absl
  logger's level, which unparsing resets: later tests read INFO records)."""
  import contextlib  # pylint: disable=import-outside-toplevel

  @contextlib.contextmanager
  def scope():
    absl_logger = absl_logging.get_absl_logger()
    level = absl_logger.level
    bench.FLAGS.unparse_flags()
    bench.FLAGS(["bench", *args])
    try:
      yield
    finally:
      bench.FLAGS.unparse_flags()
      absl_logger.setLevel(level)
  return scope()


# experiment:demo's data shrunk to experiment:smoke's (32 px, 58 images), read in small batches.
TINY_DATA = "data.image_size=32,data.synthetic_scale=0.02,data.stream_prefetch=2"


def test_streamed_and_resident_demo_rows_and_their_ratio(tmp_path, capsys):
  """demo_classifier and demo_classifier_stream through `main` (the prepared data, the stream,
  the one-step program): both report, and their ratio is printed and stored; only that they run,
  never how fast."""
  out = tmp_path / "stream.json"
  with _with_flags("--only=demo_classifier,demo_classifier_stream", "--steps=1", "--blocks=1",
                   f"--override={TINY_DATA},image_size=32", f"--out={out}"):
    bench.main([])
  printed = capsys.readouterr().out
  data = json.loads(out.read_text())
  rows = {r["name"]: r for r in data["results"]}
  assert set(rows) == {"demo_classifier", "demo_classifier_stream"}
  assert all(r["images_per_s"] > 0 and r["batch"] == 32 for r in rows.values())
  ratio = data["stream_ratios"]["demo_classifier"]
  assert ratio == pytest.approx(rows["demo_classifier_stream"]["images_per_s"]
                                / rows["demo_classifier"]["images_per_s"])
  assert f"STREAM demo_classifier: streamed/resident = {ratio:.2f} (images/s)" in printed


def test_a_streamed_translator_row_runs():
  """demo_cyclegan_stream: CycleGAN's source and target classes streamed from disk."""
  with _with_flags("--blocks=1", f"--override={TINY_DATA},model.ngf=4,model.ndf=4"):
    result = bench.translator_workload("demo_cyclegan_stream", 1)()
  assert result.name == "demo_cyclegan_stream" and result.batch == 4
  assert result.step_s > 0 and result.images_per_s > 0
  assert bench.stream_ratios([result.to_json()]) == {}   # no resident twin: no ratio
  assert bench.translator_workload("demo_pix2pix_stream", 1) is not None
  assert bench.translator_workload("pix2pix_stream", 1) is None


def test_stream_memory_measures_each_placement_in_its_own_process():
  """--only=stream_memory at a tiny size and one scale: one row per placement, each run trained
  with its placement in its own process, with positive memory figures; with a second scale (a row
  derived here: the scale loop is the one above) the table gives each placement's growth."""
  result = bench.bench_stream_memory([0.02], 32, 2, compile_cache=True)
  rows = {(r["placement"], r["scale"]): r for r in result["rows"]}
  assert sorted(rows) == [("device", 0.02), ("stream", 0.02)]
  for (placement, _), r in rows.items():
    assert r["trained"] == placement
    assert 0 < r["rss_loaded_mb"] <= r["peak_mb"] and r["maxrss_mb"] > 0
  assert rows["device", 0.02]["images"] == rows["stream", 0.02]["images"] > 0
  bigger = [dict(r, scale=0.04, images=2 * r["images"], peak_mb=r["peak_mb"] + 10)
            for r in result["rows"]]
  table = bench.format_stream_memory(dict(result, rows=result["rows"] + bigger))
  n = rows["device", 0.02]["images"]
  for placement in ("device", "stream"):
    assert f"{placement}: peak " in table and f"(+10 MB) from {n} to {2 * n} images" in table
