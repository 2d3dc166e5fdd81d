"""Cosine retrieval, catalogue embedding, chunked ranking and profile rewards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from langptune_jax import parallel
from langptune_jax.rec import metrics, retrieval


def np_cosine(q, it):
  q = q / np.linalg.norm(q, axis=-1, keepdims=True)
  it = it / np.linalg.norm(it, axis=-1, keepdims=True)
  return q @ it.T


def data_mesh():
  from ml_collections import ConfigDict
  return parallel.make_mesh(ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))


def test_cosine_and_masking():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(3, 8)).astype(np.float32) * 5
  it = rng.normal(size=(10, 8)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(retrieval.cosine_scores(q, it)), np_cosine(q, it),
                             atol=1e-5)
  # Already-normalised inputs give the same scores (normalisation is idempotent).
  np.testing.assert_allclose(
      np.asarray(retrieval.cosine_scores(retrieval.l2_normalize(q), retrieval.l2_normalize(it))),
      np_cosine(q, it), atol=1e-5)
  s = np.asarray(retrieval.score_users(q, it, np.array([[2, -1], [0, 9], [-1, -1]])))
  assert np.isneginf(s[0, 2]) and np.isneginf(s[1, 0]) and np.isneginf(s[1, 9])
  assert np.isfinite(s[2]).all() and np.isfinite(s[0, [0, 1, 3]]).all()


def test_profile_rewards_vs_numpy():
  rng = np.random.default_rng(1)
  b, n, d = 6, 30, 16
  q = rng.normal(size=(b, d)).astype(np.float32)
  it = rng.normal(size=(n, d)).astype(np.float32)
  targets = rng.integers(0, n, b)
  history = rng.integers(-1, n, (b, 4))
  history[0, 0] = targets[0]  # a masked target
  trunc = np.array([False, False, True, False, False, False])
  s = np_cosine(q, it)
  ranks = []
  for i in range(b):
    row = s[i].copy()
    row[history[i][history[i] >= 0]] = -np.inf
    ranks.append(1 + np.sum(np.delete(row, targets[i]) >= row[targets[i]]))
  ranks = np.array(ranks, np.float64)
  assert ranks[0] == n
  ndcg, got_ranks = retrieval.profile_rewards(q, it, targets, history, "ndcg", trunc,
                                              penalty_reward=0.0, return_ranks=True)
  np.testing.assert_array_equal(np.asarray(got_ranks), ranks)
  want = 1 / np.log2(ranks + 1)
  want[2] = 0.0
  np.testing.assert_allclose(np.asarray(ndcg), want, rtol=1e-6)
  mrr = retrieval.profile_rewards(q, it, targets, history, "mrr", None)
  np.testing.assert_allclose(np.asarray(mrr), 1 / ranks, rtol=1e-6)


def test_profile_rewards_jit_sharded():
  mesh = data_mesh()
  rng = np.random.default_rng(2)
  q = rng.normal(size=(8, 16)).astype(np.float32)
  it = rng.normal(size=(24, 16)).astype(np.float32)
  t = rng.integers(0, 24, 8)
  h = rng.integers(-1, 24, (8, 3))
  want = np.asarray(retrieval.profile_rewards(q, it, t, h))
  with parallel.use_mesh(mesh):
    got = jax.jit(retrieval.profile_rewards)(
        parallel.put(q, mesh, ("batch", None)), it, parallel.put(t, mesh, ("batch",)),
        parallel.put(h, mesh, ("batch", None)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def fake_embedder(calls):
  """Mean of (token id * mask) features, in a fixed dimension; records batch shapes."""
  table = np.random.default_rng(3).normal(size=(50, 6)).astype(np.float32)

  @jax.jit
  def embed(tokens, mask):
    e = jnp.asarray(table)[tokens] * mask[..., None]
    return e.sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1) * 3.0

  def fn(tokens, mask):
    calls.append((tokens.shape, getattr(tokens, "sharding", None)))
    return embed(tokens, mask)

  return fn, table


@pytest.mark.parametrize("use_mesh", [False, True])
def test_embed_catalogue(use_mesh):
  rng = np.random.default_rng(4)
  n, length = 21, 5
  tokens = rng.integers(0, 50, (n, length)).astype(np.int32)
  mask = (rng.random((n, length)) > 0.3).astype(np.int32)
  mask[:, 0] = 1
  calls = []
  fn, table = fake_embedder(calls)
  mesh = data_mesh() if use_mesh else None
  got = retrieval.embed_catalogue(fn, tokens, mask, batch_size=6, mesh=mesh, progress=False)
  want = (table[tokens] * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  want /= np.linalg.norm(want, axis=-1, keepdims=True)
  assert got.shape == (n, 6)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
  shapes = {c[0] for c in calls}
  if use_mesh:
    assert shapes == {(8, length)} and len(calls) == 3  # 6 rounded up to the 8 devices
    sharding = calls[0][1]
    assert isinstance(sharding, NamedSharding) and sharding.spec[0] is not None
  else:
    assert shapes == {(6, length)} and len(calls) == 4  # one compile: last batch padded


def test_embed_catalogue_bad_input():
  with pytest.raises(ValueError, match="item_mask"):
    retrieval.embed_catalogue(lambda t, m: t, np.zeros((3, 4)), np.zeros((3, 5)), 2,
                              progress=False)


@pytest.mark.parametrize("use_mesh", [False, True])
def test_rank_users_chunked(use_mesh):
  rng = np.random.default_rng(5)
  u, n, d = 19, 33, 8
  q = rng.normal(size=(u, d)).astype(np.float32)
  it = rng.normal(size=(n, d)).astype(np.float32)
  t = rng.integers(0, n, u)
  h = rng.integers(-1, n, (u, 4))
  want = np.asarray(metrics.target_ranks(np_cosine(q, it), t, h))
  mesh = data_mesh() if use_mesh else None
  ranks, top = retrieval.rank_users(q, it, t, h, chunk_size=5, mesh=mesh, top_k=3)
  np.testing.assert_array_equal(ranks, want)
  s = np_cosine(q, it)
  for i in range(u):
    s[i, h[i][h[i] >= 0]] = -np.inf
  np.testing.assert_array_equal(top, np.argsort(-s, axis=1, kind="stable")[:, :3])
  np.testing.assert_array_equal(retrieval.rank_users(q, it, t, h, chunk_size=1000), want)


def test_evaluate_embeddings():
  it = np.eye(4, dtype=np.float32)
  q = np.array([[1, 0.5, 0, 0], [0, 0, 0, 1]], np.float32)
  out = retrieval.evaluate_embeddings(q, it, np.array([1, 3]), np.array([[0], [-1]]), ks=(1, 2))
  # User 0: item 0 masked, target 1 is best -> rank 1; user 1: target is best -> rank 1.
  assert out["recall@1"] == 1.0 and out["precision@2"] == 0.5
