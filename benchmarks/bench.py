"""Speed of the compiled training and inference steps, on whatever backend is present.

  python -m benchmarks.bench                   # every step workload at the sizes of the paper
  python -m benchmarks.bench --only=pix2pix_b1 --pix2pix_dtype=bfloat16 --out=b1-bf16.json
  python -m benchmarks.bench --only=experiment # wall time of experiment:paper (one seed), by stage
  python -m benchmarks.bench --only=pix2pix_b1 --chunk=loop   # a chunk as one fori_loop program
  python -m benchmarks.bench --only=demo_classifier,demo_pix2pix,demo_cyclegan --steps=10
                                               # experiment:demo's stages at its sizes (CPU)
  python -m benchmarks.bench --only=demo_classifier,demo_classifier_stream,demo_cyclegan,\
      demo_cyclegan_stream --steps=20          # the same, resident vs streamed from disk
                                               # (config.data.placement), and their ratio
  python -m benchmarks.bench --only=stream_memory --stream_memory_scales=1,8 \
      --stream_memory_size=128                 # host peak RSS of a short classifier run, resident
                                               # vs streamed, as the data set grows
  python -m benchmarks.bench --only=resnet50_seeds1,resnet50_seeds3,resnet50_seeds5
                                               # N classifier seeds in one program, summed img/s
  python -m benchmarks.bench --experiment_workdir=RUN   # the stage times a finished run recorded
  python -m benchmarks.bench --compare=DIR     # one table of every result file in DIR, with the
                                               # PyTorch reference's and the ratios of the goals

(from the repository root; `python benchmarks/bench.py` works too). Each step workload runs the real
trainer's compiled chunk (`fit.compile_chunk`: `steps` steps in one call, or one dispatch per step
on a CPU; device-resident data, donated state) on random data (the demo_* rows: experiment:demo's
own prepared training split; demo_*_stream: the same split streamed from its array_record copy, as
`config.data.placement=stream` reads it); the goals and their targets are data (`goals.json`). It is
compiled ahead of time, so that compile time is reported apart; one chunk warms up (streamed: also
as many steps as the read-ahead holds), then the median of `blocks` timed chunks is the step time.
Memory is the compiled program's own account (arguments + outputs + temporaries, less donated
buffers), which every backend gives, and the allocator's peak where the backend reports one (GPUs,
TPUs; it is the process's peak, so run one workload per process to read it per workload).
`scripts/gpu_bench.sh` runs every GPU measurement, with the PyTorch reference (`torch_reference.py`,
the project lead's), in one go; docs/performance.md records the figures.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

if __package__ in (None, ""):  # `python benchmarks/bench.py`: the repository root on the path
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from cxr_jax import configlib
from cxr_jax import runtime
from cxr_jax.data import dataset
from cxr_jax.models import layers
from cxr_jax.training import classifier
from cxr_jax.training import export
from cxr_jax.training import fit
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training import stream as stream_lib
from cxr_jax.training import translator

STEP_WORKLOADS = ("pix2pix_b1", "pix2pix_b16", "resnet50_rgb", "resnet50_gray",
                  "generator_inference", "cyclegan_b1", "resnet50_seeds1", "resnet50_seeds3",
                  "resnet50_seeds5", "demo_classifier", "demo_pix2pix", "demo_cyclegan",
                  "demo_classifier_stream", "demo_cyclegan_stream")
DEFAULT_WORKLOADS = STEP_WORKLOADS[:5]   # the others are asked for by name
DEMO_WORKLOADS = ("demo_classifier", "demo_pix2pix", "demo_cyclegan")   # CPU-sized
STREAM_SUFFIX = "_stream"   # demo_<stage>_stream: demo_<stage> with its images streamed from disk
OTHER_WORKLOADS = ("experiment", "stream_memory")   # not step workloads: they run processes
SEED_COUNTS = {"resnet50_seeds1": 1, "resnet50_seeds3": 3, "resnet50_seeds5": 5}

FLAGS = flags.FLAGS
flags.DEFINE_list("only", [], f"Workloads to run (default: {DEFAULT_WORKLOADS}; also "
                  f"{STEP_WORKLOADS[5:]}, and <translator>_b<batch> or demo_<translator>"
                  "[_stream] for any translator); "
                  "'experiment' times experiment:paper with one seed; 'stream_memory' measures "
                  "the host memory of resident and streamed training runs.")
flags.DEFINE_integer("blocks", 5, "Timed chunks per workload (the median is reported).")
flags.DEFINE_integer("steps", 0, "Steps per chunk (default: 50 on accelerators, 2 on a CPU).")
flags.DEFINE_integer("resnet_batch", 0, "ResNet-50 batch (default: 256 on accelerators, 8 on CPU).")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype of the ResNet-50 workloads.")
flags.DEFINE_string("pix2pix_dtype", "float32", "Compute dtype of the pix2pix workloads.")
flags.DEFINE_list("override", [], "Config overrides for the step workloads' configs, key=value "
                  "(e.g. flat_optimizer=True); they are added to the variant name.")
flags.DEFINE_integer("profile", 0, "After timing, trace one chunk and print the this many most "
                     "expensive device kernels (needs a GPU or TPU).")
flags.DEFINE_enum("chunk", "auto", ["auto", "loop", "dispatch"],
                  "How a training chunk runs its steps: 'loop' (a lax.fori_loop in one program), "
                  "'dispatch' (one dispatch of a one-step program per step), 'auto' (what training "
                  "uses: loop off the CPU, dispatch on it; fit.loop_on_device).")
flags.DEFINE_string("tag", "", "Label added to this run's variant name (e.g. the XLA flags tried).")
flags.DEFINE_bool("channel_padding", True, "Pad 1- and 2-channel first convolutions to 8 "
                  "channels on GPUs (models/layers.py); --nochannel_padding times the step "
                  "without it (variant '+nopad').")
flags.DEFINE_string("seeds_mode", "", "How resnet50_seeds<N> batches its seeds: 'vmap' or 'map' "
                    "(default: what config.seeds_in_one_program='auto' picks on this backend).")
flags.DEFINE_integer("seeds_batch", 0, "Per-seed batch of resnet50_seeds<N> (default: the "
                     "experiment's classifier batch, 64; 8 on a CPU).")
flags.DEFINE_string("experiment_workdir", "", "Report the per-stage wall times recorded in this "
                    "experiment workdir's stages/*.json (a finished or running run) and exit.")
flags.DEFINE_string("experiment_variant", "paper", "Variant of configs/experiment.py to time.")
flags.DEFINE_list("experiment_args", [], "Extra main.py flags for the experiment workload, e.g. "
                  "--config.pix2pix.num_epochs=10 (the variant is then not the paper's).")
flags.DEFINE_integer("experiment_timeout", 0, "Stop the experiment after this many seconds and "
                     "report the stages that finished (0: no limit).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
flags.DEFINE_string("compare", "", "Folder of result files (this command's JSON and "
                    "torch_reference.py's): print one table with the goals' ratios and exit.")
flags.DEFINE_list("stream_memory_scales", ["1", "8"], "stream_memory: the embedded synthetic "
                  "default's data.synthetic_scale values measured (1: 2,905 images).")
flags.DEFINE_integer("stream_memory_size", 128, "stream_memory: data.image_size of the run.")
flags.DEFINE_integer("stream_memory_steps", 10, "stream_memory: training steps of each run.")

GOALS_FILE = pathlib.Path(__file__).resolve().parent / "goals.json"


@dataclasses.dataclass
class Result:
  name: str
  variant: str
  batch: int
  compile_s: float
  step_s: float
  step_s_min: float
  step_s_max: float
  program_memory_gb: float | None
  peak_memory_gb: float | None

  @property
  def steps_per_s(self) -> float:
    return 1.0 / self.step_s

  @property
  def images_per_s(self) -> float:
    return self.batch / self.step_s

  def to_json(self) -> dict:
    return dict(dataclasses.asdict(self), steps_per_s=self.steps_per_s,
                images_per_s=self.images_per_s)


def _peak_memory_gb() -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def _program_memory_gb(compiled) -> float | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if m is None:
    return None
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2**30


def _variant(dtype: str) -> str:
  parts = [dtype]
  if os.environ.get("XLA_FLAGS"):
    parts.append("xla_flags")
  parts += FLAGS.override
  if not FLAGS.channel_padding:
    parts.append("nopad")
  if FLAGS.chunk != "auto":
    parts.append(FLAGS.chunk)
  if FLAGS.tag:
    parts.append(FLAGS.tag)
  return "+".join(parts)


def _apply_overrides(config) -> None:
  values = {}
  for item in FLAGS.override:
    key, _, value = item.partition("=")
    try:
      values[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      values[key] = value
  config.update_from_flattened_dict(values)  # dotted keys, e.g. model.ngf


def _time_chunks(name: str, variant: str, batch: int, steps: int, jitted, state,
                 args: tuple) -> Result:
  """`jitted(state, *args)` runs one chunk of `steps` steps and returns (state, ...)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(state, *args).compile()
  compile_s = time.perf_counter() - t0
  return _time_run(name, variant, batch, steps, lambda st: compiled(st, *args)[0], state,
                   compile_s, compiled)


