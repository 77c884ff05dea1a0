"""Streamed training input (`config.data.placement`): the images stay in the prepared array_record
copy and each step's batch is read by grain (training/stream.py, data/records.py).

What is checked: a streamed split reads exactly the resident split's images; `auto` streams what
does not fit its share of memory; bad settings name their key; a streamed classifier equals a
resident one bitwise on 4 devices, and a streamed run killed after a checkpoint and resumed from
its saved input-pipeline state equals the uninterrupted streamed run bitwise; a checkpoint of one
placement resumes under the other."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from cxr_jax import configlib
from cxr_jax import workdir as workdir_lib
from cxr_jax.data import dataset
from cxr_jax.data import records
from cxr_jax.errors import ConfigError
from cxr_jax.errors import UserError
from cxr_jax.training import checkpoint
from cxr_jax.training import classifier
from cxr_jax.training import fit
from cxr_jax.training import mesh as mesh_lib

from conftest import REPO_ROOT
from conftest import assert_same_across_programs


def smoke_config(placement: str):
  config = configlib.load_config_file(REPO_ROOT / "configs/classifier.py", "smoke")
  config.data.placement = placement
  return config


def test_streamed_splits_read_the_resident_images(tmp_path):
  resident = dataset.load_splits(smoke_config("device").data)
  streamed = dataset.load_splits(smoke_config("stream").data)
  for name, want in resident.items():
    got = streamed[name]
    assert records.is_lazy(got.images) and not records.is_lazy(want.images)
    assert got.images.shape == want.images.shape and got.images.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(got.images), want.images, err_msg=name)
    np.testing.assert_array_equal(got.labels, want.labels)
    assert got.files == want.files and got.hashes == want.hashes
  train, lazy = resident["train"], streamed["train"]
  covid = lazy.of_class("COVID")
  assert records.is_lazy(covid.images)
  np.testing.assert_array_equal(np.asarray(covid.images), train.of_class("COVID").images)
  # Reading by position, slice, list and mask, as numpy indexes.
  np.testing.assert_array_equal(lazy.images[3], train.images[3])
  np.testing.assert_array_equal(lazy.images[-1], train.images[-1])
  np.testing.assert_array_equal(lazy.images[2:7], train.images[2:7])
  np.testing.assert_array_equal(lazy.images[[5, 0, 5]], train.images[[5, 0, 5]])
  mask = train.labels == 1
  np.testing.assert_array_equal(lazy.images[mask], train.images[mask])
  with pytest.raises(IndexError):
    lazy.images[len(lazy)]
  # Arrays and views joined (the enhanced set: real images on disk, synthetic ones in memory).
  extra = np.full((2,) + train.images.shape[1:], 7, np.uint8)
  joined = records.concat([lazy.images, extra])
  assert records.is_lazy(joined) and len(joined) == len(lazy) + 2
  np.testing.assert_array_equal(records.read(joined, np.asarray([len(lazy) + 1, 0])),
                                np.stack([extra[1], train.images[0]]))
  np.testing.assert_array_equal(np.asarray(records.take(joined, [len(lazy), 1])),
                                np.stack([extra[0], train.images[1]]))
  # The record index is kept beside the prepared copy.
  prepared_dir = lazy.images.prepared.data_dir
  index = json.loads((prepared_dir / records.INDEX_FILE).read_text())
  assert index["num_examples"] == sum(len(s) for s in resident.values())


def test_auto_streams_what_does_not_fit_its_share(monkeypatch):
  monkeypatch.setattr(records, "device_memory", lambda: (1_000_000, "test memory"))
  cfg = {"placement": "auto", "placement_share": 0.5}
  assert records.choose_placement(cfg, 100, 70) == "device"      # 490 kB <= 500 kB
  assert records.choose_placement(cfg, 100, 71) == "stream"      # 504 kB
  assert records.choose_placement(dict(cfg, placement="device"), 10**6, 512) == "device"
  assert records.choose_placement(dict(cfg, placement="stream"), 1, 32) == "stream"


@pytest.mark.parametrize("key, value", [("placement", "disk"), ("placement_share", 0.0),
                                        ("placement_share", 1.5), ("stream_threads", 0),
                                        ("stream_prefetch", -1)])
def test_bad_stream_settings_name_their_key(key, value):
  config = smoke_config("auto")
  config.data[key] = value
  with pytest.raises(ConfigError, match=f"config.data.{key}"):
    dataset.check_config(config.data)


class Interrupt(Exception):
  """Stands for a run killed right after a checkpoint."""


def _train(config, workdir, splits, stop_after: int | None = None):
  """classifier.train on `splits`; with `stop_after`, killed right after that step's checkpoint."""
  run = workdir_lib.prepare(workdir, config)
  mesh = mesh_lib.make_mesh()
  if stop_after is None:
    return classifier.train(config, run, splits["train"], splits["val"], mesh)
  save = checkpoint.Checkpointer.save

  def save_then_die(self, step, state, **kw):
    save(self, step, state, **kw)
    if step == stop_after:
      self.wait()
      raise Interrupt()

  checkpoint.Checkpointer.save = save_then_die
  try:
    with pytest.raises(Interrupt):
      classifier.train(config, run, splits["train"], splits["val"], mesh)
  finally:
    checkpoint.Checkpointer.save = save
  return run


