"""Kill and resume: `main.py` killed with SIGKILL and started again with the same command until it
finishes must end with the parameters of an uninterrupted run, bit for bit.

The in-process resume tests stop a run at a Python call; here the operating system kills it
wherever it is (before the first checkpoint, between checkpoints, during an Orbax asynchronous
write, right after a commit), as a preempted machine or an out-of-memory killer does, two or three
times per run. Kills are timed by watching the checkpoint folders and the log; what a kill actually
hit is read back from the disk, and a kill that missed its window is tried again in the next
process.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cxr_jax.training import checkpoint
from cxr_jax.training import classifier
from cxr_jax.training import export
from cxr_jax.training import translator

from conftest import REPO_ROOT
from conftest import xla_flags_with_devices

PROCESS_TIMEOUT_S = 300  # one smoke run takes well under a minute; CI must never hang
POLL_S = 0.002
TMP = ".orbax-checkpoint-tmp"
PROGRESS = re.compile(r"\b(?:pix2pix|classifier) step (\d+)/(\d+) ")
RESUMED = re.compile(r"Resumed from (\S+) at step (\d+)")

# Overrides of the smoke configs that leave the compiled steps as they are (cached by any earlier
# session): pix2pix logs between its checkpoints (the mid-chunk trigger) and draws samples only at
# the end (resume-safe keys); the classifier's final report skips Grad-CAM (a third of a run).
# `--log_level=info`: every progress report is a console line (the triggers read them).
PIX2PIX = ("pix2pix.py:smoke", ("--config.log_every=2", "--config.sample_every=12",
                                "--log_level=info"))
CLASSIFIER = ("classifier.py:smoke", ("--config.num_gradcam=0", "--log_level=info"))


# --------------------------------------------------------------------------------- processes


class Processes(list):
  """The processes this module started; once closed (the module's teardown), no more start."""
  closed = False


class Process:
  """One `main.py` run. Its output goes to a file (a pipe nobody reads could fill and block it),
  read incrementally so that polling every few milliseconds stays cheap."""

  def __init__(self, argv: list[str], log: pathlib.Path, env: dict[str, str], cwd: pathlib.Path,
               registry: Processes):
    if registry.closed:
      pytest.fail("the tests are over")
    self.log = log
    self._out = open(log, "wb")  # pylint: disable=consider-using-with
    self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    registry.append(self)
    self.deadline = time.monotonic() + PROCESS_TIMEOUT_S
    self._offset, self._partial = 0, b""
    self.progress = 0          # the last step of a progress line
    self.resumed: int | None = None
    self.warnings: list[str] = []

  def _read(self) -> None:
    with open(self.log, "rb") as f:
      f.seek(self._offset)
      data = f.read()
    self._offset += len(data)
    *lines, self._partial = (self._partial + data).split(b"\n")
    for raw in lines:
      line = raw.decode("utf-8", "replace")
      if m := PROGRESS.search(line):
        self.progress = int(m.group(1))
      elif m := RESUMED.search(line):
        self.resumed = int(m.group(2))
      elif "is unreadable" in line:
        self.warnings.append(line)

  def wait_for(self, observe: Callable[[], dict | None], what: str) -> dict | None:
    """Polls `observe` until it returns something (returned) or the process ends (None)."""
    while True:
      self._read()
      seen = observe()
      if seen is not None or self.proc.poll() is not None:
        return seen
      if time.monotonic() > self.deadline:
        self.kill()
        pytest.fail(f"{what}: still running after {PROCESS_TIMEOUT_S} s (log: {self.log})")
      time.sleep(POLL_S)

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGKILL)
    self.proc.wait(timeout=60)
    self._out.close()
    self._read()

  def finish(self, what: str) -> None:
    """Waits for a run that must complete."""
    try:
      self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"{what}: still running after {PROCESS_TIMEOUT_S} s (log: {self.log})")
    self._out.close()
    self._read()
    assert self.proc.returncode == 0, f"{what} failed:\n{self.tail()}"

  def tail(self, n: int = 4000) -> str:
    return self.log.read_text(errors="replace")[-n:]


