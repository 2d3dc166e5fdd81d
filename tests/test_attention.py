"""The attention core: value and gradients equal autodiff of the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vjp_check import assert_vjp_matches

from langptune_jax.models import attention


def plain_attention(q, k, v, mask, scale):
  """softmax(where(mask, scale q k^T)) v, differentiated by JAX itself."""
  b, kv_heads, rows, _ = q.shape
  t = mask.shape[-2]
  scores = jnp.einsum("bkrd,bksd->bkrs", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  scores = scores.reshape(b, kv_heads, rows // t, t, -1)
  scores = jnp.where(mask[:, None, None], scores, attention.MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).reshape(b, kv_heads, rows, -1)
  return jnp.einsum("bkrs,bksd->bkrd", probs, v.astype(jnp.float32)).astype(q.dtype)


def _inputs(dtype, mask_rows):
  b, kv_heads, groups, t, s, d = 2, 2, 3, 5, 5, 4
  kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(kq, (b, kv_heads, groups * t, d), dtype)
  k = jax.random.normal(kk, (b, kv_heads, s, d), dtype)
  v = jax.random.normal(kv, (b, kv_heads, s, d), dtype)
  cotangent = jax.random.normal(kg, q.shape, dtype)
  valid = np.ones((b, s), bool)
  valid[0, :2] = False  # left padding: row 0's first two queries see no key at all
  if mask_rows == "causal":
    mask = np.tril(np.ones((t, s), bool))[None] & valid[:, None, :]
  else:  # one key mask shared by every query, as in a bidirectional encoder
    mask = valid[:, None, :]
  return q, k, v, jnp.asarray(mask), cotangent


@pytest.mark.parametrize("mask_rows", ["causal", "keys_only"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_masked_attention_matches_autodiff(dtype, tol, mask_rows):
  q, k, v, mask, cotangent = _inputs(dtype, mask_rows)
  fused = lambda q, k, v: attention.masked_attention(q, k, v, mask, 0.7)
  plain = lambda q, k, v: plain_attention(q, k, v, mask, 0.7)
  assert_vjp_matches(plain, fused, (q, k, v), cotangent, tol)


def test_fully_masked_query_is_uniform_and_gets_no_score_gradient():
  q, k, v, mask, _ = _inputs(jnp.float32, "causal")
  out = attention.masked_attention(q, k, v, mask, 0.7)
  # Row 0, query 0 sees no key: every head's output is the plain mean of the values.
  np.testing.assert_allclose(np.asarray(out[0, :, 0]), np.asarray(v[0].mean(axis=1)), atol=1e-6)
  # Its output's gradient reaches the values only, never the queries.
  cotangent = jnp.zeros_like(q).at[0, :, 0].set(1.0)
  _, vjp = jax.vjp(lambda q, k, v: attention.masked_attention(q, k, v, mask, 0.7), q, k, v)
  d_q, d_k, d_v = vjp(cotangent)
  assert float(jnp.abs(d_q).max()) == 0.0 and float(jnp.abs(d_k).max()) == 0.0
  assert float(jnp.abs(d_v[0]).max()) > 0.0


def test_rows_must_be_whole_groups_of_mask_rows():
  q, k, v, mask, _ = _inputs(jnp.float32, "causal")
  with pytest.raises(ValueError, match="not a multiple"):
    attention.masked_attention(q[:, :, :7], k, v, mask, 1.0)


@pytest.mark.parametrize("num_chunks", [2, 3])
def test_causal_chunks_equal_one_pass_on_every_query_that_sees_a_key(num_chunks):
  q, k, v, mask, cotangent = _inputs(jnp.float32, "causal")
  live = np.asarray(mask).any(-1)  # [B, T]: queries with at least one visible key
  groups = q.shape[2] // mask.shape[1]
  live_rows = jnp.asarray(np.tile(live, (1, groups))[:, None, :, None])  # [B, 1, G*T, 1]
  cotangent = cotangent * live_rows  # the loss reads live queries only, as the models do
  chunked = lambda q, k, v: attention.causal_attention(q, k, v, mask, 0.7, num_chunks)
  whole = lambda q, k, v: attention.masked_attention(q, k, v, mask, 0.7)
  want_y, want_vjp = jax.vjp(whole, q, k, v)
  got_y, got_vjp = jax.vjp(chunked, q, k, v)
  np.testing.assert_allclose(np.asarray(got_y * live_rows), np.asarray(want_y * live_rows),
                             atol=1e-5)
  for got, want in zip(got_vjp(cotangent), want_vjp(cotangent)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "cudnn"])
@pytest.mark.parametrize("local", [False, True])
def test_fused_attention_by_config_matches_masked(impl, local):
  """jax.nn.dot_product_attention ('xla'; 'cudnn' falls back off GPU) scores as our kernel."""
  import sys

  from flax import nnx

  sys.path.insert(0, __file__.rsplit("/", 1)[0])
  import planted

  from langptune_jax import sampling

  extra = dict(sliding_window=3, layer_types=("local", "global")) if local else {}
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(4, 24, (4, 12)), jnp.int32)
  mask = jnp.asarray(np.arange(12)[None] >= np.array([[0], [3], [5], [1]]))
  outs = []
  for name in ("masked", impl):
    model = planted.tiny_encoder(24, attention_impl=name, **extra)
    graphdef, params = nnx.split(model)

    def score(p):
      logp = sampling.token_logprobs(nnx.merge(graphdef, p), tokens, mask)
      return jnp.sum(logp) / 48, logp

    outs.append(jax.jit(jax.value_and_grad(score, has_aux=True))(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), outs[0], outs[1])
  assert float(jnp.min(outs[0][0][1])) < -1.0


def test_unknown_attention_impl_is_an_error():
  from langptune_jax.models import transformer
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    transformer.DecoderConfig(family="llama", vocab_size=8, embed_dim=8, num_layers=1,
                              num_heads=2, num_kv_heads=1, head_dim=4, mlp_dim=8,
                              attention_impl="flash")