def _state(run) -> dict:
  ckpt = checkpoint.Checkpointer(run / "checkpoints", asynchronous=False)
  try:
    step = ckpt.latest_step()
    meta = ckpt._mgr.item_metadata(step)[checkpoint.STATE]  # pylint: disable=protected-access
    flat = ckpt._mgr.restore(step, args=checkpoint.ocp.args.Composite(  # pylint: disable=protected-access
        **{checkpoint.STATE: checkpoint.ocp.args.StandardRestore()}))[checkpoint.STATE]
    assert sorted(flat) == sorted(dict(meta))
    return {k: np.asarray(v) for k, v in flat.items()}
  finally:
    ckpt.close()


def _assert_same(a: dict, b: dict, what: str) -> None:
  assert sorted(a) == sorted(b), what
  differ = [k for k in a if not np.array_equal(a[k], b[k])]
  assert not differ, f"{what}: {len(differ)} of {len(a)} leaves differ, e.g. {differ[:3]}"


def test_streamed_classifier_equals_resident_and_resumes_exactly(tmp_path, monkeypatch):
  assert jax.device_count() == 4  # the batch is sharded: each device reads its own rows
  resident_cfg, stream_cfg = smoke_config("device"), smoke_config("stream")
  # At the smoke config's learning rate (0.01) this tiny network's 10 steps are chaotic: a last-bit
  # difference between the two programs grows to the size of the momentum itself after 10 steps
  # (1e-4 of its scale after 6; measured). At 1e-3 it stays within 3e-5 of each array's scale.
  resident_cfg.learning_rate = stream_cfg.learning_rate = 1e-3
  splits = {"device": dataset.load_splits(resident_cfg.data),
            "stream": dataset.load_splits(stream_cfg.data)}
  total = classifier.run_setup(stream_cfg, splits["stream"]["train"]).total_steps
  per_epoch = total // stream_cfg.num_epochs
  assert per_epoch < total  # the kill below falls between two checkpoints

  # Count the training rows read: a streamed run reads each step's batch, nothing more (the
  # validation split is read too, by the validation at each epoch's end).
  read_rows = []
  read = records.RecordImages.read
  num_train = len(splits["stream"]["train"])

  def counting_read(self, ids):
    if len(self) == num_train:
      read_rows.append(len(ids))
    return read(self, ids)

  monkeypatch.setattr(records.RecordImages, "read", counting_read)
  _train(stream_cfg, tmp_path / "stream", splits["stream"])
  assert fit.placement_of((splits["stream"]["train"].images,)) == "stream"
  assert read_rows == [stream_cfg.batch_size] * total
  monkeypatch.setattr(records.RecordImages, "read", read)

  _train(resident_cfg, tmp_path / "device", splits["device"])
  streamed = _state(tmp_path / "stream")
  # Different programs (the batch an input, or gathered in the step): conftest says how compared.
  assert_same_across_programs(streamed, _state(tmp_path / "device"), "streamed vs resident")
  saved = json.loads(next((tmp_path / "stream" / "checkpoints" / str(total)).glob(
      f"{checkpoint.ITERATOR}/*")).read_text())
  assert saved["step"] == total and saved["grain"]["next_index"] == total

  # Killed right after the first epoch's checkpoint, resumed from it: the same final state.
  run = _train(stream_cfg, tmp_path / "killed", splits["stream"], stop_after=per_epoch)
  assert checkpoint.Checkpointer(run / "checkpoints").all_steps() == [per_epoch]
  classifier.train(stream_cfg, run, splits["stream"]["train"], splits["stream"]["val"],
                   mesh_lib.make_mesh())
  _assert_same(_state(run), streamed, "streamed, killed and resumed vs uninterrupted")

  # A resident run's checkpoint resumed streamed (no input-pipeline state in it), and back.
  run = _train(resident_cfg, tmp_path / "switched", splits["device"], stop_after=per_epoch)
  classifier.train(stream_cfg, run, splits["stream"]["train"], splits["stream"]["val"],
                   mesh_lib.make_mesh())
  assert_same_across_programs(_state(run), streamed, "resident, resumed streamed vs streamed")


def test_a_checkpoint_of_another_pipeline_position_is_refused(tmp_path):
  config = smoke_config("stream")
  splits = dataset.load_splits(config.data)
  setup = classifier.run_setup(config, splits["train"])
  trainer = classifier.make_trainer(config, tmp_path, splits["train"], splits["val"],
                                    mesh_lib.make_mesh(), setup)
  from cxr_jax.training import stream as stream_lib  # pylint: disable=import-outside-toplevel
  data = (splits["train"].images, splits["train"].labels)
  stream = stream_lib.Stream(trainer, data, rng=trainer.init_state().rng,
                             batch_size=config.batch_size, total_steps=setup.total_steps)
  stream.open(2)
  batch = stream.next()
  idx = stream.indices(2)
  np.testing.assert_array_equal(np.asarray(jax.device_get(batch[0])),
                                np.asarray(splits["train"].images)[idx[0]])
  np.testing.assert_array_equal(np.asarray(jax.device_get(batch[1])), splits["train"].labels[idx[1]])
  state = stream.state()
  assert state["step"] == 3
  with pytest.raises(UserError, match="input pipeline of step 3"):
    stream.open(4, state)
  stream.open(3, state)
  np.testing.assert_array_equal(np.asarray(jax.device_get(stream.next()[0])),
                                np.asarray(splits["train"].images)[stream.indices(3)[0]])
  stream.close()