def start(config: tuple[str, tuple[str, ...]], workdir: pathlib.Path, log: pathlib.Path,
          registry: Processes, cache: pathlib.Path) -> Process:
  name, overrides = config
  argv = [sys.executable, str(REPO_ROOT / "main.py"), f"--config={REPO_ROOT / 'configs' / name}",
          f"--workdir={workdir}", *overrides]
  # The parent's environment (the shared JAX compilation cache) with one CPU device: sharding is
  # other tests' subject, and 4 simulated devices would add Orbax's per-device slicing programs to
  # every process's first save (a third of a run). A dataset cache per chain of processes:
  # concurrent ones never write the same files.
  env = dict(os.environ, JAX_PLATFORMS="cpu", CXR_JAX_CACHE=str(cache),
             XLA_FLAGS=xla_flags_with_devices(1))
  return Process(argv, log, env, workdir.parent, registry)


# ------------------------------------------------------------------------- checkpoint folders


def committed(directory: pathlib.Path) -> list[int]:
  """Steps whose checkpoint Orbax has committed (renamed from its temporary folder)."""
  names = os.listdir(directory) if directory.is_dir() else []
  return sorted(int(n) for n in names if n.isdigit())


def uncommitted(directory: pathlib.Path) -> list[int]:
  """Steps with a temporary folder: a write in progress, or one a kill interrupted."""
  names = os.listdir(directory) if directory.is_dir() else []
  return sorted(int(n.split(".")[0]) for n in names if n.endswith(TMP))


def files_of(directory: pathlib.Path) -> dict[str, int]:
  return {str(f.relative_to(directory)): f.stat().st_size
          for f in sorted(directory.rglob("*")) if f.is_file()}


def corrupt(step_dir: pathlib.Path) -> dict[str, int]:
  """Truncates a committed checkpoint's array data: what a crash leaves on a file system without
  atomic renames, or when the data had not reached the disk. Returns its files and sizes."""
  data = [f for f in step_dir.rglob("*") if f.is_file() and f.parent.name == "d"]
  assert data, f"no array data files in {step_dir}: Orbax's layout changed"
  for f in data:
    f.write_bytes(b"")
  return files_of(step_dir)


def load_checkpoint(directory: pathlib.Path, step: int) -> dict[str, np.ndarray]:
  """Every array of a saved training state (flat keys), read with the project's Checkpointer. The
  restore target comes from the checkpoint's metadata, read by an Orbax manager that is told the
  item's handler (without it, a fresh process gets None)."""
  mgr = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler(),
                              options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    meta = dict(mgr.item_metadata(step))
  finally:
    mgr.close()
  template = {k: jnp.zeros(v.shape, v.dtype) for k, v in meta.items()}
  ckpt = checkpoint.Checkpointer(directory)
  try:
    return {k: np.asarray(v) for k, v in ckpt.restore(step, template).items()}
  finally:
    ckpt.close()


def differing(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
  """Keys whose arrays are not bitwise identical (dtype, shape and every byte)."""
  assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:10]
  return [k for k in sorted(a)
          if not (a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k])
                  and a[k].tobytes() == b[k].tobytes())]


def assert_bitwise_equal(a: dict, b: dict, what: str) -> None:
  bad = differing(a, b)
  assert not bad, f"{what}: {len(bad)} of {len(a)} arrays differ, e.g. {bad[:5]}"


def exported(model) -> dict[str, np.ndarray]:
  """An exported model's parameters and batch statistics, flat."""
  flat = {f"params/{k}": v for k, v in checkpoint.flatten(model.params).items()}
  flat.update({f"stats/{k}": v for k, v in checkpoint.flatten(model.stats).items()})
  return {k: np.asarray(v) for k, v in flat.items()}


# ------------------------------------------------------------------------------- kill points


@dataclasses.dataclass
class KillPoint:
  """When to kill (`trigger`, polled with the process and the step it resumed from; returns what
  it saw) and whether the kill hit its window (`landed`, given that and the steps committed after
  the process died)."""
  name: str
  trigger: Callable[[Process, int, dict], dict | None]
  landed: Callable[[dict, list[int]], bool]
  corrupt_newest: bool = False  # then damage the newest committed checkpoint


def before_first_checkpoint() -> KillPoint:
  def trigger(p, resumed, ctx):
    if resumed == 0 and p.progress > 0 and not committed(ctx["ckdir"]):
      return {"progress": p.progress}
    return None
  return KillPoint("before the first checkpoint", trigger, lambda seen, after: not after)


