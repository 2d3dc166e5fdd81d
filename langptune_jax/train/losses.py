"""Loss math of both training phases: RLSO (REBEL-style) for the encoder, InfoNCE for the decoder.

Pure, jit-friendly functions of arrays; the jitted steps call them on the
global batch. Sequence log-probabilities are sums of masked token log-probs.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from langptune_jax import parallel
from langptune_jax.rec import retrieval

Array = jax.Array


def _weights(mask: Array | None, shape) -> Array:
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  return jnp.asarray(mask, jnp.float32)


def whiten(x: Array, mask: Array | None = None, eps: float = 1e-8) -> Array:
  """(x - mean) / sqrt(var + eps) over the (valid) batch, population variance.

  Rows where `mask` is False do not enter the statistics and come out as 0.
  """
  x = jnp.asarray(x, jnp.float32)
  w = _weights(mask, x.shape)
  n = jnp.maximum(jnp.sum(w), 1.0)
  mean = jnp.sum(x * w) / n
  var = jnp.sum(jnp.square(x - mean) * w) / n
  return (x - mean) * jax.lax.rsqrt(var + eps) * w


def whiten_chunks(x: Array, chunk: int = 0, eps: float = 1e-8) -> Array:
  """:func:`whiten` within consecutive chunks of `chunk` rows (0 or >= len: one chunk).

  The authors whiten on each GPU over its own 16 prompts x 2 samples; chunks of
  32 prompt-major rows reproduce that scope on any device count.
  """
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[0]
  if chunk <= 0 or chunk >= n:
    return whiten(x, eps=eps)
  if n % chunk:
    raise ValueError(f"rl.whiten_chunk={chunk} does not divide the {n} rewards of an update")
  return jax.vmap(lambda c: whiten(c, eps=eps))(x.reshape(-1, chunk)).reshape(n)


def kl_shaped_reward(task_reward: Array, logp_old: Array, logp_ref: Array,
                     kl_coef: float) -> tuple[Array, Array]:
  """Total reward = task_reward - kl_coef * KL, with the sequence KL estimate logp_old - logp_ref.

  Returns:
    (total_reward f32[B], kl f32[B]).
  """
  kl = jnp.asarray(logp_old, jnp.float32) - jnp.asarray(logp_ref, jnp.float32)
  return jnp.asarray(task_reward, jnp.float32) - kl_coef * kl, kl


def _pair_indices(group_size: int) -> tuple[np.ndarray, np.ndarray]:
  j, k = np.triu_indices(group_size, k=1)
  return j.astype(np.int32), k.astype(np.int32)


def rebel_loss(logp_new: Array, logp_old: Array, rewards: Array, group_size: int,
               eta: float = 1.0, mask: Array | None = None) -> Array:
  """REBEL regression of log-ratio differences onto reward differences, over all pairs of a group.

  Rows are prompt-major: prompt i's G samples are rows i*G .. i*G+G-1. For
  every pair j < k of one prompt,
  ``((logp_new_j - logp_old_j) - (logp_new_k - logp_old_k) - eta * (r_j - r_k))^2``,
  averaged over all (valid) pairs; a pair is valid when both rows are.
  With G = 2 this is exactly the paper's per-prompt loss.

  Args:
    logp_new, logp_old, rewards: f32[B*G] sequence log-probs and (total) rewards.
    group_size: G >= 2 (static).
    eta: reward scale.
    mask: optional bool[B*G] row validity.
  """
  if group_size < 2:
    raise ValueError(f"rl.num_generations={group_size}: REBEL needs at least 2 samples per prompt")
  n = logp_new.shape[0]
  if n % group_size:
    raise ValueError(f"REBEL batch of {n} rows is not a multiple of group_size={group_size}")
  d = ((jnp.asarray(logp_new, jnp.float32) - jnp.asarray(logp_old, jnp.float32))
       - eta * jnp.asarray(rewards, jnp.float32)).reshape(-1, group_size)
  w = _weights(mask, (n,)).reshape(-1, group_size)
  j, k = _pair_indices(group_size)
  sq = jnp.square(d[:, j] - d[:, k])
  pw = w[:, j] * w[:, k]
  return jnp.sum(sq * pw) / jnp.maximum(jnp.sum(pw), 1.0)


def group_permutation(key: Array, num_prompts: int, group_size: int) -> Array:
  """i32[num_prompts * G] row order that shuffles prompts but keeps each group's G rows together.

  For the shuffled passes over one rollout batch: rows stay prompt-major, so
  :func:`rebel_loss` still pairs samples of the same prompt.
  """
  prompts = jax.random.permutation(key, num_prompts)
  return (prompts[:, None] * group_size + jnp.arange(group_size)[None, :]).reshape(-1)


def info_nce(query: Array, keys: Array, temperature: float = 0.1, ks: Sequence[int] = (1, 5),
             valid: Array | None = None, key_ids: Array | None = None, group_size: int = 0
             ) -> tuple[Array, dict[str, Array]]:
  """InfoNCE: row i's positive is key i, every other key of its group a negative.

  Both sides are L2-normalised; logits = cosine / temperature; the loss is the
  mean cross-entropy with the diagonal as label. Inside a jitted step with a
  batch-sharded input the [B, B] logits use every key of the global batch.

  Args:
    query: f32[B, D] profile embeddings.
    keys: f32[B, D] target-item embeddings.
    temperature: softmax temperature.
    ks: static cutoffs for the in-batch recall@k metrics.
    valid: optional bool[B]; invalid rows are neither anchors nor negatives.
    key_ids: optional i32[B] item id of each key; another row's key with the
      same item id as the positive is not used as a negative (duplicate targets).
    group_size: 0: the whole (global) batch is one group; G > 0: consecutive
      groups of G rows are separate InfoNCE batches (the authors' per-device
      micro-batch of 32 pairs). The loss is the mean over all rows either way.

  Returns:
    (loss, metrics) with metrics ``accuracy`` (argmax is the positive, pessimistic
    ties) and ``recall@k`` (rank of the positive <= k) averaged over valid rows.
  """
  q = parallel.constrain(retrieval.l2_normalize(query), ("batch", None))
  kk = retrieval.l2_normalize(keys)
  b = q.shape[0]
  logits = jnp.einsum("bd,nd->bn", q, kk, precision=jax.lax.Precision.HIGHEST) / temperature
  logits = parallel.constrain(logits, ("batch", None))
  eye = jnp.eye(b, dtype=jnp.bool_)
  drop = jnp.zeros((b, b), jnp.bool_)
  if valid is not None:
    drop = drop | ~jnp.asarray(valid, jnp.bool_)[None, :]
  if key_ids is not None:
    ids = jnp.asarray(key_ids)
    drop = drop | (ids[:, None] == ids[None, :])
  if group_size:
    if b % group_size:
      raise ValueError(f"InfoNCE batch of {b} rows is not a multiple of cl.group_size={group_size}")
    group = jnp.arange(b) // group_size
    drop = drop | (group[:, None] != group[None, :])
  logits = jnp.where(drop & ~eye, -jnp.inf, logits)
  # The diagonal as a masked row sum (exact: one term per row). jnp.diagonal's gradient
  # is a conditional holding collectives, which XLA:CPU may start in a different order
  # on different devices of a sharded step and then wait on forever.
  pos = jnp.sum(jnp.where(eye, logits, 0.0), axis=-1)
  nll = jax.nn.logsumexp(logits, axis=-1) - pos
  rank = jnp.sum(logits >= pos[:, None], axis=-1)
  w = _weights(valid, (b,))
  n = jnp.maximum(jnp.sum(w), 1.0)
  loss = jnp.sum(nll * w) / n
  out = {"loss": loss, "accuracy": jnp.sum((rank <= 1) * w) / n}
  for k in ks:
    out[f"recall@{k}"] = jnp.sum((rank <= k) * w) / n
  return loss, out


def rl_metrics(task_reward: Array, total_reward: Array, kl: Array, logp_new: Array,
               logp_old: Array, entropy: Array | None = None, mask: Array | None = None,
               loss: Array | None = None) -> dict[str, Array]:
  """Scalars logged by an RLSO update (means over valid rows).

  ratio = exp(logp_new - logp_old) of whole sequences; approx_kl =
  mean((ratio - 1) - log ratio), a non-negative estimate of KL(old || new).
  """
  w = _weights(mask, jnp.shape(task_reward))
  n = jnp.maximum(jnp.sum(w), 1.0)

  def mean(x):
    return jnp.sum(jnp.asarray(x, jnp.float32) * w) / n

  log_ratio = jnp.asarray(logp_new, jnp.float32) - jnp.asarray(logp_old, jnp.float32)
  ratio = jnp.exp(log_ratio)
  reward = mean(task_reward)
  out = {
      "reward": reward,
      "reward_std": jnp.sqrt(mean(jnp.square(jnp.asarray(task_reward, jnp.float32) - reward))),
      "total_reward": mean(total_reward),
      "kl": mean(kl),
      "ratio": mean(ratio),
      "approx_kl": mean((ratio - 1.0) - log_ratio),
      "log_ratio_abs": mean(jnp.abs(log_ratio)),
  }
  if entropy is not None:
    out["entropy"] = mean(entropy)
  if loss is not None:
    out["loss"] = jnp.asarray(loss, jnp.float32)
  return out
