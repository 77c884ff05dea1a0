"""Which training images a step sees, computed on the device from (rng, step) alone.

An epoch is one pass over the images in a seeded random order (`steps_per_epoch = n // batch`;
the remainder waits for the next epoch's order). Because the batch of step s depends only on the
run's key and s, a run resumed at step s sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import jax

DATA_STREAM = 0x5EED  # separates the data-order stream from the per-step stream


def epoch_batch(rng: jax.Array, step: jax.Array, num_items: int, batch_size: int,
                steps_per_epoch: int) -> jax.Array:
  """Indices [batch_size] of the images of `step`."""
  epoch, within = step // steps_per_epoch, step % steps_per_epoch
  order = jax.random.permutation(
      jax.random.fold_in(jax.random.fold_in(rng, DATA_STREAM), epoch), num_items)
  return jax.lax.dynamic_slice(order, (within * batch_size,), (batch_size,))
