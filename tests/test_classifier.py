"""The ResNet classifier: loss and weights by hand, batch sampling, freezing, the enhanced-data
leakage refusal, and the task end to end (scratch and transfer) with predict."""

import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax import configlib
from cxr_jax import workdir as workdir_lib
from cxr_jax.data import enhanced
from cxr_jax.data.dataset import ImageSet
from cxr_jax.data.images import pixel_hash
from cxr_jax.errors import ConfigError, DataError, UserError
from cxr_jax.pipeline import classify
from cxr_jax.training import classifier
from cxr_jax.training import export
from cxr_jax.training import fit
from cxr_jax.training import mesh as mesh_lib
from cxr_jax.utils import grid

from conftest import REPO_ROOT

NAMES = ("COVID", "NORMAL", "VIRAL_PNEUMONIA")


def smoke_config(**overrides):
  config = configlib.load_config_file(REPO_ROOT / "configs/classifier.py", "smoke")
  config.update(overrides)
  return config


def test_loss_by_hand():
  logits = jnp.zeros((2, 3))
  labels = jnp.array([0, 2])
  assert float(classifier.loss_fn(logits, labels, num_classes=3, label_smoothing=0.0,
                                  weights=None)) == pytest.approx(math.log(3), rel=1e-6)
  logits = jnp.array([[2.0, 0.0, 0.0]])
  p = np.exp([2.0, 0.0, 0.0]) / np.exp([2.0, 0.0, 0.0]).sum()
  # Smoothing 0.3 over 3 classes: targets (0.8, 0.1, 0.1).
  expected = -(0.8 * np.log(p[0]) + 0.1 * np.log(p[1]) + 0.1 * np.log(p[2]))
  got = classifier.loss_fn(logits, jnp.array([0]), num_classes=3, label_smoothing=0.3,
                           weights=None)
  assert float(got) == pytest.approx(expected, rel=1e-6)
  weighted = classifier.loss_fn(jnp.zeros((2, 3)), jnp.array([0, 1]), num_classes=3,
                                label_smoothing=0.0, weights=jnp.array([2.0, 0.5, 1.0]))
  assert float(weighted) == pytest.approx(math.log(3) * (2.0 + 0.5) / 2, rel=1e-6)


