"""The shared training machinery: checkpoints, the host loop, augmentation, the mesh."""

import ast
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax.errors import ConfigError, UserError
from cxr_jax.training import augment
from cxr_jax.training import checkpoint
from cxr_jax.training import loop
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.training.summary import SummaryWriter

from conftest import REPO_ROOT


def _state(scale=1.0):
  return {"params": {"w": jnp.full((3, 2), scale), "b": jnp.zeros(2)},
          "step": jnp.int32(0), "rng": jax.random.key(1)}


def test_flatten_roundtrip_keys_name_the_path():
  state = _state()
  flat = checkpoint.flatten(state)
  assert set(flat) == {"params/w", "params/b", "step", "rng"}
  back = checkpoint.unflatten(state, flat)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), state, back))


def test_save_restore_exact_and_keeps_last_k(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", max_to_keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(float(step)))
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  restored, step = ckpt.restore_latest(_state(0.0))
  assert step == 3
  np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 2), 3.0))
  ckpt.close()


def test_restore_refuses_other_model_naming_key(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ck")
  ckpt.save(1, _state())
  ckpt.wait()
  other = {"params": {"w": jnp.zeros((4, 2)), "b": jnp.zeros(2)}, "step": jnp.int32(0),
           "rng": jax.random.key(0)}
  with pytest.raises(UserError, match=r"params/w.*\(3, 2\).*\(4, 2\)"):
    ckpt.restore_latest(other)
  ckpt.close()


def test_corrupt_latest_checkpoint_falls_back_and_is_kept(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", max_to_keep=3)
  ckpt.save(1, _state(1.0))
  ckpt.save(2, _state(2.0))
  ckpt.wait()
  ckpt.close()
  # Damage every data file of step 2.
  for f in (tmp_path / "ck" / "2").rglob("*"):
    if f.is_file() and "metadata" not in f.name.lower() and f.suffix != ".txt":
      f.write_bytes(b"garbage")
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", max_to_keep=3)
  restored, step = ckpt.restore_latest(_state(0.0))
  assert step == 1
  np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 2), 1.0))
  assert (tmp_path / "ck" / "2.unreadable").exists(), "kept aside, not deleted"
  ckpt.save(2, _state(2.5))  # training can reach and save step 2 again
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


def _counting_chunk(nan_at=None):
  """A fake trainer: the state counts steps; metric 'loss' is NaN at global step `nan_at`."""
  @jax.jit
  def run(state, steps):
    def body(s, _):
      bad = (s["step"] == nan_at) if nan_at is not None else False
      loss = jnp.where(bad, jnp.nan, 1.0 / (1.0 + s["step"]))
      return {"step": s["step"] + 1, "x": s["x"] + 1.0}, {"loss": loss}
    return jax.lax.scan(body, state, steps)
  return lambda state, k: run(state, jnp.arange(k))


