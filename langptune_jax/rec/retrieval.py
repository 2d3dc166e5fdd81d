"""Cosine retrieval over the item catalogue: catalogue embedding, masked scoring, ranking, rewards.

The recommender decoder embeds profiles (queries) and item texts; items are
scored by cosine similarity, history items are masked to -inf, and the target's
rank gives both the evaluation metrics and the RL reward (see
:mod:`langptune_jax.rec.metrics` for the tie and masking rules).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from langptune_jax import distributed, observability, parallel
from langptune_jax.models import embedder as embedder_lib
from langptune_jax.rec import metrics

Array = jax.Array
EmbedFn = Callable[[Array, Array], Array]


l2_normalize = embedder_lib.l2_normalize


def cosine_scores(query_emb: Array, item_emb: Array) -> Array:
  """f32[B, N] cosine similarities; both sides are normalised here (idempotent if already)."""
  q = parallel.constrain(l2_normalize(query_emb), ("batch", None))
  it = l2_normalize(item_emb)
  scores = jnp.einsum("bd,nd->bn", q, it, precision=jax.lax.Precision.HIGHEST)
  return parallel.constrain(scores, ("batch", "items"))


def score_users(query_emb: Array, item_emb: Array, history: Array | None = None) -> Array:
  """Cosine scores with every history item set to -inf."""
  return metrics.mask_history(cosine_scores(query_emb, item_emb), history)


def profile_ranks(profile_emb: Array, item_emb: Array, targets: Array,
                  history: Array | None = None) -> Array:
  """i32[B] full-catalogue rank of each target for each profile embedding."""
  return metrics.target_ranks(cosine_scores(profile_emb, item_emb), targets, history)


def profile_rewards(profile_emb: Array, item_emb: Array, targets: Array,
                    history: Array | None = None, reward_type: str = "ndcg",
                    truncated: Array | None = None, penalty_reward: float = 0.0,
                    return_ranks: bool = False):
  """RL task reward f32[B] of each profile: how well it ranks its user's target.

  Args:
    profile_emb: f32[B, D] decoder embeddings of the profiles.
    item_emb: f32[N, D] catalogue embeddings.
    targets: i32[B] target item ids.
    history: i32[B, H] ids (-1 = padding), bool[B, N], or None.
    reward_type: 'ndcg' (1/log2(rank+1)), 'mrr' (1/rank) or 'recall@K'.
    truncated: bool[B], True where the profile filled the whole decoder window;
      those rows get `penalty_reward`.
    penalty_reward: reward of a truncated profile.
    return_ranks: also return the i32[B] ranks (for logging NDCG/MRR).
  """
  ranks = profile_ranks(profile_emb, item_emb, targets, history)
  rewards = metrics.rank_rewards(ranks, reward_type, truncated, penalty_reward)
  return (rewards, ranks) if return_ranks else rewards


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Pads to `rows` by repeating the last row (a real input, so any pooling stays finite)."""
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)], axis=0)


def embed_catalogue(embed_fn: EmbedFn, item_tokens: np.ndarray, item_mask: np.ndarray,
                    batch_size: int, mesh: Mesh | None = None, progress: bool = True,
                    desc: str = "embedding items", width_step: int = 32) -> np.ndarray:
  """Embeds every item text in fixed-size batches; returns L2-normalised f32[N, D] on the host.

  Args:
    embed_fn: (tokens i32[b, L], mask i32[b, L]) -> f32[b, D]; should be jitted
      (every call has the same shapes, so it compiles once).
    item_tokens: np i32[N, L] token ids, one row per item id.
    item_mask: np [N, L] attention mask.
    batch_size: rows per call; rounded up to a multiple of the data-parallel
      size when a mesh is given. The last batch is padded and the padding dropped.
    mesh: if given, each batch is placed with its rows sharded over the batch axes.
    progress: show a tqdm bar.
    width_step: batches are cut to their longest text rounded up to a multiple
      of this (texts must be right-padded); 0 keeps the full width.
  """
  item_tokens, item_mask = np.asarray(item_tokens), np.asarray(item_mask)
  if item_tokens.ndim != 2 or item_tokens.shape != item_mask.shape:
    raise ValueError(f"item_tokens {item_tokens.shape} and item_mask {item_mask.shape} must be "
                     "matching [num_items, length] arrays")
  if batch_size < 1:
    raise ValueError(f"embed batch_size={batch_size} must be >= 1")
  num_items = item_tokens.shape[0]
  if num_items == 0:
    raise ValueError("embed_catalogue: the item catalogue is empty")
  if mesh is not None:
    batch_size = _round_up(batch_size, parallel.data_parallel_size(mesh))
  chunks = []
  starts = range(0, num_items, batch_size)
  for start in observability.progress(starts, desc=desc, disable=not progress):
    stop = min(start + batch_size, num_items)
    # Drop trailing all-padding columns (right padding: they change nothing) in
    # steps of `width_step`, so short texts cost less and compiles stay few.
    width = item_tokens.shape[1]
    if width_step > 0:
      longest = int(item_mask[start:stop].astype(bool).sum(axis=1).max())
      width = min(width, _round_up(max(longest, 1), width_step))
    tokens = _pad_rows(item_tokens[start:stop, :width], batch_size)
    mask = _pad_rows(item_mask[start:stop, :width], batch_size)
    if mesh is not None:
      tokens = parallel.put(tokens, mesh, ("batch", None))
      mask = parallel.put(mask, mesh, ("batch", None))
    emb = distributed.to_host(embed_fn(tokens, mask))
    chunks.append(emb[: stop - start])
  emb = np.concatenate(chunks, axis=0).astype(np.float32)
  norm = np.linalg.norm(emb, axis=-1, keepdims=True)
  return emb / np.maximum(norm, 1e-12)


