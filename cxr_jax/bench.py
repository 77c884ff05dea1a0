"""Speed of the compiled training and inference steps, on whatever backend is present.

  python -m cxr_jax.bench                      # every workload at the sizes of the paper
  python -m cxr_jax.bench --only=pix2pix_b1 --blocks=5 --out=bench.json
  python -m cxr_jax.bench --experiment         # also the wall time of experiment:paper, one seed

Each workload runs the real trainer's multi-step compiled chunk (`lax.scan` over `steps` steps,
device-resident data, donated state) on random data: compile time is reported apart, then the
median of `blocks` timed chunks. Peak device memory comes from the device's allocator statistics
where the backend reports them (GPUs, TPUs). The PyTorch reference for the same workloads is
`torch_reference.py` beside the project lead's material; docs/performance.md records both.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags

from cxr_jax import configlib
from cxr_jax import runtime
from cxr_jax.training import mesh as mesh_lib

FLAGS = flags.FLAGS
flags.DEFINE_list("only", [], "Workloads to run (default: all). "
                  "pix2pix_b1, pix2pix_b16, resnet50_rgb, resnet50_gray, generator_inference")
flags.DEFINE_integer("blocks", 5, "Timed chunks per workload (the median is reported).")
flags.DEFINE_integer("steps", 0, "Steps per chunk (default: 50 on accelerators, 2 on a CPU).")
flags.DEFINE_integer("resnet_batch", 0, "ResNet-50 batch (default: 256 on accelerators, 8 on CPU).")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype of the ResNet-50 workloads.")
flags.DEFINE_string("pix2pix_dtype", "float32", "Compute dtype of the pix2pix workloads.")
flags.DEFINE_bool("experiment", False, "Also time experiment:paper (one seed) stage by stage.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")


@dataclasses.dataclass
class Result:
  name: str
  batch: int
  compile_s: float
  step_s: float
  peak_memory_gb: float | None

  @property
  def steps_per_s(self) -> float:
    return 1.0 / self.step_s

  @property
  def images_per_s(self) -> float:
    return self.batch / self.step_s


def _peak_memory_gb() -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def _time_chunks(name: str, batch: int, steps: int, run) -> Result:
  """`run(state) -> state` executes one chunk of `steps` steps."""
  t0 = time.perf_counter()
  state = run(None)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(FLAGS.blocks):
    t0 = time.perf_counter()
    state = run(state)
    jax.block_until_ready(state)
    times.append((time.perf_counter() - t0) / steps)
  return Result(name, batch, compile_s, statistics.median(times), _peak_memory_gb())


CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def bench_pix2pix(batch: int, steps: int) -> Result:
  from cxr_jax.training import pix2pix  # pylint: disable=import-outside-toplevel
  config = configlib.load_config_file(CONFIGS / "pix2pix.py")
  config.batch_size = batch
  config.compute_dtype = FLAGS.pix2pix_dtype
  mesh = mesh_lib.make_mesh()
  rng = np.random.default_rng(0)
  normal = rng.integers(0, 256, (939, 256, 256, 1), dtype=np.uint8)   # the paper's train split
  covid = rng.integers(0, 256, (153, 256, 256, 1), dtype=np.uint8)
  model = pix2pix.Pix2Pix(config, image_size=256, steps_per_epoch=len(normal) // batch, mesh=mesh)
  n_dev, c_dev = mesh_lib.put_replicated((normal, covid), mesh)

  def run(state):
    state = model.init_state() if state is None else state
    return model.chunk(state, n_dev, c_dev, steps)[0]

  return _time_chunks(f"pix2pix_b{batch}", batch, steps, run)


def bench_resnet(channels: int, batch: int, steps: int) -> Result:
  from cxr_jax.training import classifier  # pylint: disable=import-outside-toplevel
  config = configlib.load_config_file(CONFIGS / "classifier.py", "scratch")
  config.batch_size = batch
  config.compute_dtype = FLAGS.dtype
  config.model.in_channels = channels
  mesh = mesh_lib.make_mesh()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (max(2048, batch * 2), 256, 256, 1), dtype=np.uint8)
  labels = rng.integers(0, 3, len(images)).astype(np.int32)
  spe = len(images) // batch
  model = classifier.Classifier(config, num_classes=3, steps_per_epoch=spe,
                                total_steps=spe * 100, mesh=mesh, weights=None)
  i_dev, l_dev = mesh_lib.put_replicated((images, labels), mesh)

  def run(state):
    state = model.init_state() if state is None else state
    return model.chunk(state, i_dev, l_dev, steps)[0]

  name = "resnet50_rgb" if channels == 3 else "resnet50_gray"
  return _time_chunks(name, batch, steps, run)


def bench_generator_inference(batch: int) -> Result:
  from cxr_jax.training import pix2pix  # pylint: disable=import-outside-toplevel
  config = configlib.load_config_file(CONFIGS / "pix2pix.py")
  mesh = mesh_lib.make_mesh()
  model = pix2pix.Pix2Pix(config, image_size=256, steps_per_epoch=1, mesh=mesh)
  state = model.init_state()
  run_fn = jax.jit(pix2pix.translate_fn(model.gen, config.model.inference_norm))
  images = mesh_lib.put_batch(np.random.default_rng(0).integers(
      0, 256, (batch, 256, 256, 1), dtype=np.uint8), mesh)
  keys = mesh_lib.put_batch(np.asarray(jax.vmap(jax.random.PRNGKey)(np.arange(batch))), mesh)

  def run(_):
    return run_fn(state.g_params, state.g_stats, images, keys)

  return _time_chunks("generator_inference", batch, 1, run)


def bench_experiment() -> dict[str, float]:
  """Wall time of each stage of experiment:paper with one seed, in a fresh workdir."""
  workdir = pathlib.Path(tempfile.mkdtemp(prefix="cxr-bench-exp-"))
  t0 = time.perf_counter()
  subprocess.run([sys.executable, str(CONFIGS.parent / "main.py"),
                  f"--config={CONFIGS / 'experiment.py'}:paper", "--config.seeds=(0,)",
                  f"--workdir={workdir}"], check=True)
  stages = {p.stem: json.loads(p.read_text())["seconds"]
            for p in (workdir / "stages").glob("*.json")}
  stages["total"] = time.perf_counter() - t0
  return stages


def main(argv):
  del argv
  runtime.enable_compilation_cache()
  on_cpu = jax.default_backend() == "cpu"
  steps = FLAGS.steps or (2 if on_cpu else 50)
  resnet_batch = FLAGS.resnet_batch or (8 if on_cpu else 256)
  workloads = {
      "pix2pix_b1": lambda: bench_pix2pix(1, steps),
      "pix2pix_b16": lambda: bench_pix2pix(16, steps),
      "resnet50_rgb": lambda: bench_resnet(3, resnet_batch, steps),
      "resnet50_gray": lambda: bench_resnet(1, resnet_batch, steps),
      "generator_inference": lambda: bench_generator_inference(64 if not on_cpu else 4),
  }
  chosen = FLAGS.only or list(workloads)
  unknown = sorted(set(chosen) - set(workloads))
  if unknown:
    raise app.UsageError(f"unknown workloads {unknown}; choose from {list(workloads)}")
  device = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})"
  results = []
  for name in chosen:
    results.append(workloads[name]())
    r = results[-1]
    print(f"{r.name}: {r.steps_per_s:.2f} steps/s, {r.images_per_s:.1f} images/s "
          f"(compile {r.compile_s:.1f} s)", flush=True)
  out = {"device": device, "jax": jax.__version__, "steps_per_chunk": steps,
         "results": [dict(dataclasses.asdict(r), steps_per_s=r.steps_per_s,
                          images_per_s=r.images_per_s) for r in results]}
  if FLAGS.experiment:
    out["experiment_paper_one_seed_s"] = bench_experiment()
  print(f"\ncxr-jax benchmark on {device}, jax {jax.__version__}")
  print(f"{'workload':<22}{'batch':>6}{'steps/s':>10}{'images/s':>11}{'compile s':>11}"
        f"{'peak GB':>9}")
  for r in results:
    mem = "-" if r.peak_memory_gb is None else f"{r.peak_memory_gb:.1f}"
    print(f"{r.name:<22}{r.batch:>6}{r.steps_per_s:>10.2f}{r.images_per_s:>11.1f}"
          f"{r.compile_s:>11.1f}{mem:>9}")
  if "experiment_paper_one_seed_s" in out:
    for stage, seconds in out["experiment_paper_one_seed_s"].items():
      print(f"experiment:paper {stage:<40}{seconds:>10.0f} s")
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
  app.run(main)
