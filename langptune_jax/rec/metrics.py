"""Full-catalogue ranking metrics: target ranks, Recall/Precision/MRR/NDCG@k, rank rewards.

Conventions (shared by evaluation, rewards and logging):

* Scores are ``f32[B, N]`` (one row per user, one column per item id in
  ``[0, N)``); larger is better.
* A user's history items are excluded from ranking by setting their scores to
  ``-inf``. The history is either item ids ``i32[B, H]`` with ``-1`` as padding
  or a boolean mask ``bool[B, N]``.
* **Ties are broken pessimistically**: the rank of the target is
  ``1 + #{other items with score >= target score}`` (items tying with the
  target are placed before it). The rank therefore never depends on item order
  and a constant scorer gets the worst rank, not the best.
* **A target that is itself in the history** is masked like every history item:
  its score becomes ``-inf`` and, by the tie rule, its rank is ``N`` (the worst
  possible), which counts as a miss for every ``k < N``.
* NaN scores are treated as ``-inf``.

Per-row metrics for a single target at rank ``r`` and cutoff ``k``
(``k`` is clipped to the catalogue size ``N``):
Recall@k = [r <= k]; Precision@k = [r <= k] / k; MRR@k = [r <= k] / r;
NDCG@k = [r <= k] / log2(r + 1); and the uncut MRR = 1 / r, NDCG = 1 / log2(r + 1).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from langptune_jax import parallel

Array = jax.Array

REWARD_TYPES = ("ndcg", "mrr", "recall@k")


def history_mask(history: Array, num_items: int) -> Array:
  """bool[B, N] with True at every history item.

  Args:
    history: item ids i32[B, H] with -1 (any negative id) as padding, or an
      already built bool[B, N] mask (returned unchanged).
    num_items: catalogue size N.
  """
  history = jnp.asarray(history)
  if history.dtype == jnp.bool_:
    if history.shape[-1] != num_items:
      raise ValueError(f"history mask has {history.shape[-1]} columns, expected {num_items} items")
    return history
  if not jnp.issubdtype(history.dtype, jnp.integer):
    raise ValueError(f"history must be integer item ids or a bool mask, got dtype {history.dtype}")
  batch = history.shape[0]
  valid = (history >= 0) & (history < num_items)
  # Padding ids scatter into a dummy extra column that is dropped afterwards.
  ids = jnp.where(valid, history, num_items)
  mask = jnp.zeros((batch, num_items + 1), jnp.bool_)
  mask = mask.at[jnp.arange(batch)[:, None], ids].set(True)
  return mask[:, :num_items]


def mask_history(scores: Array, history: Array | None) -> Array:
  """Scores with every history item set to -inf (no-op when history is None)."""
  scores = jnp.asarray(scores, jnp.float32)
  if history is None:
    return scores
  mask = history_mask(history, scores.shape[-1])
  return parallel.constrain(jnp.where(mask, -jnp.inf, scores), ("batch", "items"))


def target_ranks(scores: Array, targets: Array, history: Array | None = None) -> Array:
  """1-based rank of each target among all items, history excluded.

  Args:
    scores: f32[B, N].
    targets: i32[B] item ids (out-of-range ids are clipped; mark such padding
      rows invalid when aggregating).
    history: i32[B, H] ids (-1 = padding), bool[B, N] mask, or None.

  Returns:
    i32[B] ranks in [1, N] with pessimistic ties (see the module docstring).
  """
  scores = mask_history(scores, history)
  # A NaN score (e.g. a broken embedding) ranks like -inf instead of giving rank 0.
  scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
  num_items = scores.shape[-1]
  targets = jnp.clip(jnp.asarray(targets, jnp.int32), 0, num_items - 1)
  target_score = jnp.take_along_axis(scores, targets[:, None], axis=-1)
  # Counting ">=" includes the target itself, so this is 1 + #others >= it.
  return jnp.sum(scores >= target_score, axis=-1, dtype=jnp.int32)


def _clip_k(k: int, num_items: int | None) -> int:
  if k < 1:
    raise ValueError(f"ranking cutoff k={k} must be >= 1")
  return k if num_items is None else min(k, num_items)


def per_user_metrics(ranks: Array, ks: Sequence[int] = (5, 10, 20),
                     num_items: int | None = None) -> dict[str, Array]:
  """Per-row metrics f32[B] keyed ``recall@k, precision@k, mrr@k, ndcg@k, mrr, ndcg``."""
  ranks = jnp.asarray(ranks).astype(jnp.float32)
  inv_log = 1.0 / jnp.log2(ranks + 1.0)
  out: dict[str, Array] = {}
  for k in ks:
    kk = _clip_k(int(k), num_items)
    hit = (ranks <= kk).astype(jnp.float32)
    out[f"recall@{k}"] = hit
    out[f"precision@{k}"] = hit / kk
    out[f"mrr@{k}"] = hit / ranks
    out[f"ndcg@{k}"] = hit * inv_log
  out["mrr"] = 1.0 / ranks
  out["ndcg"] = inv_log
  return out


def masked_mean(x: Array, valid: Array | None = None) -> Array:
  """Mean of x over rows where `valid` (bool[B]) is True; 0 when no row is valid."""
  x = jnp.asarray(x, jnp.float32)
  if valid is None:
    return jnp.mean(x)
  w = jnp.asarray(valid, jnp.float32)
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def aggregate(per_row: Mapping[str, Array], valid: Array | None = None) -> dict[str, Array]:
  """Means over valid rows of every per-row metric."""
  return {name: masked_mean(v, valid) for name, v in per_row.items()}


def metrics_at_k(ranks: Array, ks: Sequence[int] = (5, 10, 20), num_items: int | None = None,
                 valid: Array | None = None) -> dict[str, Array]:
  """Recall/Precision/MRR/NDCG@k and full MRR/NDCG, averaged over valid rows.

  Args:
    ranks: i32[B] 1-based ranks (from :func:`target_ranks`).
    ks: static cutoffs; a k larger than `num_items` is clipped to it (the key
      keeps the requested k).
    num_items: catalogue size N (None: no clipping).
    valid: optional bool[B]; False rows (padding of an eval batch) are ignored.
  """
  return aggregate(per_user_metrics(ranks, ks, num_items), valid)


def topk_items(scores: Array, history: Array | None, k: int) -> tuple[Array, Array]:
  """The k best non-history items per row.

  Returns:
    (ids i32[B, k], scores f32[B, k]), best first; equal scores come in item-id
    order. Slots beyond the available items (k > N, or only masked items left)
    hold id -1 and score -inf.
  """
  scores = mask_history(scores, history)
  batch, num_items = scores.shape
  kk = _clip_k(int(k), num_items)
  top_scores, top_ids = jax.lax.top_k(scores, kk)
  top_ids = jnp.where(jnp.isneginf(top_scores), -1, top_ids).astype(jnp.int32)
  if kk < k:
    top_ids = jnp.concatenate([top_ids, jnp.full((batch, k - kk), -1, jnp.int32)], axis=-1)
    top_scores = jnp.concatenate([top_scores, jnp.full((batch, k - kk), -jnp.inf)], axis=-1)
  return top_ids, top_scores


def parse_reward_type(reward_type: str) -> tuple[str, int]:
  """'ndcg' | 'mrr' | 'recall@K' -> (kind, K); raises on anything else."""
  name = reward_type.strip().lower()
  if name in ("ndcg", "mrr"):
    return name, 0
  if name.startswith("recall@"):
    try:
      k = int(name.split("@", 1)[1])
    except ValueError:
      k = 0
    if k >= 1:
      return "recall", k
  raise ValueError(f"rl.reward_type={reward_type!r}: expected 'ndcg', 'mrr' or 'recall@K' (K >= 1)")


def rank_rewards(ranks: Array, reward_type: str = "ndcg", truncated: Array | None = None,
                 penalty_reward: float = 0.0) -> Array:
  """Task reward per row from the target's full-catalogue rank (no cutoff).

  ndcg: 1 / log2(rank + 1); mrr: 1 / rank; recall@K: [rank <= K]. Rows whose
  profile filled the decoder window (`truncated`, bool[B]) get `penalty_reward`.
  """
  kind, k = parse_reward_type(reward_type)
  ranks = jnp.asarray(ranks).astype(jnp.float32)
  if kind == "ndcg":
    reward = 1.0 / jnp.log2(ranks + 1.0)
  elif kind == "mrr":
    reward = 1.0 / ranks
  else:
    reward = (ranks <= k).astype(jnp.float32)
  if truncated is not None:
    reward = jnp.where(jnp.asarray(truncated, jnp.bool_), jnp.float32(penalty_reward), reward)
  return reward


def rank_log_metrics(ranks: Array, valid: Array | None = None) -> dict[str, Array]:
  """Batch means of NDCG and MRR (no cutoff) for logging, whatever the reward type."""
  per_row = per_user_metrics(ranks, ks=(), num_items=None)
  return aggregate(per_row, valid)