def test_loop_runs_to_total_and_checkpoints(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", max_to_keep=5)
  writer = SummaryWriter(tmp_path / "tb")
  state = {"step": jnp.int32(0), "x": jnp.float32(0)}
  final = loop.run(state, chunk_fn=_counting_chunk(),
                   schedule=loop.Schedule(total_steps=10, steps_per_call=3, log_every=4,
                                          checkpoint_every=5),
                   start_step=0, checkpointer=ckpt, writer=writer, name="t", images_per_step=1)
  assert int(final["step"]) == 10 and float(final["x"]) == 10.0
  assert ckpt.all_steps() == [5, 10]
  ckpt.close()
  writer.close()
  assert list((tmp_path / "tb").iterdir())


def test_loop_stops_on_non_finite_loss_naming_step_and_keeps_last_good(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", max_to_keep=5)
  state = {"step": jnp.int32(0), "x": jnp.float32(0)}
  writer = SummaryWriter(tmp_path / "tb")
  with pytest.raises(loop.TrainingDiverged, match=r"loss is nan at step 7"):
    loop.run(state, chunk_fn=_counting_chunk(nan_at=6),
             schedule=loop.Schedule(total_steps=20, steps_per_call=2, log_every=10,
                                    checkpoint_every=4),
             start_step=0, checkpointer=ckpt, writer=writer, name="t", images_per_step=1)
  writer.close()  # as the trainers do (finally): an open writer's exit hook fails on Python 3.12
  ckpt.wait()
  assert ckpt.all_steps() == [4]
  ckpt.close()


def test_augment_shapes_ranges_and_identity():
  images = jax.random.randint(jax.random.key(0), (3, 40, 40, 1), 0, 256).astype(jnp.uint8)
  spec = augment.AugmentSpec(out_size=32)
  out = augment.augment(images, jax.random.key(1), spec)
  assert out.shape == (3, 32, 32, 1) and out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  identity = augment.AugmentSpec(out_size=40, crop_scale=(1.0, 1.0), max_rotate_deg=0.0,
                                 max_translate=0.0, brightness=0.0, contrast=0.0)
  same = augment.augment(images, jax.random.key(2), identity)
  np.testing.assert_allclose(np.asarray(same), np.asarray(images) / 255.0, atol=1e-5)
  flipped = augment.augment(images, jax.random.key(2),
                            augment.AugmentSpec(out_size=40, crop_scale=(1.0, 1.0),
                                                max_rotate_deg=0.0, max_translate=0.0,
                                                brightness=0.0, contrast=0.0, hflip=True))
  for i in range(3):  # each image is either unchanged or mirrored
    x, y = np.asarray(images[i]) / 255.0, np.asarray(flipped[i])
    assert np.allclose(y, x, atol=1e-5) or np.allclose(y, x[:, ::-1], atol=1e-5)


def test_mesh_and_batch_checks():
  mesh = mesh_lib.make_mesh()
  assert mesh.devices.size == jax.device_count() == 4
  mesh_lib.check_global_batch(8, mesh)
  with pytest.raises(ConfigError, match="config.batch_size"):
    mesh_lib.check_global_batch(6, mesh)
  x = mesh_lib.put_batch(np.arange(8.0).reshape(8, 1), mesh)
  assert len(x.addressable_shards) == 4 and x.addressable_shards[0].data.shape == (2, 1)


def test_one_manager_keeps_latest_k_and_the_best_and_names_an_unreadable_best(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", max_to_keep=2, best_metric="f1")
  for step, f1 in ((1, 0.9), (2, 0.5), (3, 0.7), (4, 0.6)):
    ckpt.save(step, _state(float(step)), metrics={"f1": f1})
  ckpt.wait()
  assert ckpt.all_steps() == [1, 3, 4], "the latest 2 and the best"
  best, step = ckpt.restore_best(_state(0.0))
  assert step == 1
  np.testing.assert_array_equal(best["params"]["w"], np.full((3, 2), 1.0))
  ckpt.close()
  plain = checkpoint.Checkpointer(tmp_path / "plain", max_to_keep=2)
  for step in (1, 2, 3):
    plain.save(step, _state(float(step)))
  plain.wait()
  assert plain.all_steps() == [2, 3] and plain.best_step() is None
  plain.close()
  for f in (tmp_path / "ck" / "1" / "default").rglob("*"):   # the arrays, not the metrics
    if f.is_file() and "metadata" not in f.name.lower() and f.suffix != ".txt":
      f.write_bytes(b"garbage")
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", max_to_keep=2, best_metric="f1")
  with pytest.raises(UserError, match=r"ck/1: the best checkpoint cannot be read"):
    ckpt.restore_best(_state(0.0))
  assert (tmp_path / "ck" / "1").is_dir(), "left where it is"
  ckpt.close()
  (tmp_path / "ck" / "1" / "metrics" / "metrics").write_text("{not json")
  with pytest.raises(UserError, match=r"/ck: cannot read the records of the checkpoints"):
    checkpoint.Checkpointer(tmp_path / "ck", best_metric="f1")


def test_progress_due_eta_lines_and_slow_warning(caplog):
  """`due` is time-based; the ETA counts from the first report (compilation left out); off a
  terminal only some reports reach the console; a run of more than a day warns once."""
  import time
  from cxr_jax import console
  from cxr_jax.training.summary import Progress
  console.teardown()  # the quiet default, whatever an earlier in-process run left installed
  caplog.set_level("INFO")
  total = 10**9
  p = Progress(total, 0, images_per_step=4, name="pix2pix")
  p.FIRST_REPORT_S, p.REPORT_EVERY_S, p.LINE_EVERY_S = 0.05, 0.05, 3600.0
  p._next_line_t = 0.0  # the first report reaches the console at once
  assert not p.due(0)                      # nothing done yet
  time.sleep(0.06)
  assert p.due(10) and not p.due(total)
  p.report(10, {"g_loss": 2.0}, p.rate(10))
  assert not p.due(11)                     # just reported
  t1 = time.perf_counter()
  time.sleep(0.1)
  before = time.perf_counter()
  eta = p.eta(20)
  after = time.perf_counter()
  # (total - 20) steps at 10 steps per (now - first report)
  assert (total - 20) * (before - t1) / 10 <= eta <= (total - 20) * (after - t1 + 0.01) / 10
  p.report(20, {"g_loss": 1.5}, p.rate(20))
  p.report(30, {"g_loss": 1.0}, p.rate(30))
  reports = [r for r in caplog.records if "pix2pix step" in r.getMessage()]
  assert [getattr(r, "console", True) for r in reports] == [True, False, False]
  assert "g_loss=1.5" in reports[1].getMessage()
  assert not re.search(r"\b4 img/s", reports[1].getMessage())  # "394 img/s" is not "4 img/s"
  slow = [r for r in caplog.records if r.levelname == "WARNING"]
  assert len(slow) == 1 and "configs/pix2pix.py:cpu" in slow[0].getMessage()
  p.report(total, {"g_loss": 0.5}, 1.0)    # the last report always reaches the console
  assert getattr(caplog.records[-1], "console", True) is True
  p.close()


def test_first_report_without_measured_rate_does_not_warn(caplog):
  from cxr_jax.training.summary import Progress
  caplog.set_level("INFO")
  p = Progress(10**9, 0, images_per_step=1, name="classifier")
  p.report(1, {"loss": 1.0}, p.rate(1))   # includes compilation: no verdict on speed yet
  assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_summary_scalars_csv_resumed_run_and_training_curves(tmp_path):
  """Scalars also go to tensorboard/scalars.csv; a resumed run's repeated steps keep the last
  value; write_training_curves draws train/ and val/ panels from it."""
  from PIL import Image
  from cxr_jax.evaluation import plots
  writer = SummaryWriter(tmp_path / "tensorboard")
  writer.scalars(10, {"train/loss": 1.0, "perf/steps_per_sec": 3.0})
  writer.scalars(20, {"train/loss": 0.5, "val/macro_f1": 0.25})
  writer.close()
  writer = SummaryWriter(tmp_path / "tensorboard")      # resumed from step 10
  writer.scalars(20, {"train/loss": 0.75})
  writer.scalars(30, {"train/loss": 0.125})
  writer.close()
  history = plots.read_scalars(tmp_path / "tensorboard" / "scalars.csv")
  assert history == {"train/loss": [(10, 1.0), (20, 0.75), (30, 0.125)],
                     "perf/steps_per_sec": [(10, 3.0)], "val/macro_f1": [(20, 0.25)]}
  out = plots.write_training_curves(tmp_path)
  assert out == tmp_path / "training_curves.png"
  width, height = Image.open(out).size
  assert width > 2 * height                             # two panels side by side, perf/ left out
  assert plots.write_training_curves(tmp_path / "no-run") is None


def test_typed_keys_are_saved_as_key_data_and_restored_typed(tmp_path):
  state = {"rng": jax.random.fold_in(jax.random.key(3), 7), "step": jnp.int32(5)}
  flat = checkpoint.flatten(state)
  assert flat["rng"].dtype == jnp.uint32 and flat["rng"].shape == (2,)
  ckpt = checkpoint.Checkpointer(tmp_path / "ck")
  ckpt.save(5, state)
  ckpt.wait()
  template = {"rng": jax.random.key(0), "step": jnp.int32(0)}
  restored, step = ckpt.restore_latest(checkpoint.abstract(template))
  ckpt.close()
  assert step == 5 and jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored["rng"]),
                                jax.random.key_data(state["rng"]))
  np.testing.assert_array_equal(jax.random.uniform(restored["rng"], (3,)),
                                jax.random.uniform(state["rng"], (3,)))


# Which packages each layer may import (besides errors, configlib, workdir, runtime and utils).
LAYERS = {"data": {"data"}, "models": {"models"}, "training": {"data", "models", "training"},
          "evaluation": {"data", "models", "training", "evaluation"},
          "pipeline": {"data", "models", "training", "evaluation", "pipeline"}}


def _imports(path):
  """(imported cxr_jax module, whether the import is inside a function) for each import."""
  tree = ast.parse(path.read_text())
  inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
           for n in ast.walk(f) if n is not f}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    else:
      continue
    for name in names:
      yield name, id(node) in inner