def during_async_write(min_step: int) -> KillPoint:
  def trigger(p, resumed, ctx):
    steps = [s for s in uncommitted(ctx["ckdir"])
             if s >= max(min_step, resumed + 1) and s not in ctx["tmp_at_start"]]
    return {"writing": steps[0]} if steps else None
  return KillPoint("during an asynchronous checkpoint write", trigger,
                   lambda seen, after: seen["writing"] not in after)


def right_after_commit(**kw) -> KillPoint:
  def trigger(p, resumed, ctx):
    steps = [s for s in committed(ctx["ckdir"])
             if s > resumed and s not in ctx["committed_at_start"]]
    return {"committed": steps[0]} if steps else None
  return KillPoint("right after a checkpoint commit", trigger,
                   lambda seen, after: max(after) == seen["committed"], **kw)


def mid_chunk(checkpoint_every: int, **kw) -> KillPoint:
  """At a progress line between checkpoints: the loop has just queued the next chunk."""
  def trigger(p, resumed, ctx):
    if p.progress > resumed and p.progress % checkpoint_every:
      return {"progress": p.progress}
    return None
  return KillPoint("in the middle of a chunk", trigger,
                   lambda seen, after: max(after, default=0) < seen["progress"], **kw)


def train_with_kills(config, workdir: pathlib.Path, points: list[KillPoint],
                     registry: Processes) -> list[dict]:
  """Starts the run again and again in `workdir`, killing it at each point in turn, until a run
  finishes. Checks that every restart resumes from the newest readable checkpoint the previous
  kill left, with a warning for a damaged one that is kept aside. Returns what each kill saw."""
  ckdir = workdir / "checkpoints"
  pending, log, resume, damaged = list(points), [], None, {}
  for attempt in range(len(points) + 3):
    ctx = {"ckdir": ckdir, "tmp_at_start": set(uncommitted(ckdir)),
           "committed_at_start": set(committed(ckdir))}
    p = start(config, workdir, workdir.parent / f"{workdir.name}-{attempt}.log", registry,
              workdir.parent / "cache")
    what = f"{workdir.name} run {attempt}"
    if not pending:
      p.finish(what)
    else:
      point = pending[0]
      seen = p.wait_for(functools.partial(point.trigger, p, resume or 0, ctx), what)
      if seen is None:
        pytest.fail(f"{what} ended (rc {p.proc.returncode}) before the kill point "
                    f"'{point.name}':\n{p.tail()}")
      p.kill()
      assert p.proc.returncode == -signal.SIGKILL, f"{what} ended by itself:\n{p.tail()}"
    assert p.resumed == resume, (f"{what}: resumed from {p.resumed}, expected {resume} (the newest "
                                 f"readable checkpoint)\n{p.tail()}")
    for step, files in damaged.items():
      assert any(f"{ckdir}/{step} is unreadable" in w and f"{ckdir}/{step}.unreadable" in w
                 for w in p.warnings), f"{what}: no warning about checkpoint {step}\n{p.tail()}"
      assert files_of(ckdir / f"{step}.unreadable") == files, f"{step}.unreadable was changed"
    damaged = {}
    if not pending:
      return log
    after = committed(ckdir)
    seen.update(point=point.name, attempt=attempt, committed_after=after,
                landed=point.landed(seen, after))
    log.append(seen)
    if seen["landed"]:
      pending.pop(0)
    if point.corrupt_newest and seen["landed"] and after:
      damaged[after[-1]] = corrupt(ckdir / str(after[-1]))
      after = after[:-1]
    resume = after[-1] if after else None
  pytest.fail(f"kill points never landed: {[p.name for p in pending]}; seen: {log}")


def assert_no_partial_writes_left(*directories: pathlib.Path) -> None:
  """Each folder a kill left half-written was replaced when its step was saved again."""
  for d in directories:
    assert not uncommitted(d), f"{d}: temporary folders left: {os.listdir(d)}"


class Background:
  """A trainer's killed runs and its uninterrupted run, in a thread: both trainers' chains of
  processes run at once, so that the two cores are busy while each chain waits for its kills."""

  def __init__(self, fn: Callable[[], dict]):
    self.result: dict | None = None
    self.error: BaseException | None = None
    self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
    self.thread.start()

  def _run(self, fn) -> None:
    try:
      self.result = fn()
    except BaseException as e:  # pylint: disable=broad-except  (pytest.fail raises one)
      self.error = e

  def get(self) -> dict:
    self.thread.join(timeout=4 * PROCESS_TIMEOUT_S)  # each process is killed at its deadline
    if self.thread.is_alive():
      pytest.fail("the runs did not finish")
    if self.error is not None:
      raise self.error
    return self.result