def test_class_weights_balanced():
  w = classifier.class_weights(np.array([0, 0, 0, 1]), 3)
  # n / (K * n_c): 4 / (3 * 3), 4 / (3 * 1); an absent class gets 0.
  np.testing.assert_allclose(w, [4 / 9, 4 / 3, 0.0], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_model():
  config = smoke_config(batch_size=4, freeze_backbone_epochs=1, num_epochs=2)
  return classifier.Classifier(config, class_names=NAMES, steps_per_epoch=3, total_steps=6,
                               mesh=mesh_lib.make_mesh())


def test_sampled_batches_keep_labels_with_their_images(tiny_model):
  labels = np.arange(12, dtype=np.int32) % 3
  images = np.repeat(np.arange(12, dtype=np.uint8)[:, None, None, None] * 20, 32, 1)
  images = np.repeat(images, 32, 2)
  seen = []
  for step in range(3):  # one epoch: every image once
    idx_x, idx_y = tiny_model.batch_indices(jax.random.key(0), jnp.int32(step), (12, 12))
    x, y = images[np.asarray(idx_x)], labels[np.asarray(idx_y)]
    ids = np.asarray(x)[:, 0, 0, 0] // 20
    np.testing.assert_array_equal(np.asarray(y), labels[ids])
    seen.extend(ids.tolist())
  assert sorted(seen) == list(range(12))
  x = tiny_model.inputs(jnp.asarray(images[:4]), jax.random.key(1))
  assert x.shape == (4, 32, 32, 1) and bool(jnp.all(jnp.isfinite(x)))


def _changed(before, after) -> dict[str, bool]:
  """{key path: whether any element changed} over two pytrees of the same structure."""
  paths, _ = jax.tree_util.tree_flatten_with_path(before)
  return {jax.tree_util.keystr(path): not np.array_equal(a, b)
          for (path, a), b in zip(paths, jax.tree.leaves(after))}


def test_frozen_backbone_only_trains_the_head_and_accumulates_no_moments(tiny_model):
  state = fit.place_state(tiny_model.init_state(), tiny_model.mesh)
  rng = np.random.default_rng(0)
  data = mesh_lib.put_replicated((rng.integers(0, 256, (12, 32, 32, 1)).astype(np.uint8),
                                  (np.arange(12) % 3).astype(np.int32)), tiny_model.mesh)
  chunk = fit.compile_chunk(tiny_model, steps_per_call=4)
  before, opt_before = jax.device_get((state.net.params, state.net.opt))
  state, _ = chunk(state, data, np.int32(2))   # inside the frozen first epoch (3 steps)
  after, opt_after = jax.device_get((state.net.params, state.net.opt))
  flags = _changed(before, after)
  assert any(v for k, v in flags.items() if "fc" in k)
  assert not any(v for k, v in flags.items() if "fc" not in k)
  # The optimiser: the head's momentum moved, the backbone's stayed zero (no hidden moments).
  moments = {k: v for k, v in _changed(opt_before, opt_after).items() if "trace" in k}
  assert any(v for k, v in moments.items() if "'head'" in k)
  assert not any(v for k, v in moments.items() if "'backbone'" in k and "fc" not in k)
  backbone = opt_after[0].inner_states["backbone"].inner_state.inner_state  # masked, conditional
  assert jax.tree.leaves(backbone) and not any(np.any(x) for x in jax.tree.leaves(backbone))
  # Past the freeze (steps 3 and 4), the backbone trains with the global learning rate.
  state, metrics = chunk(state, data, np.int32(2))
  flags = _changed(after, jax.device_get(state.net.params))
  assert all(flags.values()), [k for k, v in flags.items() if not v]
  np.testing.assert_allclose(np.asarray(metrics["learning_rate"])[:2],
                             [float(tiny_model.schedule(s)) for s in (2, 3)], rtol=1e-6)


def _image_set(values, labels, prefix):
  images = np.stack([np.full((32, 32), v, np.uint8) for v in values])[..., None]
  return ImageSet(images=images, labels=np.asarray(labels, np.int32),
                  files=tuple(f"{prefix}/{i}.png" for i in range(len(values))),
                  hashes=tuple(pixel_hash(im[..., 0]) for im in images), class_names=NAMES)


def _splits():
  return {"train": _image_set([10, 20, 30, 40], [0, 1, 1, 2], "train"),
          "val": _image_set([50, 60], [1, 2], "val"),
          "test": _image_set([70, 80], [1, 0], "test")}


def _write_synthetic(root, splits, sources, pixel_values):
  (root / "COVID").mkdir(parents=True)
  rows = []
  for i, ((split, idx), value) in enumerate(zip(sources, pixel_values)):
    name = f"COVID/synthetic-{i + 1:05d}.png"
    image = np.full((32, 32), value, np.uint8)
    grid.save_png(root / name, image)
    rows.append({"file": name, "sha256": pixel_hash(image), "class": "COVID",
                 "source_file": splits[split].files[idx],
                 "source_sha256": splits[split].hashes[idx], "generator": "g",
                 "generator_step": 1, "seed": 0})
  enhanced.write_manifest(root, rows)


def test_enhanced_set_loads_when_traced_to_training_images(tmp_path):
  splits = _splits()
  _write_synthetic(tmp_path, splits, [("train", 1), ("train", 2)], [200, 210])
  synthetic = enhanced.load_synthetic_set(tmp_path, splits, image_size=32)
  assert len(synthetic) == 2 and set(synthetic.labels.tolist()) == {0}
  both = enhanced.concatenate(splits["train"], synthetic)
  assert len(both) == 6 and both.images.dtype == np.uint8


@pytest.mark.parametrize("source, value, message", [
    (("test", 0), 200, "made from test image"),
    (("val", 1), 200, "made from val image"),
    (("train", 1), 70, "identical to a test image"),
])
def test_enhanced_set_refuses_leaks(tmp_path, source, value, message):
  splits = _splits()
  _write_synthetic(tmp_path, splits, [source], [value])
  with pytest.raises(DataError, match=message):
    enhanced.load_synthetic_set(tmp_path, splits, image_size=32)


def test_enhanced_set_refuses_paths_outside_and_unknown_sources(tmp_path):
  splits = _splits()
  _write_synthetic(tmp_path / "syn", splits, [("train", 1)], [200])
  manifest = (tmp_path / "syn" / "manifest.csv").read_text()
  (tmp_path / "syn" / "manifest.csv").write_text(
      manifest.replace("COVID/synthetic-00001.png", "../outside.png", 1))
  with pytest.raises(DataError, match="points outside"):
    enhanced.load_synthetic_set(tmp_path / "syn", splits, image_size=32)
  other = dict(splits, train=_image_set([11, 21], [1, 1], "train"))
  _write_synthetic(tmp_path / "syn2", splits, [("train", 1)], [200])
  with pytest.raises(DataError, match="not in this run's training split"):
    enhanced.load_synthetic_set(tmp_path / "syn2", other, image_size=32)
  with pytest.raises(DataError, match="no synthetic-image manifest"):
    enhanced.load_synthetic_set(tmp_path, splits, image_size=32)


def test_scratch_smoke_end_to_end_and_predict(tmp_path):
  config = smoke_config()
  run = workdir_lib.prepare(tmp_path / "run", config)
  result = classify.train_and_evaluate(config, run)
  for name in ("metrics.json", "metrics.md", "confusion_matrix.png", "roc_curves.png",
               "gradcam.png", "test_predictions.csv", "classifier/model.json"):
    assert (run / name).exists(), name
  trained = export.load_classifier(run / "classifier")
  assert trained.meta["best_step"] in [int(p.name) for p in (run / "checkpoints").iterdir()], (
      "the best checkpoint is kept")
  metrics = json.loads((run / "metrics.json").read_text())
  assert 0.0 <= metrics["accuracy"]["value"] <= 1.0
  assert result["summary"]["accuracy"] == pytest.approx(metrics["accuracy"]["value"])

  from cxr_jax.evaluation import predict
  images = tmp_path / "images"
  images.mkdir()
  grid.save_png(images / "a.png", np.full((48, 48), 90, np.uint8))
  (images / "broken.png").write_bytes(b"not a png")
  # A Latin-1 file name (a folder copied from an old system): listed with the byte escaped.
  grid.save_png(images / os.fsdecode(b"caf\xe9.png"), np.full((48, 48), 90, np.uint8))
  pcfg = configlib.load_config_file(REPO_ROOT / "configs/predict.py")
  pcfg.classifier_dir = str(run / "classifier")
  pcfg.input = str(images)
  out = predict.predict_task(pcfg, tmp_path / "pred")
  written = tmp_path / "pred" / predict.predictions_file(images)
  assert out == {"predictions": str(written), "count": 2, "skipped": 1}
  rows = written.read_text(encoding="utf-8").splitlines()
  assert rows[0].startswith("file,label,predicted,p_COVID") and rows[1].startswith("a.png")
  assert rows[2].startswith("caf\\xe9.png,")


def test_validation_goes_through_the_export_path_and_compiles_once(tiny_model, caplog):
  """Validation with new weights reuses the compiled prediction (`Exported.with_weights`) and
  gives what the exported classifier built from those weights gives."""
  rng = np.random.default_rng(3)
  val = _image_set(rng.integers(0, 256, 6), [0, 1, 2, 0, 1, 2], "val")
  tiny_model.val = val
  state = fit.place_state(tiny_model.init_state(), tiny_model.mesh)
  first = tiny_model.validate(0, state)
  assert set(first) == {"accuracy", "macro_f1"} and 0.0 <= first["macro_f1"] <= 1.0
  doubled = jax.tree.map(lambda w: w * 1.5, state.net.params)
  caplog.set_level(logging.WARNING)
  with jax.log_compiles(True):
    probs = tiny_model.exported.with_weights(doubled, state.net.stats).predict(val.images, 16)
  assert not [r for r in caplog.records if "Compiling" in r.getMessage()], "compiled again"
  exported = export.Exported.create(tiny_model.export_meta(), tiny_model.net,
                                    jax.device_get(doubled), jax.device_get(state.net.stats))
  np.testing.assert_allclose(probs, exported.predict(val.images, 8), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_fine_tunes_from_its_own_one_channel_export(tiny_model, tmp_path, caplog):
  """`config.pretrained` = a classifier export of ours (the default: 1 channel, scratch input):
  the same classes load the whole network, other classes a new head (with a note); a 3-channel
  model gets the first conv replicated and answers gray images as the export does; it trains."""
  state = tiny_model.init_state()
  moved = jax.tree.map(lambda s: s + 0.25, state.net.stats)  # non-trivial BatchNorm statistics
  state = state.replace(net=state.net.replace(stats=moved))
  tiny_model.export(tmp_path, state, 3)
  source = export.load_classifier(tmp_path / classifier.CLASSIFIER_DIR)
  config = smoke_config(batch_size=4, freeze_backbone_epochs=0, num_epochs=2,
                        pretrained=str(tmp_path / classifier.CLASSIFIER_DIR))

  def build(cfg, names=NAMES):
    return classifier.Classifier(cfg, class_names=names, steps_per_epoch=3, total_steps=6,
                                 mesh=mesh_lib.make_mesh())

  tuned = build(config)
  assert tuned.input_spec == tiny_model.input_spec and tuned.arch == tiny_model.arch
  init = tuned.init_state()
  for got, want in ((init.net.params, state.net.params), (init.net.stats, moved)):
    assert not [k for k, v in _changed(jax.device_get(want), jax.device_get(got)).items() if v]

  caplog.set_level(logging.INFO)
  other = build(config, NAMES + ("TB",)).init_state()
  assert other.net.params["fc"]["kernel"].shape[-1] == 4
  same = {k: v for k, v in _changed(jax.device_get(state.net.params["stages"]),
                                    jax.device_get(other.net.params["stages"])).items()}
  assert same and not any(same.values()), "the backbone is the export's"
  assert any("3-class head (COVID, NORMAL, VIRAL_PNEUMONIA); this run's head (COVID, NORMAL, "
             "VIRAL_PNEUMONIA, TB) is initialised afresh" in r.getMessage()
             for r in caplog.records)

  config3 = smoke_config(**{**config.to_dict(), "model": {**config.model.to_dict(),
                                                          "in_channels": 3}})
  rgb = build(config3)
  assert rgb.arch["in_channels"] == 3
  gray = np.random.default_rng(4).integers(0, 256, (6, 32, 32, 1), dtype=np.uint8)
  init3 = rgb.init_state()
  np.testing.assert_allclose(rgb.exported.with_weights(init3.net.params, init3.net.stats)
                             .predict(gray, 8), source.predict(gray, 8), rtol=1e-4, atol=1e-6)

  placed = fit.place_state(init, tuned.mesh)
  rng = np.random.default_rng(0)
  data = mesh_lib.put_replicated((rng.integers(0, 256, (12, 32, 32, 1)).astype(np.uint8),
                                  (np.arange(12) % 3).astype(np.int32)), tuned.mesh)
  trained, metrics = fit.compile_chunk(tuned, steps_per_call=2)(placed, data, np.int32(2))
  assert np.all(np.isfinite(np.asarray(metrics["loss"])))
  assert all(_changed(jax.device_get(state.net.params),  # the export's (`placed` is donated)
                      jax.device_get(trained.net.params)).values())
  # A folder that is not a classifier export: one line naming it.
  with pytest.raises(UserError, match=f"{tmp_path}: not an exported classifier"):
    classifier.load_pretrained(str(tmp_path))
def _images(n: int) -> ImageSet:
  labels = np.arange(n, dtype=np.int32) % 3
  images = np.zeros((n, 8, 8, 1), np.uint8)
  return ImageSet(images=images, labels=labels, files=tuple(f"{i}.png" for i in range(n)),
                  hashes=tuple(str(i) for i in range(n)), class_names=NAMES)


def test_a_fixed_budget_gives_every_training_set_the_same_steps_and_schedule():
  config = smoke_config(batch_size=4, num_epochs=3, warmup_epochs=1)
  small, large = _images(16), _images(24)
  a, b = classifier.run_setup(config, small), classifier.run_setup(config, large)
  assert (a.steps_per_epoch, b.steps_per_epoch) == (4, 6)
  assert (a.total_steps, b.total_steps) == (12, 18)          # num_epochs passes over each set
  config.train_steps = classifier.budget_steps(config, len(small))
  a, b = classifier.run_setup(config, small), classifier.run_setup(config, large)
  assert a.total_steps == b.total_steps == 12                # the larger set: 2 epochs of its own
  assert (a.steps_per_epoch, b.steps_per_epoch) == (4, 6)    # its batch order still covers it
  assert a.schedule_epoch == b.schedule_epoch == 4
  schedules = [classifier.make_optimizer(config, s.total_steps, s.schedule_epoch)[1]
               for s in (a, b)]
  lr = [[float(f(step)) for step in range(13)] for f in schedules]
  assert lr[0] == lr[1] and lr[0][4] == pytest.approx(config.learning_rate)   # warm-up: 1 epoch
  with pytest.raises(ConfigError, match="config.train_steps"):
    classifier.validate(smoke_config(train_steps=-1))