def _time_run(name: str, variant: str, batch: int, steps: int, run: Callable[[Any], Any], state,
              compile_s: float, compiled, warmup: int = 1) -> Result:
  """`run(state) -> state` runs one chunk of `steps` steps of the already `compiled` program;
  `warmup` chunks run untimed first."""
  for _ in range(warmup):                  # warm-up: first execution, allocations
    state = run(state)
  jax.block_until_ready(state)
  times = []
  for _ in range(FLAGS.blocks):
    t0 = time.perf_counter()
    state = run(state)
    jax.block_until_ready(state)
    times.append((time.perf_counter() - t0) / steps)
  if FLAGS.profile:
    _profile(name, steps, run, state)
  return Result(name, variant, batch, compile_s, statistics.median(times), min(times), max(times),
                _program_memory_gb(compiled), _peak_memory_gb())


def _profile(name: str, steps: int, run, state) -> None:
  """Where the device time of one chunk goes: the costliest kernels, per step."""
  trace_dir = tempfile.mkdtemp(prefix="cxr-bench-trace-")
  with jax.profiler.trace(trace_dir):
    jax.block_until_ready(run(state))
  paths = list(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
  if not paths:
    print(f"profile {name}: no trace written")
    return
  data = jax.profiler.ProfileData.from_file(str(paths[0]))
  per_kernel: dict[str, list[float]] = {}
  spans = []
  lines = [line for plane in data.planes if plane.name.startswith("/device:")
           for line in plane.lines]
  streams = [line for line in lines if "stream" in line.name.lower()] or lines
  for line in streams:   # a stream's name lists its activities, e.g. "Stream #14(Memset,Compute)"
    for ev in line.events:
      per_kernel.setdefault(ev.name, []).append(ev.duration_ns)
      spans.append((ev.start_ns, ev.end_ns))
  if not spans:
    print(f"profile {name}: no device kernels in the trace")
    return
  busy = sum(sum(v) for v in per_kernel.values())
  wall = max(e for _, e in spans) - min(s for s, _ in spans)
  count = sum(len(v) for v in per_kernel.values())
  print(f"profile {name}: {count / steps:.0f} kernels per step, kernel time "
        f"{busy / steps / 1e3:.0f} us per step, device span {wall / steps / 1e3:.0f} us per step")
  top = sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:FLAGS.profile]
  for kernel, durations in top:
    print(f"  {sum(durations) / steps / 1e3:8.1f} us/step {len(durations) / steps:6.1f}x "
          f"{sum(durations) / busy:6.1%}  {kernel[:110]}")


CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _time_trainer(name: str, variant: str, batch: int, steps: int, trainer,
                  data: tuple[Any, ...], stream_options: dict | None = None) -> Result:
  """The trainer's own training chunk, as `fit` compiles it, `steps` steps per call (`--chunk`:
  in one program or one dispatch per step). Memory is that of the compiled program: the whole
  chunk, or one step.

  `stream_options` (`stream.options(config.data)`): a streamed run instead (`_time_stream`);
  `data` are then the images as `data.records` views of the prepared copy on disk."""
  if stream_options is not None:
    return _time_stream(name, variant, batch, steps, trainer, data, **stream_options)
  state = fit.place_state(trainer.init_state(), trainer.mesh)
  data_dev = mesh_lib.put_replicated(data, trainer.mesh)
  on_device = {"auto": None, "loop": True, "dispatch": False}[FLAGS.chunk]
  t0 = time.perf_counter()
  chunk, compiled = fit.compile_chunk(trainer, steps, on_device=on_device).compiled(state,
                                                                                      data_dev)
  compile_s = time.perf_counter() - t0
  return _time_run(name, variant, batch, steps,
                   lambda st: chunk(st, data_dev, np.int32(steps))[0], state, compile_s, compiled)


def _time_stream(name: str, variant: str, batch: int, steps: int, trainer, data: tuple[Any, ...],
                 *, stream_threads: int, stream_prefetch: int) -> Result:
  """A streamed run's steps, as `fit.fit` runs them for `config.data.placement='stream'`: a
  `stream.Stream` (grain: each step's batch indices drawn on the host, its rows read from the
  array_record copy and decoded on `stream_threads` threads, `stream_prefetch` batches ahead, put
  on the devices) feeding the one-step program `fit.compile_chunk(..., batch_spec=...)` builds,
  one dispatch per step with that step's batch.

  Compilation is timed apart (the stream is already open: its readers start meanwhile). The
  warm-up is the first chunk plus as many steps as the read-ahead holds, so the timed steps do not
  take the batches read during compilation and start-up; where reading is slower than the step
  the read-ahead still refills a little during the timed steps, an error of at most
  `stream_prefetch` batches over `blocks * steps` timed steps (ask for more steps to shrink it).
  `--chunk` does not apply: a streamed step is always a dispatch of its own, as in `fit`."""
  init = trainer.init_state()
  state = fit.place_state(init, trainer.mesh)
  warmup = 1 + -(-stream_prefetch // steps)
  total = steps * (warmup + FLAGS.blocks + (1 if FLAGS.profile else 0))
  stream = stream_lib.Stream(trainer, data, rng=init.rng, batch_size=batch, total_steps=total,
                             threads=stream_threads, prefetch=stream_prefetch)
  stream.open(0)
  try:
    t0 = time.perf_counter()
    chunk, compiled = fit.compile_chunk(trainer, steps, batch_spec=stream.spec).compiled(state,
                                                                                        stream)
    compile_s = time.perf_counter() - t0
    return _time_run(name, variant, batch, steps,
                     lambda st: chunk(st, stream, np.int32(steps))[0], state, compile_s,
                     compiled, warmup=warmup)
  finally:
    stream.close()


def bench_translator(name: str, batch: int, steps: int) -> Result:
  """configs/<name>.py's default (pix2pix: the paper's; CycleGAN: the reference's, ResNet 9-block
  generators, pools of 50), 256 px, at `batch`, on 939 normal and 153 COVID images (the paper's
  training split)."""
  config = configlib.load_config_file(CONFIGS / f"{name}.py")
  config.batch_size = batch
  config.compute_dtype = FLAGS.pix2pix_dtype
  _apply_overrides(config)
  mesh = mesh_lib.make_mesh()
  rng = np.random.default_rng(0)
  normal = rng.integers(0, 256, (939, 256, 256, 1), dtype=np.uint8)   # the paper's train split
  covid = rng.integers(0, 256, (153, 256, 256, 1), dtype=np.uint8)
  model = translator.find(name)(config, image_size=256, steps_per_epoch=len(normal) // batch,
                                mesh=mesh)
  return _time_trainer(f"{name}_b{batch}", _variant(FLAGS.pix2pix_dtype), batch, steps, model,
                       (normal, covid))


def translator_workload(name: str, steps: int) -> Callable[[], Result] | None:
  """Any translator, by name: `<translator>_b<batch>` (configs/<translator>.py's default at
  256 px) or `demo_<translator>` (its experiment:demo block); None for other names."""
  match = re.fullmatch(r"([a-z][a-z0-9_]*?)_b(\d+)", name)
  if match and (CONFIGS / f"{match[1]}.py").exists():
    return lambda: bench_translator(match[1], int(match[2]), steps)
  stage = name.removeprefix("demo_")
  placement = "stream" if stage.endswith(STREAM_SUFFIX) else "device"
  stage = stage.removesuffix(STREAM_SUFFIX)
  if name.startswith("demo_") and (CONFIGS / f"{stage}.py").exists():
    return lambda: bench_demo(stage, steps, placement)
  return None


def bench_demo(stage: str, steps: int, placement: str = "device") -> Result:
  """One of experiment:demo's stages at its own sizes (64 px images, small networks, batch 4 or
  32: what a CPU trains), on experiment:demo's own training split: the embedded synthetic default
  at its size and scale, prepared (array_record copy, cached) and split as a run does
  (`dataset.load_splits`); the classifier trains on the whole split, a translator on its source
  and target classes.

  `placement` is `config.data.placement`: 'device' (`demo_<stage>`: the split in memory, on the
  devices, each batch gathered there) or 'stream' (`demo_<stage>_stream`: the split as views of
  the prepared copy on disk, each step's batch read by the stream a `--config.data.placement=
  stream` run reads, with config.data's reader threads and read-ahead: `_time_stream`). Both
  read the same images and train on the same batches, so their ratio is the cost of streaming.
  `--override=data.<key>=...` changes the data (e.g. data.image_size, data.synthetic_scale)."""
  config = configlib.load_config_file(CONFIGS / "experiment.py", "demo")
  block = config[stage]
  block.data = config.data
  _apply_overrides(block)
  block.data.placement = placement
  train = dataset.load_splits(block.data)["train"]
  mesh = mesh_lib.make_mesh()
  size = block.data.image_size
  if stage == "classifier":
    setup = classifier.run_setup(block, train)
    model = classifier.Classifier(block, class_names=train.class_names,
                                  steps_per_epoch=setup.steps_per_epoch,
                                  total_steps=setup.total_steps, mesh=mesh,
                                  weights=setup.weights, schedule_epoch=setup.schedule_epoch)
    data = (train.images, train.labels.astype(np.int32))
  else:
    data = (train.of_class(block.source_class).images, train.of_class(block.target_class).images)
    model = translator.find(stage)(block, image_size=size,
                                   steps_per_epoch=len(data[0]) // block.batch_size, mesh=mesh)
  name = f"demo_{stage}" + (STREAM_SUFFIX if placement == "stream" else "")
  return _time_trainer(name, _variant(block.compute_dtype), block.batch_size, steps, model, data,
                       stream_lib.options(block.data) if placement == "stream" else None)


def stream_ratios(results: list[dict]) -> dict[str, float]:
  """{demo_<stage>: streamed images/s / resident images/s} for every pair of rows (a row and its
  `_stream` twin) among `results` (the last of each name)."""
  rate = {r["name"]: r["images_per_s"] for r in results}
  return {name.removesuffix(STREAM_SUFFIX): rate[name] / rate[name.removesuffix(STREAM_SUFFIX)]
          for name in rate
          if name.endswith(STREAM_SUFFIX) and name.removesuffix(STREAM_SUFFIX) in rate}


def bench_resnet(channels: int, batch: int, steps: int) -> Result:
  config = configlib.load_config_file(CONFIGS / "classifier.py", "scratch")
  config.batch_size = batch
  config.compute_dtype = FLAGS.dtype
  config.model.in_channels = channels
  _apply_overrides(config)
  mesh = mesh_lib.make_mesh()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (max(2048, batch * 2), 256, 256, 1), dtype=np.uint8)
  labels = rng.integers(0, 3, len(images)).astype(np.int32)
  spe = len(images) // batch
  model = classifier.Classifier(config, class_names=("COVID", "NORMAL", "VIRAL_PNEUMONIA"),
                                steps_per_epoch=spe, total_steps=spe * 100, mesh=mesh)
  name = "resnet50_rgb" if channels == 3 else "resnet50_gray"
  return _time_trainer(name, _variant(FLAGS.dtype), batch, steps, model, (images, labels))


def bench_resnet_seeds(num_seeds: int, batch: int, steps: int) -> Result:
  """N seeds of the experiment's classifier (configs/experiment.py's paper block: 224 px, batch
  64, bf16) as one program (`fit.SeedStack`, what `training/seeds.py` runs); the batch
  reported is summed over seeds, so images/s is the program's total."""
  config = configlib.load_config_file(CONFIGS / "experiment.py", "paper").classifier
  config.batch_size = batch
  _apply_overrides(config)
  mode = FLAGS.seeds_mode or fit.seeds_mode(config) or "map"
  mesh = mesh_lib.make_mesh()
  rng = np.random.default_rng(0)
  size = config.image_size
  images = rng.integers(0, 256, (max(2048, batch * 2), size, size, 1), dtype=np.uint8)
  labels = rng.integers(0, 3, len(images)).astype(np.int32)
  spe = len(images) // batch
  trainers = [classifier.Classifier(fit.seed_config(config, seed),
                                    class_names=("COVID", "NORMAL", "VIRAL_PNEUMONIA"),
                                    steps_per_epoch=spe, total_steps=spe * 100, mesh=mesh)
              for seed in range(num_seeds)]
  stack = fit.SeedStack(trainers, mode=mode, best_metric="macro_f1", export_dirs=[""] * num_seeds,
                        writer_dirs=[""] * num_seeds)
  return _time_trainer(f"resnet50_seeds{num_seeds}",
                       _variant(f"{config.compute_dtype}+{mode}"), batch * num_seeds, steps,
                       stack, (images, labels))


def bench_generator_inference(batch: int, steps: int) -> Result:
  """Synthesis throughput: `steps` batches translated per timed call (a scan over batches), with
  the translation function every exported generator runs."""
  config = configlib.load_config_file(CONFIGS / "pix2pix.py")
  config.compute_dtype = FLAGS.pix2pix_dtype
  mesh = mesh_lib.make_mesh()
  model = translator.find("pix2pix")(config, image_size=256, steps_per_epoch=1, mesh=mesh)
  state = model.init_state()
  inference = model.export_meta()["inference"]
  images = mesh_lib.put_batch(np.random.default_rng(0).integers(
      0, 256, (batch, 256, 256, 1), dtype=np.uint8), mesh)
  keys = jax.vmap(jax.random.key)(jnp.arange(batch))

  def chunk(carry, params, stats):
    def body(c, _):
      key_data = jax.random.key_data(jax.vmap(lambda k: jax.random.fold_in(k, c))(keys))
      out = export.translate_images(model.gen, inference, params, stats, images, key_data)
      return c + 1, jnp.sum(out, dtype=jnp.uint32)  # every image is used
    return jax.lax.scan(body, carry, None, length=steps)

  return _time_chunks("generator_inference", _variant(FLAGS.pix2pix_dtype), batch, steps,
                      jax.jit(chunk), jnp.zeros((), jnp.uint32), (state.g.params, state.g.stats))


def bench_experiment() -> dict:
  """Wall time of each stage of experiment:<variant> with one seed and one split, in a fresh
  workdir.

  With --experiment_timeout the run is stopped at that point and the stages that finished are
  reported (`complete: false`)."""
  workdir = pathlib.Path(tempfile.mkdtemp(prefix="cxr-bench-exp-"))
  cmd = [sys.executable, str(CONFIGS.parent / "main.py"),
         f"--config={CONFIGS / 'experiment.py'}:{FLAGS.experiment_variant}", "--config.seeds=(0,)",
         "--config.splits=1", f"--workdir={workdir}", *FLAGS.experiment_args]
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, start_new_session=True)
  try:
    rc = proc.wait(timeout=FLAGS.experiment_timeout or None)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rc = None
  total = time.perf_counter() - t0
  return {"variant": FLAGS.experiment_variant, "args": list(FLAGS.experiment_args),
          "returncode": rc, "complete": rc == 0, "stages_s": experiment_stages(workdir),
          "total_s": total, "workdir": str(workdir)}