def test_imports_run_one_way_and_none_hide_in_functions():
  package = REPO_ROOT / "cxr_jax"
  wrong, hidden = [], []
  for layer, allowed in LAYERS.items():
    for path in sorted((package / layer).glob("*.py")):
      for name, in_function in _imports(path):
        parts = name.split(".")
        if parts[0] == "cxr_jax" and len(parts) > 1 and parts[1] in LAYERS:
          if parts[1] not in allowed:
            wrong.append(f"{path.relative_to(REPO_ROOT)} imports {name}")
          if in_function and layer in ("training", "evaluation", "pipeline"):
            hidden.append(f"{path.relative_to(REPO_ROOT)}: {name}")
  assert not wrong, wrong
  assert not hidden, hidden


def test_no_module_imports_itself_through_others():
  """The package's import graph (every import, `TYPE_CHECKING` ones too) has no cycle."""
  package = REPO_ROOT / "cxr_jax"
  modules = {".".join(p.relative_to(REPO_ROOT).with_suffix("").parts): p
             for p in package.rglob("*.py") if p.name != "__init__.py"}
  graph = {name: {imported for full, _ in _imports(path)
                  for imported in (full, full.rsplit(".", 1)[0]) if imported in modules}
           for name, path in modules.items()}
  state = {}   # name -> 'open' while on the path, 'done' after

  def visit(name, path):
    state[name] = "open"
    for other in sorted(graph[name]):
      if state.get(other) == "open":
        raise AssertionError(" -> ".join(path[path.index(other):] + [other]))
      if other not in state:
        visit(other, path + [other])
    state[name] = "done"

  for name in sorted(modules):
    if name not in state:
      visit(name, [name])


def test_map_batches_pads_dispatches_every_batch_before_fetching(monkeypatch):
  mesh = mesh_lib.make_mesh()
  events = []
  double = jax.jit(lambda x: x * 2, out_shardings=mesh_lib.batch_sharding(mesh))

  def fn(x):
    events.append(("dispatch", x.shape))
    return double(x)

  fetch = mesh_lib.fetch
  monkeypatch.setattr(mesh_lib, "fetch", lambda y: (events.append(("fetch",)), fetch(y))[1])
  x = np.arange(10, dtype=np.float32)[:, None]
  out = mesh_lib.map_batches(fn, (x,), batch_size=3, mesh=mesh)   # rounded up to 4 (devices)
  np.testing.assert_array_equal(out, x * 2)
  assert events == [("dispatch", (4, 1))] * 3 + [("fetch",)] * 3
