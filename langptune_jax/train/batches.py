"""Seeded random streams and the batches of the two phases.

Every random draw of a run (batch order, sampling keys) is derived from
(seed, iteration, stream, step), so any step can be reproduced on resume.
"""

from __future__ import annotations

import jax
import numpy as np

from langptune_jax.train.run_data import RunData


def rng_for(seed: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng([seed, *keys])


def key_for(seed: int, *keys: int) -> jax.Array:
  key = jax.random.key(seed)
  for k in keys:
    key = jax.random.fold_in(key, k)
  return key


def batch_rows(seed: int, num_rows: int, batch_size: int, step: int, iteration: int,
               stream: int) -> np.ndarray:
  """Rows of batch `step`: a seeded permutation per epoch, so any step is reproducible."""
  epoch, offset = divmod(step, num_rows // batch_size)
  order = rng_for(seed, iteration, stream, epoch).permutation(num_rows)
  return order[offset * batch_size:(offset + 1) * batch_size]


def cl_batch(query_tokens: np.ndarray, query_mask: np.ndarray, data: RunData,
             targets: np.ndarray) -> dict[str, np.ndarray]:
  """An InfoNCE batch: each query row against the text of its target item."""
  return {"profile_tokens": query_tokens, "profile_mask": query_mask,
          "item_tokens": data.item_tokens[targets], "item_mask": data.item_mask[targets],
          "item_ids": targets}