def experiment_stages(workdir: str | os.PathLike) -> dict[str, float]:
  """{stage: seconds} from an experiment workdir's completion records (`stages/*.json`, written
  by pipeline/experiment.py), in the order the stages finished."""
  records = [json.loads(p.read_text()) for p in pathlib.Path(workdir, "stages").glob("*.json")]
  return {r["stage"]: float(r["seconds"]) for r in records}


def recorded_experiment(workdir: str | os.PathLike) -> dict:
  """The `experiment` entry of a run made elsewhere: its config's name and its stage times."""
  workdir = pathlib.Path(workdir)
  stages = experiment_stages(workdir)
  if not stages:
    raise app.UsageError(f"{workdir}/stages: no stage records (is it an experiment workdir?)")
  config = workdir / "config.json"
  name = json.loads(config.read_text()).get("name", "?") if config.exists() else "?"
  return {"variant": name.removeprefix("experiment-"), "args": [f"(recorded in {workdir})"],
          "complete": (workdir / "report.md").exists(), "stages_s": stages,
          "total_s": sum(stages.values()), "workdir": str(workdir)}


# ------------------------------------------------------------------- host memory of streaming

STREAM_MEMORY_PLACEMENTS = ("device", "stream")


def _memory_config(placement: str, scale: float, size: int, steps: int):
  """experiment:demo's classifier (small ResNet, batch 32, input at most 48 px) on the embedded
  synthetic default at `size` px and `scale`, trained `steps` steps (one epoch of the schedule:
  one validation and one checkpoint, at the end) with `placement`."""
  config = configlib.load_config_file(CONFIGS / "experiment.py", "demo")
  block = config.classifier
  block.data = config.data
  block.data.update(image_size=size, synthetic_scale=scale, placement=placement)
  block.image_size = min(block.image_size, size)
  block.train_steps, block.num_epochs, block.warmup_epochs = steps, 1, 0
  block.steps_per_call = block.log_every = steps
  block.freeze_backbone_epochs = 0
  return block