@functools.partial(jax.jit, static_argnames=("ks",))
def _rank_chunk(query_emb, item_emb, targets, history, ks):
  scores = score_users(query_emb, item_emb, history)
  ranks = metrics.target_ranks(scores, targets)
  top = metrics.topk_items(scores, None, max(ks))[0] if ks else None
  return ranks, top


def rank_users(query_emb: np.ndarray | Array, item_emb: np.ndarray | Array,
               targets: np.ndarray | Array, history: np.ndarray | Array | None = None,
               chunk_size: int = 1024, mesh: Mesh | None = None, top_k: int = 0,
               progress: bool = False):
  """Ranks of every user's target, in fixed-size user chunks (bounds the [chunk, N] scores).

  Args:
    query_emb: [U, D] profile/query embeddings.
    item_emb: [N, D] catalogue embeddings.
    targets: [U] target ids.
    history: [U, H] history ids (-1 = padding) or None.
    chunk_size: users per jitted call (the last chunk is padded, so one compile).
    mesh: if given, chunks are sharded over the batch axes and the catalogue replicated.
    top_k: if > 0, also return the i32[U, top_k] best non-history items.

  Returns:
    np i32[U] ranks, or (ranks, top ids) when top_k > 0.
  """
  query_emb, targets = np.asarray(query_emb, np.float32), np.asarray(targets, np.int32)
  num_users = query_emb.shape[0]
  if history is None:
    history = np.full((num_users, 1), -1, np.int32)
  history = np.asarray(history, np.int32)
  if targets.shape != (num_users,) or history.shape[0] != num_users:
    raise ValueError(f"rank_users: {num_users} queries but targets {targets.shape} and "
                     f"history {history.shape}")
  if mesh is not None:
    chunk_size = _round_up(chunk_size, parallel.data_parallel_size(mesh))
    item_emb = parallel.put(np.asarray(item_emb, np.float32), mesh, ("items", None))
  chunk_size = min(chunk_size, max(num_users, 1)) if mesh is None else chunk_size
  ks = (int(top_k),) if top_k > 0 else ()
  ranks, tops = [], []
  ctx = parallel.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  with ctx:
    for start in observability.progress(range(0, num_users, chunk_size), desc="ranking users",
                                       disable=not progress):
      stop = min(start + chunk_size, num_users)
      parts = [_pad_rows(a[start:stop], chunk_size) for a in (query_emb, targets, history)]
      if mesh is not None:
        parts = [parallel.put(p, mesh, ("batch",) + (None,) * (p.ndim - 1)) for p in parts]
      r, top = _rank_chunk(parts[0], item_emb, parts[1], parts[2], ks)
      ranks.append(distributed.to_host(r)[: stop - start])
      if ks:
        tops.append(distributed.to_host(top)[: stop - start])
  ranks = np.concatenate(ranks) if ranks else np.zeros((0,), np.int32)
  if ks:
    return ranks, (np.concatenate(tops) if tops else np.zeros((0, top_k), np.int32))
  return ranks


def evaluate_embeddings(query_emb, item_emb, targets, history=None,
                        ks: Sequence[int] = (5, 10, 20), chunk_size: int = 1024,
                        mesh: Mesh | None = None) -> dict[str, float]:
  """Full-catalogue Recall/Precision/MRR/NDCG@ks of query embeddings, as Python floats."""
  ranks = rank_users(query_emb, item_emb, targets, history, chunk_size=chunk_size, mesh=mesh)
  num_items = int(np.shape(item_emb)[0])
  out = metrics.metrics_at_k(jnp.asarray(ranks), tuple(ks), num_items)
  return {k: float(v) for k, v in out.items()}
