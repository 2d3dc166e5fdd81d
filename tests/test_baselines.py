"""Popularity, random and SASRec baselines on hand-made and planted data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from langptune_jax.rec import baselines, metrics


def test_item_counts_and_popularity_rank_most_frequent_first():
  counts = baselines.item_counts([3, 1, 3, 3, 0, 1], num_items=5)
  np.testing.assert_array_equal(counts, [1, 2, 0, 3, 0])
  pop = baselines.popularity_scores(counts, 5)
  scores = jnp.broadcast_to(pop, (2, 5))
  ids, _ = metrics.topk_items(scores, None, 2)
  np.testing.assert_array_equal(np.asarray(ids), [[3, 1], [3, 1]])
  # With the most popular item in the history, the next one ranks first.
  ranks = metrics.target_ranks(scores, jnp.array([3, 1]), jnp.array([[-1], [3]]))
  np.testing.assert_array_equal(np.asarray(ranks), [1, 1])
  with pytest.raises(ValueError, match="item ids"):
    baselines.item_counts([5], num_items=5)
  with pytest.raises(ValueError, match="shape"):
    baselines.popularity_scores(counts, 6)


def test_random_scores_seeded():
  a = baselines.random_scores(jax.random.key(0), 4, 10)
  b = baselines.random_scores(jax.random.key(0), 4, 10)
  c = baselines.random_scores(jax.random.key(1), 4, 10)
  assert a.shape == (4, 10)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_left_pad_histories():
  out = baselines.left_pad_histories([[4, 5, 6, 7], [2], []], max_len=3)
  np.testing.assert_array_equal(out, [[6, 7, 8], [0, 0, 3], [0, 0, 0]])
  out2 = baselines.left_pad_histories(np.array([[1, -1, 2], [-1, -1, 0]]), max_len=3)
  np.testing.assert_array_equal(out2, [[0, 2, 3], [0, 0, 1]])


def test_sasrec_is_causal_and_ignores_padding():
  model = baselines.SASRec(12, max_len=6, embed_dim=16, num_heads=2, dropout=0.0,
                           rngs=nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  hidden = jax.jit(lambda s, t: nnx.merge(graphdef, s).hidden(t))
  # Row 1 changes the last item; row 2 has more left padding than row 0.
  tokens = jnp.array([[0, 0, 3, 4, 5, 6], [0, 0, 3, 4, 5, 9], [0, 0, 0, 0, 5, 6]])
  h = np.asarray(hidden(state, tokens))
  # Changing a later item leaves earlier positions unchanged.
  np.testing.assert_allclose(h[0, :5], h[1, :5], atol=1e-6)
  assert not np.allclose(h[0, 5], h[1, 5])
  # Left padding is never attended to: the same items without padding give the same states.
  h_short = np.asarray(hidden(state, tokens[:1, 2:]))
  np.testing.assert_allclose(h[0, 2:], h_short[0], atol=1e-5)
  assert np.all(np.isfinite(h))
  assert model(tokens[:1]).shape == (1, 12)


def test_sasrec_errors():
  with pytest.raises(ValueError, match="loss"):
    baselines.train_sasrec([[0, 1]], 3, steps=1, loss="hinge", progress=False)
  with pytest.raises(ValueError, match="outside"):
    baselines.train_sasrec([[0, 7]], 3, steps=1, progress=False)
  with pytest.raises(ValueError, match="2 or more"):
    baselines.train_sasrec([[0]], 3, steps=1, progress=False)


def test_sasrec_planted_successor_task():
  # Item i is always followed by item i + 1 (mod N): SASRec must learn it,
  # popularity (near-uniform here) cannot.
  n = 40
  rng = np.random.default_rng(0)
  train = [np.arange(s, s + 12) % n for s in rng.integers(0, n, 400)]
  model = baselines.train_sasrec(train, n, steps=150, seed=0, batch_size=64, max_len=8,
                                 embed_dim=32, num_heads=2, num_blocks=2, dropout=0.1,
                                 lr=3e-3, progress=False)
  starts = np.arange(n)
  hist = np.stack([np.arange(s, s + 5) % n for s in starts])
  hist[::2, :2] = -1  # padded (shorter) histories
  targets = (starts + 5) % n
  scores = baselines.sasrec_scores(model, hist)
  assert scores.shape == (n, n)
  ranks = metrics.target_ranks(jnp.asarray(scores), jnp.asarray(targets), jnp.asarray(hist))
  sas = metrics.metrics_at_k(ranks, ks=(1, 10), num_items=n)

  pop = baselines.popularity_scores(baselines.item_counts(np.concatenate(train), n), n)
  pop_ranks = metrics.target_ranks(jnp.broadcast_to(pop, (n, n)), jnp.asarray(targets),
                                   jnp.asarray(hist))
  popm = metrics.metrics_at_k(pop_ranks, ks=(1, 10), num_items=n)
  assert float(sas["recall@10"]) >= 0.9
  assert float(sas["recall@10"]) >= float(popm["recall@10"]) + 0.4
