"""Training sets of the control rows that separate the class prior from the synthetic images.

GAN enhancement changes two things at once: the images and the class prior. Two controls take them
apart:

- prior only: the original data with a class-balanced loss, `config.class_weighted_loss = True` in
  the classifier config (weights n / (K n_c) from `classifier.class_weights`); no data changes.
- oversampled by classical augmentation: the target class topped up with `count` augmented copies
  of its own training images, as many as the synthetic images (Fedoruk et al., 2023, found this
  at least as good as GAN images). `augmented_copies` builds them, host-side, once.

Copies are drawn only from the training images of that class, so no validation or test anatomy
can reach training; each copy's file name `augmented/<source file>#<k>` keeps its provenance.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from cxr_jax.data import enhanced
from cxr_jax.data.dataset import ImageSet
from cxr_jax.data.images import pixel_hash
from cxr_jax.errors import DataError
from cxr_jax.training import augment

# Mild, side-preserving: chest radiographs have a side, so no flips; +-5 degrees, 5 % shift,
# crops keeping 80-100 % of the area resized back, +-0.1 brightness and +-10 % contrast.
CONTROL_AUGMENT = dict(crop_scale=(0.8, 1.0), max_rotate_deg=5.0, max_translate=0.05,
                       brightness=0.1, contrast=0.1, hflip=False)
_CHUNK = 256   # images warped per call: bounds host memory at 256 px


def augmented_copies(train: ImageSet, class_name: str, count: int, seed: int, *,
                     held_out: Sequence[ImageSet] = ()) -> ImageSet:
  """`count` augmented copies of the training images of `class_name`, labelled as that class.

  Sources are chosen as synthesis chooses them: each image once (in a seeded order) before any
  twice. The warp and intensity jitter are `training.augment.augment` (the classifier's own
  augmentation, so the control differs from the original row only in how often the class is
  seen), with CONTROL_AUGMENT's settings, at the stored size, rounded to uint8. Copy k (1-based)
  of source `f` is named `augmented/f#k`; its hash is of its own pixels. `held_out` sets
  (validation, test) are checked: a source whose pixels equal a held-out image is refused.
  """
  if int(count) != count or count < 0:
    raise ValueError(f"count must be a whole number >= 0, got {count}")
  count = int(count)
  sources = train.of_class(class_name)
  if count and len(sources) == 0:
    raise DataError(f"the training split has no {class_name} images to augment")
  held = {h for s in held_out for h in s.hashes}
  leaked = sorted({f for f, h in zip(sources.files, sources.hashes) if h in held})
  if leaked:
    raise DataError(f"training {class_name} images equal held-out images, refusing to copy them: "
                    f"{', '.join(leaked[:5])}{' ...' if len(leaked) > 5 else ''}")
  size = train.images.shape[1:3]
  if count == 0:
    return ImageSet(images=np.zeros((0, *size, 1), np.uint8), labels=np.zeros(0, np.int32),
                    files=(), hashes=(), class_names=train.class_names)
  rng = np.random.default_rng(seed)
  rounds = -(-count // len(sources))
  picks = np.concatenate([rng.permutation(len(sources)) for _ in range(rounds)])[:count]
  copy_number = np.arange(count) // len(sources) + 1
  if size[0] != size[1]:
    raise DataError(f"augmented_copies needs square images, got {size}")
  label = int(sources.labels[0])
  spec = augment.AugmentSpec(out_size=int(size[0]), **CONTROL_AUGMENT)
  warp = jax.jit(augment.augment, static_argnums=2)   # AugmentSpec is frozen: hashable
  key = jax.random.key(seed)
  out = []
  for start in range(0, count, _CHUNK):
    batch = sources.images[picks[start:start + _CHUNK]]
    x = np.asarray(warp(batch, jax.random.fold_in(key, start), spec))
    out.append(np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8))
  images = np.concatenate(out)
  files = tuple(f"augmented/{sources.files[p]}#{k}" for p, k in zip(picks, copy_number))
  return ImageSet(images=images, labels=np.full(count, label, np.int32), files=files,
                  hashes=tuple(pixel_hash(im[..., 0]) for im in images),
                  class_names=train.class_names)


def oversampled_training_set(train: ImageSet, class_name: str, count: int, seed: int, *,
                             held_out: Sequence[ImageSet] = ()) -> ImageSet:
  """The control row's training set: `train` followed by `augmented_copies(...)`."""
  return enhanced.concatenate(train, augmented_copies(train, class_name, count, seed,
                                                      held_out=held_out))


def source_file(copy_file: str) -> str:
  """`augmented/<source file>#<k>` -> `<source file>` (provenance of a copy)."""
  if not copy_file.startswith("augmented/") or "#" not in copy_file:
    raise ValueError(f"{copy_file!r} is not an augmented copy's name")
  return copy_file[len("augmented/"):].rsplit("#", 1)[0]