def intrude(config, reference: Process, workdir: pathlib.Path, root: pathlib.Path,
            registry: Processes) -> str:
  """Starts the same command on the workdir of the running `reference` once it holds the lock;
  returns the intruder's output, which must be a refusal while the reference runs on."""
  reference.wait_for(lambda: True if "Task classifier, workdir" in reference.log.read_text(
      errors="replace") else None, "the reference's start")
  intruder = start(config, workdir, root / "intruder.log", registry, root / "intruder-cache")
  try:
    intruder.proc.wait(timeout=PROCESS_TIMEOUT_S)
  finally:
    intruder.kill()
  assert reference.proc.poll() is None, "the reference ended before the intruder was refused"
  assert intruder.proc.returncode == 2, intruder.tail()
  return intruder.log.read_text()


def killed_and_uninterrupted(config, root: pathlib.Path, points: list[KillPoint],
                             registry: Processes, intruder: bool = False) -> dict:
  """Runs `config` uninterrupted (in the background) and with kills at `points`; returns both
  workdirs and what the kills saw. With `intruder`, a second run on the uninterrupted run's
  workdir while it runs is refused: the uninterrupted run must still equal the killed one."""
  root.mkdir(parents=True)
  reference = start(config, root / "uninterrupted", root / "uninterrupted.log", registry,
                    root / "reference-cache")
  refusal = (intrude(config, reference, root / "uninterrupted", root, registry) if intruder
             else None)
  log = train_with_kills(config, root / "killed", points, registry)
  reference.finish(f"{root.name} uninterrupted")
  return {"killed": root / "killed", "reference": root / "uninterrupted", "kills": log,
          "intruder": refusal, "reference_pid": reference.proc.pid}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Both trainers' runs, started together by the first test that needs one; every process still
  running at the end of the module (after a failure) is killed."""
  root = tmp_path_factory.mktemp("kill_resume")
  registry = Processes()
  started = {
      "pix2pix": Background(lambda: killed_and_uninterrupted(PIX2PIX, root / "pix2pix", [
          during_async_write(min_step=8),      # leaves 8 half-written: resumes from 4
          right_after_commit(),                # resumes from the step just committed (8)
          mid_chunk(checkpoint_every=4, corrupt_newest=True),  # 8 damaged: resumes from 4
      ], registry)),
      "classifier": Background(lambda: killed_and_uninterrupted(CLASSIFIER, root / "classifier", [
          before_first_checkpoint(),           # nothing to resume: starts afresh
          during_async_write(min_step=10),     # 10 half-written: resumes from 5, replays 10
      ], registry, intruder=True)),
  }
  yield started
  registry.closed = True
  for p in list(registry):
    if p.proc.poll() is None:
      p.proc.kill()
      p.proc.wait(timeout=60)
    p._out.close()  # pylint: disable=protected-access


# ------------------------------------------------------------------------------------ tests


def test_pix2pix_killed_and_resumed_equals_uninterrupted(runs):
  r = runs["pix2pix"].get()
  assert [k["point"] for k in r["kills"] if k["landed"]] == [
      "during an asynchronous checkpoint write", "right after a checkpoint commit",
      "in the middle of a chunk"], r["kills"]
  ck, ref_ck = r["killed"] / "checkpoints", r["reference"] / "checkpoints"
  assert_no_partial_writes_left(ck)
  assert committed(ck) == committed(ref_ck) == [8, 12]
  assert (ck / "8.unreadable").is_dir(), "the damaged checkpoint is kept aside"

  final = load_checkpoint(ck, 12)
  assert_bitwise_equal(final, load_checkpoint(ref_ck, 12),
                       "final training state (G, D, optimisers, step, rng)")
  assert differing(final, load_checkpoint(ref_ck, 8)), "the comparison must see 4 steps' change"
  gen = export.load_generator(r["killed"] / translator.GENERATOR_DIR)
  ref_gen = export.load_generator(r["reference"] / translator.GENERATOR_DIR)
  assert gen.meta["step"] == ref_gen.meta["step"] == 12
  assert_bitwise_equal(exported(gen), exported(ref_gen), "exported generator")


def test_classifier_killed_and_resumed_equals_uninterrupted(runs):
  r = runs["classifier"].get()
  landed = [k for k in r["kills"] if k["landed"]]
  assert [k["point"] for k in landed] == [
      "before the first checkpoint", "during an asynchronous checkpoint write"], r["kills"]
  run, ref = r["killed"], r["reference"]
  assert_no_partial_writes_left(run / "checkpoints")
  model = export.load_classifier(run / classifier.CLASSIFIER_DIR)
  ref_model = export.load_classifier(ref / classifier.CLASSIFIER_DIR)
  best_step = ref_model.meta["best_step"]
  # One manager keeps the latest (5, 10) and the best; the killed run weighed the same steps.
  assert committed(run / "checkpoints") == committed(ref / "checkpoints")
  assert {5, 10, best_step} == set(committed(ref / "checkpoints"))

  final = load_checkpoint(run / "checkpoints", 10)
  assert_bitwise_equal(final, load_checkpoint(ref / "checkpoints", 10), "final training state")
  assert differing(final, load_checkpoint(ref / "checkpoints", 5)), "the comparison can fail"
  assert_bitwise_equal(load_checkpoint(run / "checkpoints", best_step),
                       load_checkpoint(ref / "checkpoints", best_step), "best checkpoint")
  assert model.meta["best_step"] == ref_model.meta["best_step"] == best_step
  assert_bitwise_equal(exported(model), exported(ref_model), "exported classifier")


def test_a_second_run_on_a_busy_workdir_is_refused_and_changes_nothing(runs):
  """The uninterrupted classifier had an intruder (the same command on its workdir) refused in one
  line naming it; it still ends bitwise equal to the killed run (previous test), which had none."""
  r = runs["classifier"].get()
  assert r["intruder"].strip().splitlines() == [
      f"error: {r['reference']} is in use by another run (pid {r['reference_pid']} on host "
      + r["intruder"].split(" on host ", 1)[1].strip()], r["intruder"]
  assert f"lock file {r['reference'] / 'run.lock'}" in r["intruder"]
  assert (r["reference"] / "run.lock").read_text() == ""  # released when the run ended


# --------------------------------------------------- the orderings those kills rely on, in-process


def _state(value: float) -> dict:
  return {"w": jnp.full((3, 2), value, jnp.float32), "step": jnp.int32(int(value))}


def test_a_steps_metrics_are_committed_with_its_checkpoint(tmp_path):
  """The validation result of a step lives in that step's checkpoint: once the step is committed
  its result has been weighed, so a run killed at any point and resumed picks the same best."""
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", best_metric="f1")
  try:
    ckpt.save(5, _state(5.0), metrics={"f1": 0.5})
    ckpt.save(10, _state(10.0), metrics={"f1": 0.25})
  finally:
    ckpt.wait()
    ckpt.close()
  assert committed(tmp_path / "checkpoints") == [5, 10]
  assert (tmp_path / "checkpoints" / "5" / "metrics").is_dir()
  reopened = checkpoint.Checkpointer(tmp_path / "checkpoints", best_metric="f1")
  try:
    assert reopened.best_step() == 5
  finally:
    reopened.close()


def test_steps_replayed_after_an_unreadable_checkpoint_save_again(tmp_path):
  """A resumed run replays steps the best manager may hold already, and a step unreadable twice
  must not be left in place (it would block saving that step)."""
  directory = tmp_path / "checkpoints"
  ckpt = checkpoint.Checkpointer(directory, best_metric="f1")
  ckpt.save(5, _state(5.0), metrics={"f1": 0.1})
  ckpt.save(10, _state(10.0), metrics={"f1": 0.5})
  ckpt.wait()
  ckpt.close()
  for aside in ("10.unreadable", "10.unreadable-1"):
    kept = corrupt(directory / "10")
    ckpt = checkpoint.Checkpointer(directory, best_metric="f1")
    try:
      restored, step = ckpt.restore_latest(_state(0.0))
      assert step == 5 and float(restored["w"][0, 0]) == 5.0
      assert files_of(directory / aside) == kept, "kept aside, unchanged"
      ckpt.save(10, _state(10.0), metrics={"f1": 0.5})  # the replayed step
      ckpt.wait()
      assert ckpt.all_steps() == [5, 10] and ckpt.best_step() == 10
    finally:
      ckpt.close()
