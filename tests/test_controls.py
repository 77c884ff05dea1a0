"""The oversampled-by-augmentation control's training set: counts, provenance, no leakage, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_jax.data.dataset import ImageSet
from cxr_jax.data.images import pixel_hash
from cxr_jax.errors import DataError
from cxr_jax.pipeline import controls

CLASSES = ("COVID", "NORMAL")
SIZE = 32


def _set(prefix: str, labels: list[int], seed: int) -> ImageSet:
  """Smooth random images, each its own pattern: a mild warp keeps copies traceable to sources."""
  from scipy import ndimage
  rng = np.random.default_rng(seed)
  n = len(labels)
  x = ndimage.gaussian_filter(rng.normal(size=(n, SIZE, SIZE)), sigma=(0, 4, 4))
  x = (x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True)
  images = np.clip(128 + 40 * x, 0, 255).astype(np.uint8)[..., None]
  return ImageSet(images=images, labels=np.asarray(labels, np.int32),
                  files=tuple(f"{prefix}/{i}.png" for i in range(n)),
                  hashes=tuple(pixel_hash(im[..., 0]) for im in images), class_names=CLASSES)


@pytest.fixture(scope="module")
def splits():
  return {"train": _set("train", [0] * 5 + [1] * 12, 0), "val": _set("val", [0, 0, 1, 1], 1),
          "test": _set("test", [0, 0, 1, 1], 2)}


@pytest.fixture(scope="module")
def copies(splits):
  return controls.augmented_copies(splits["train"], "COVID", 12, seed=3,
                                   held_out=[splits["val"], splits["test"]])


def test_counts_labels_and_names(splits, copies):
  assert len(copies) == 12 and copies.images.shape == (12, SIZE, SIZE, 1)
  assert copies.images.dtype == np.uint8
  assert set(copies.labels.tolist()) == {0} and copies.class_names == CLASSES
  # 12 = 5 + 5 + 2 copies of 5 sources: each twice, two of them a third time
  sources = [controls.source_file(f) for f in copies.files]
  assert sorted(np.unique(sources, return_counts=True)[1]) == [2, 2, 2, 3, 3]
  assert len(set(copies.files)) == 12
  assert copies.files[0].startswith("augmented/train/") and copies.files[0].endswith("#1")
  assert copies.hashes == tuple(pixel_hash(im[..., 0]) for im in copies.images)
  combined = controls.oversampled_training_set(splits["train"], "covid", 12, seed=3)
  assert combined.counts() == {"COVID": 17, "NORMAL": 12}


def test_every_copy_comes_from_a_training_image_of_that_class(splits, copies):
  train = splits["train"]
  covid_train = {f for f, y in zip(train.files, train.labels) if y == 0}
  held = {f for s in (splits["val"], splits["test"]) for f in s.files}
  # every image of every split, to find which one each copy's pixels come from
  names = [f for s in splits.values() for f in s.files]
  pool = np.concatenate([s.images for s in splits.values()])[..., 0].reshape(len(names), -1)
  pool = pool - pool.mean(1, keepdims=True)
  pool /= np.linalg.norm(pool, axis=1, keepdims=True)
  for f, im in zip(copies.files, copies.images):
    src = controls.source_file(f)
    assert src in covid_train and src not in held
    # the pixels say so too: the copy correlates best with its named source (brightness and
    # contrast jitter do not change a correlation)
    v = im[..., 0].reshape(-1).astype(np.float64)
    v = (v - v.mean()) / np.linalg.norm(v - v.mean())
    corr = pool @ v
    assert names[int(corr.argmax())] == src and corr.max() > 0.5
  # augmented, not duplicated
  assert not set(copies.hashes) & set(train.hashes)


def test_seed_makes_copies_reproducible(splits, copies):
  again = controls.augmented_copies(splits["train"], "COVID", 12, seed=3)
  np.testing.assert_array_equal(again.images, copies.images)
  assert again.files == copies.files
  other = controls.augmented_copies(splits["train"], "COVID", 12, seed=4)
  assert other.hashes != copies.hashes


def test_refuses_leaks_and_bad_counts(splits):
  train = splits["train"]
  leaky_val = train.subset([0, 1])          # a training COVID image also in "validation"
  with pytest.raises(DataError, match="held-out"):
    controls.augmented_copies(train, "COVID", 3, seed=0, held_out=[leaky_val])
  with pytest.raises(ValueError, match="count"):
    controls.augmented_copies(train, "COVID", -1, seed=0)
  no_covid = train.subset(train.labels == 1)
  with pytest.raises(DataError, match="no COVID"):
    controls.augmented_copies(no_covid, "COVID", 3, seed=0)
  assert len(controls.augmented_copies(no_covid, "COVID", 0, seed=0)) == 0