def _status_mb(key: str) -> float:
  """A `VmRSS` / `VmHWM` line of /proc/self/status, in MB."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(key + ":"):
      return int(line.split()[1]) / 1024
  raise KeyError(key)


def stream_memory_child(placement: str, scale: str, size: str, steps: str, out: str,
                        compile_cache: str = "0") -> None:
  """One measurement, in a process of its own (`stream_memory` starts it): loads the splits as a
  run of `placement` does, then trains the classifier (`classifier.train`: what `main.py` runs,
  checkpoint, validation and export included); writes its memory to the JSON file `out`.
  `compile_cache` '1': the persistent compilation cache is used (see `bench_stream_memory`)."""
  from cxr_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  if compile_cache == "1":
    runtime.enable_compilation_cache()
  config = _memory_config(placement, float(scale), int(size), int(steps))
  rss_start = _status_mb("VmRSS")
  t0 = time.perf_counter()
  splits = dataset.load_splits(config.data)
  load_s = time.perf_counter() - t0
  rss_loaded, peak_loaded = _status_mb("VmRSS"), _status_mb("VmHWM")
  run = workdir_lib.prepare(pathlib.Path(out).with_suffix(".run"), config)
  t0 = time.perf_counter()
  classifier.train(config, run, splits["train"], splits["val"], fit.make_mesh(config))
  train_s = time.perf_counter() - t0
  pathlib.Path(out).write_text(json.dumps({
      "placement": placement, "scale": float(scale), "size": int(size), "steps": int(steps),
      "images": sum(len(v) for v in splits.values()), "train_images": len(splits["train"]),
      "trained": fit.placement_of((splits["train"].images,)),
      "rss_start_mb": rss_start, "rss_loaded_mb": rss_loaded, "peak_loaded_mb": peak_loaded,
      "peak_mb": _status_mb("VmHWM"), "load_s": load_s, "train_s": train_s}))


def _prepare_memory_data(scale: float, size: int, cache: pathlib.Path) -> None:
  """The synthetic database and its array_record copy, built once in `cache` (here, not in a
  measured process: building is not what is measured)."""
  from cxr_jax.data import tfds_builder  # pylint: disable=import-outside-toplevel
  data = _memory_config("device", scale, size, 1).data
  data.cache_dir = str(cache)
  tfds_builder.prepare(dataset.resolve_source(data), size, cache)


def bench_stream_memory(scales: list[float], size: int, steps: int, *,
                        compile_cache: bool = False) -> dict:
  """The host's peak memory (RSS) of a short classifier training run on the embedded synthetic
  default at each of `scales`, resident (`device`) and streamed (`stream`).

  Each (placement, scale) runs in a fresh process (`stream_memory_child`) whose peak RSS is its
  own (`VmHWM`, and the kernel's `ru_maxrss` of it, from `wait4`), so nothing one run holds shows
  in another's. The data of a scale are built first, here, into a cache folder of that scale
  under a temporary folder (`CXR_JAX_CACHE` of both of its runs, which only read it: the
  prepared copy's cache key holds the source's path, so a copy elsewhere would be built again
  and its building measured); the streamed run writes the record index there, as a first
  streamed run does. Resident host memory grows with the data set (all images decoded in
  memory, and on a CPU the devices' copy too); streamed, it should not.

  Compiling takes host memory too (on 2 CPU cores, 32 px: ~1.25 GB peak compiling, ~0.83 GB with
  every program from the persistent cache), so every run compiles alike: without the persistent
  compilation cache (a user's first run), unless `compile_cache` (the tests: faster, and the
  runs after the first then read programs the first compiled)."""
  root = pathlib.Path(tempfile.mkdtemp(prefix="cxr-bench-stream-memory-"))
  rows = []
  try:
    for scale in scales:
      cache = root / f"scale{scale:g}" / "cache"
      t0 = time.perf_counter()
      _prepare_memory_data(scale, size, cache)
      print(f"stream_memory: data of scale {scale:g} at {size} px prepared in "
            f"{time.perf_counter() - t0:.0f} s", flush=True)
      for placement in STREAM_MEMORY_PLACEMENTS:
        out = root / f"scale{scale:g}" / f"{placement}.json"
        code = ("import sys; from benchmarks import bench; "
                "bench.stream_memory_child(*sys.argv[1:])")
        env = dict(os.environ, CXR_JAX_CACHE=str(cache),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(CONFIGS.parent),
                                                            os.environ.get("PYTHONPATH")])))
        if not compile_cache:
          env.pop("JAX_COMPILATION_CACHE_DIR", None)
        with open(out.with_suffix(".log"), "w") as log:
          proc = subprocess.Popen([sys.executable, "-c", code, placement, str(scale), str(size),
                                   str(steps), str(out), str(int(compile_cache))],
                                  cwd=CONFIGS.parent, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
          _, status, usage = os.wait4(proc.pid, 0)
          proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
          tail = "".join(out.with_suffix(".log").read_text().splitlines(True)[-20:])
          raise RuntimeError(f"stream_memory {placement} scale {scale:g} failed "
                             f"(exit {proc.returncode}):\n{tail}")
        row = json.loads(out.read_text())
        row["maxrss_mb"] = usage.ru_maxrss / 1024   # KiB on Linux
        rows.append(row)
        print(f"stream_memory {placement} scale {scale:g}: {row['images']} images, peak "
              f"{row['peak_mb']:.0f} MB", flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  return {"size": size, "steps": steps, "rows": rows}


def format_stream_memory(result: dict) -> str:
  """The table of `bench_stream_memory`, and how each placement's peak grows with the data."""
  lines = [f"stream_memory: host RSS of a {result['steps']}-step classifier run (experiment:demo's"
           f" classifier) at {result['size']} px",
           f"{'placement':<11}{'scale':>7}{'images':>8}{'images MB':>11}{'RSS loaded MB':>15}"
           f"{'peak MB':>9}{'maxrss MB':>11}{'load s':>8}{'train s':>9}"]
  for r in result["rows"]:
    lines.append(f"{r['placement']:<11}{r['scale']:>7g}{r['images']:>8}"
                 f"{r['images'] * r['size'] ** 2 / 1e6:>11.1f}{r['rss_loaded_mb']:>15.0f}"
                 f"{r['peak_mb']:>9.0f}{r['maxrss_mb']:>11.0f}{r['load_s']:>8.1f}"
                 f"{r['train_s']:>9.1f}")
  for placement in STREAM_MEMORY_PLACEMENTS:
    rows = sorted((r for r in result["rows"] if r["placement"] == placement),
                  key=lambda r: r["scale"])
    if len(rows) > 1:
      first, last = rows[0], rows[-1]
      lines.append(f"{placement}: peak {first['peak_mb']:.0f} -> {last['peak_mb']:.0f} MB "
                   f"({last['peak_mb'] - first['peak_mb']:+.0f} MB) from {first['images']} to "
                   f"{last['images']} images")
  return "\n".join(lines)


# ------------------------------------------------------------------------------- comparison


def load_results(folder: str | os.PathLike) -> dict:
  """Every result file in `folder`: this module's JSON (one per run) and torch_reference.py's."""
  ours, torch, experiments, devices = [], [], [], set()
  for path in sorted(pathlib.Path(folder).glob("*.json")):
    data = json.loads(path.read_text())
    if isinstance(data, list):                        # torch_reference.py --out
      torch += [r for r in data if r.get("framework") == "torch"]
      devices |= {r.get("device", "?") for r in data}
    elif isinstance(data, dict) and "results" in data:
      ours += data["results"]
      if "device_kind" in data:
        devices.add(data["device_kind"])
      if "experiment" in data:
        experiments.append(data["experiment"])
  return {"ours": ours, "torch": torch, "experiments": experiments, "devices": sorted(devices)}


def _torch_name(r: dict) -> str:
  mode = "torch.compile" if r["compiled"] else "eager"
  prec = "bf16 autocast" + (" + channels_last" if r["channels_last"] else "") if r["bf16"] \
      else "fp32/tf32"
  return f"torch {mode}, {prec}"


def goals(results: dict, goals_file: str | os.PathLike = GOALS_FILE) -> list[dict]:
  """The speed goals (`goals.json`): our best variant against the best reference row measured
  alongside it that matches the goal's `reference` fields."""
  ours, torch = results["ours"], results["torch"]

  def best(rows, key):
    return max(rows, key=key) if rows else None

  out = []
  for goal in json.loads(pathlib.Path(goals_file).read_text())["goals"]:
    mine = best([r for r in ours if r["name"] == goal["workload"]], lambda r: r["images_per_s"])
    ref = best([r for r in torch if all(r.get(k) == v for k, v in goal["reference"].items())],
               lambda r: r["images_per_s"])
    if mine is None or ref is None:
      continue
    ratio = mine["images_per_s"] / ref["images_per_s"]
    out.append({"goal": goal["label"], "ours": f"{mine['name']} {mine['variant']}",
                "ours_images_per_s": mine["images_per_s"], "reference": _torch_name(ref),
                "reference_images_per_s": ref["images_per_s"], "ratio": ratio,
                "target": goal["target"], "met": ratio >= goal["target"]})
  return out


def format_table(results: dict) -> str:
  lines = [f"devices: {', '.join(results['devices']) or '?'}",
           f"{'workload':<24}{'implementation':<42}{'batch':>6}{'steps/s':>9}{'images/s':>10}"
           f"{'compile s':>11}{'prog GB':>8}{'peak GB':>8}"]
  gb = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
  rows = []
  for r in results["ours"]:
    rows.append((r["name"], f"cxr-jax {r['variant']}", r["batch"], r["steps_per_s"],
                 r["images_per_s"], f"{r['compile_s']:.1f}", gb(r.get("program_memory_gb")),
                 gb(r.get("peak_memory_gb"))))
  for r in results["torch"]:
    name = f"{r['workload']}_b{r['batch']}" if r["workload"] == "pix2pix" else (
        "resnet50_rgb" if r["workload"] == "resnet50" else r["workload"])
    rows.append((name, _torch_name(r), r["batch"], 1e3 / r["step_ms"], r["images_per_s"],
                 f"{r['warmup_s']:.0f} (w-up)", "-", "-"))
  for name, impl, batch, sps, ips, comp, prog, peak in sorted(rows, key=lambda t: (t[0], -t[4])):
    lines.append(f"{name:<24}{impl:<42}{batch:>6}{sps:>9.1f}{ips:>10.1f}{comp:>11}{prog:>8}"
                 f"{peak:>8}")
  for g in goals(results):
    lines.append(f"GOAL {g['goal']}: {g['ours_images_per_s']:.0f} vs "
                 f"{g['reference_images_per_s']:.0f} ({g['reference']}) = {g['ratio']:.2f}x, "
                 f"target {g['target']}x: "
                 f"{'met' if g['met'] else 'NOT met'}")
  for e in results["experiments"]:
    state = "complete" if e["complete"] else "stopped early"
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in e["stages_s"].items())
    lines.append(f"experiment:{e['variant']} one seed {' '.join(e['args'])} ({state}, "
                 f"{e['total_s']:.0f} s "
                 f"in all): {stages}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------- main


def main(argv):
  del argv
  if FLAGS.experiment_workdir:
    recorded = recorded_experiment(FLAGS.experiment_workdir)
    if FLAGS.out:
      pathlib.Path(FLAGS.out).write_text(json.dumps({"results": [], "experiment": recorded},
                                                    indent=2))
    print(format_table({"ours": [], "torch": [], "devices": [], "experiments": [recorded]}))
    return
  if FLAGS.compare:
    results = load_results(FLAGS.compare)
    print(format_table(results))
    if FLAGS.out:
      pathlib.Path(FLAGS.out).write_text(json.dumps(dict(results, goals=goals(results)), indent=2))
    return
  chosen = FLAGS.only or list(DEFAULT_WORKLOADS)
  unknown = sorted(name for name in set(chosen) - set(STEP_WORKLOADS) - set(OTHER_WORKLOADS)
                   if translator_workload(name, 0) is None)
  if unknown:
    raise app.UsageError(f"unknown workloads {unknown}; choose from "
                         f"{list(STEP_WORKLOADS) + list(OTHER_WORKLOADS)}")
  out: dict[str, Any] = {"jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                         "results": []}
  steps_chosen = [name for name in chosen if name not in OTHER_WORKLOADS]
  if steps_chosen:  # (initialising the backend here would hold the GPU the experiment needs)
    if not FLAGS.channel_padding:   # read when the convolutions are traced
      layers.ALIGNED_BACKENDS = frozenset()
    runtime.enable_compilation_cache()
    on_cpu = jax.default_backend() == "cpu"
    steps = FLAGS.steps or (2 if on_cpu else 50)
    resnet_batch = FLAGS.resnet_batch or (8 if on_cpu else 256)
    workloads = {
        "pix2pix_b1": lambda: bench_translator("pix2pix", 1, steps),
        "pix2pix_b16": lambda: bench_translator("pix2pix", 16, steps),
        "resnet50_rgb": lambda: bench_resnet(3, resnet_batch, steps),
        "resnet50_gray": lambda: bench_resnet(1, resnet_batch, steps),
        "generator_inference": lambda: bench_generator_inference(4 if on_cpu else 64,
                                                                 1 if on_cpu else 10),
        "cyclegan_b1": lambda: bench_translator("cyclegan", 1, steps),
    }
    for name in DEMO_WORKLOADS:
      workloads[name] = lambda name=name: bench_demo(name.removeprefix("demo_"), steps)
      workloads[name + STREAM_SUFFIX] = lambda name=name: bench_demo(name.removeprefix("demo_"),
                                                                     steps, "stream")
    seeds_batch = FLAGS.seeds_batch or (8 if on_cpu else 64)
    for name, n in SEED_COUNTS.items():
      workloads[name] = lambda n=n: bench_resnet_seeds(n, seeds_batch, steps)
    out["device_kind"] = (f"{jax.device_count()} x {jax.devices()[0].device_kind} "
                          f"({jax.default_backend()})")
    out["steps_per_chunk"] = steps
    for name in steps_chosen:
      r = (workloads.get(name) or translator_workload(name, steps))()
      out["results"].append(r.to_json())
      print(f"{r.name} [{r.variant}]: {r.steps_per_s:.2f} steps/s, {r.images_per_s:.1f} images/s "
            f"(compile {r.compile_s:.1f} s)", flush=True)
    ratios = stream_ratios(out["results"])
    if ratios:
      out["stream_ratios"] = ratios
    for name, ratio in ratios.items():
      print(f"STREAM {name}: streamed/resident = {ratio:.2f} (images/s)", flush=True)
  if "stream_memory" in chosen:
    out["stream_memory"] = bench_stream_memory([float(v) for v in FLAGS.stream_memory_scales],
                                               FLAGS.stream_memory_size, FLAGS.stream_memory_steps)
    print(format_stream_memory(out["stream_memory"]), flush=True)
  if "experiment" in chosen:
    out["experiment"] = bench_experiment()
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(json.dumps(out, indent=2))
  print()
  print(format_table({"ours": out["results"], "torch": [],
                      "devices": [out.get("device_kind", jax.__version__)],
                      "experiments": [out["experiment"]] if "experiment" in out else []}))


if __name__ == "__main__":
  app.run(main)
