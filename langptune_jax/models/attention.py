"""Masked softmax attention over grouped heads, with a hand-written gradient.

Layout: queries ``[B, K, G*T, D]`` (the G query heads that share key/value
head k stacked along rows, head-major), keys and values ``[B, K, S, D]``, a
boolean mask broadcastable to ``[B, T, S]``. Scores and softmax statistics
are float32 whatever the compute dtype.

Why a custom gradient: differentiating ``softmax(where(mask, q k^T))`` through
autodiff makes XLA:CPU write the probabilities, the masked scores and their
cotangents as separate full ``[G*T, S]`` passes. The rule below keeps the
unnormalised exponentials ``e`` and the row normalisers ``1/l`` only,
normalises the ``[G*T, D]`` output instead of the ``[G*T, S]`` probabilities,
and uses ``rowsum(dO * O)`` for the softmax backward (the identity flash
attention uses), so no extra pass over the score matrix is needed.

:func:`causal_attention` serves a causal mask over the queries' own keys
(S == T, no cache): each chunk of queries reads only the keys up to its last
position, skipping most of the all-masked upper triangle.

Masked entries get zero gradient, as with autodiff of ``where``: inside a row
with at least one visible key their exponential is exactly 0; a row with none
(a padding query) gets a uniform softmax forward, as the models require, and
no gradient to its scores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Finite "minus infinity": a fully masked row yields a uniform softmax, not NaNs.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_BATCH_DIMS = ((0, 1), (0, 1))


def masked_scores(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, K, G*T, S] scores -> [B, K, G, T, S] with masked entries set to MASK_VALUE."""
  b, kv_heads, rows, s = scores.shape
  t = mask.shape[-2]
  if rows % t:
    raise ValueError(f"attention: {rows} query rows are not a multiple of the mask's {t} rows")
  scores = scores.reshape(b, kv_heads, rows // t, t, s)
  return jnp.where(mask[:, None, None], scores, MASK_VALUE)


def _forward(q, k, v, mask, scale):
  """(out, e, inv_l, live): the output and what the gradient needs."""
  b, kv_heads, rows, _ = q.shape
  scores = jax.lax.dot_general(q, k, (((3,), (3,)), _BATCH_DIMS),
                               preferred_element_type=jnp.float32) * scale
  scores = masked_scores(scores, mask)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  e = jnp.exp(scores - row_max)
  inv_l = (1.0 / jnp.sum(e, axis=-1, keepdims=True)).reshape(b, kv_heads, rows, 1)
  live = (row_max > 0.5 * MASK_VALUE).reshape(b, kv_heads, rows, 1)  # some key visible
  e = e.reshape(b, kv_heads, rows, -1).astype(q.dtype)
  out = jax.lax.dot_general(e, v, (((3,), (2,)), _BATCH_DIMS),
                            preferred_element_type=jnp.float32) * inv_l
  return out.astype(q.dtype), e, inv_l, live


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     scale: float) -> jax.Array:
  """softmax(scale * q k^T, masked) v, per batch row and key/value head."""
  return _forward(q, k, v, mask, scale)[0]


def _attention_fwd(q, k, v, mask, scale):
  out, e, inv_l, live = _forward(q, k, v, mask, scale)
  return out, (q, k, v, out, e, inv_l, live)


def _attention_bwd(scale, residuals, d_out):
  q, k, v, out, e, inv_l, live = residuals
  f32 = jnp.float32
  # rowsum(P * dP) == rowsum(dO * O): a [rows, D] reduction, not a [rows, S] one.
  d_sum = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
  d_probs = jax.lax.dot_general(d_out, v, (((3,), (3,)), _BATCH_DIMS),
                                preferred_element_type=f32)
  d_scores = (e * ((d_probs - d_sum) * jnp.where(live, inv_l * scale, 0.0))).astype(q.dtype)
  d_q = jax.lax.dot_general(d_scores, k, (((3,), (2,)), _BATCH_DIMS))
  d_k = jax.lax.dot_general(d_scores, q, (((2,), (2,)), _BATCH_DIMS))
  d_v = jax.lax.dot_general(e, (d_out * inv_l).astype(v.dtype), (((2,), (2,)), _BATCH_DIMS))
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


masked_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                     num_chunks: int) -> jax.Array:
  """:func:`masked_attention` for queries at slots 0..T-1 over keys 0..T-1 with a causal mask.

  The T queries are split into `num_chunks` contiguous chunks; chunk [lo, hi)
  attends to keys [0, hi) only, which a causal mask makes exact (4 chunks do
  10/16 of the score work). The one difference: a query that sees no key at all
  (a padding position) averages the values of its chunk's key range instead of
  all T, and such outputs are never read.
  """
  b, kv_heads, rows, d = q.shape
  t = mask.shape[-2]
  if num_chunks <= 1 or mask.shape != (b, t, t) or k.shape[2] != t:
    return masked_attention(q, k, v, mask, scale)
  groups = rows // t
  bounds = [round(t * i / num_chunks) for i in range(num_chunks + 1)]
  q = q.reshape(b, kv_heads, groups, t, d)
  outs = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    q_chunk = q[:, :, :, lo:hi].reshape(b, kv_heads, groups * (hi - lo), d)
    out = masked_attention(q_chunk, k[:, :, :hi], v[:, :, :hi], mask[:, lo:hi, :hi], scale)
    outs.append(out.reshape(b, kv_heads, groups, hi - lo, d))
  return jnp.concatenate(outs, axis=3).reshape(b, kv_heads, rows, d)
