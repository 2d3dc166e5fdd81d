"""Ranking metrics and rank rewards against NumPy and hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from langptune_jax.rec import metrics


def np_ranks(scores, targets, history):
  """Independent reference: loop over users, pessimistic ties, history to -inf."""
  scores = np.array(scores, np.float64)
  out = []
  for b in range(scores.shape[0]):
    s = scores[b].copy()
    for h in history[b]:
      if h >= 0:
        s[h] = -np.inf
    t = s[targets[b]]
    others = np.delete(s, targets[b])
    out.append(1 + int(np.sum(others >= t)))
  return np.array(out)


def test_ranks_match_numpy_random():
  rng = np.random.default_rng(0)
  b, n, h = 16, 40, 5
  # Rounded scores make ties frequent.
  scores = np.round(rng.normal(size=(b, n)), 1).astype(np.float32)
  targets = rng.integers(0, n, b)
  history = rng.integers(-1, n, (b, h))
  got = np.asarray(metrics.target_ranks(scores, targets, history))
  np.testing.assert_array_equal(got, np_ranks(scores, targets, history))


def test_ties_are_pessimistic_and_order_free():
  scores = jnp.array([[0.1, 0.5, 0.5, 0.2],
                      [1.0, 1.0, 1.0, 1.0]])
  # Target 1 ties with item 2: placed after it -> rank 2 (not 1).
  # A constant scorer ranks the target last among unmasked items.
  ranks = metrics.target_ranks(scores, jnp.array([1, 0]), jnp.array([[-1, -1], [3, -1]]))
  np.testing.assert_array_equal(np.asarray(ranks), [2, 3])
  # Same answer when the tying item comes first.
  ranks2 = metrics.target_ranks(scores, jnp.array([2, 0]), None)
  np.testing.assert_array_equal(np.asarray(ranks2), [2, 4])


def test_masked_target_gets_worst_rank():
  scores = jnp.array([[0.9, 0.1, 0.2, 0.3, 0.0]])
  ranks = metrics.target_ranks(scores, jnp.array([0]), jnp.array([[0, 2]]))
  assert int(ranks[0]) == 5  # == N: a miss for every k < N
  m = metrics.metrics_at_k(ranks, ks=(1, 4), num_items=5)
  assert float(m["recall@4"]) == 0.0 and float(m["ndcg@4"]) == 0.0


def test_nan_scores_rank_last():
  scores = jnp.array([[0.3, jnp.nan, 0.1, 0.2]])
  np.testing.assert_array_equal(np.asarray(metrics.target_ranks(scores, jnp.array([1]))), [4])
  np.testing.assert_array_equal(np.asarray(metrics.target_ranks(scores, jnp.array([2]))), [3])


def test_history_bool_mask_equals_ids():
  rng = np.random.default_rng(1)
  scores = rng.normal(size=(4, 12)).astype(np.float32)
  ids = np.array([[1, 3, -1], [0, -1, -1], [11, 5, 2], [-1, -1, -1]])
  mask = np.zeros((4, 12), bool)
  for b, row in enumerate(ids):
    mask[b, row[row >= 0]] = True
  np.testing.assert_array_equal(np.asarray(metrics.history_mask(jnp.asarray(ids), 12)), mask)
  t = jnp.array([2, 4, 6, 7])
  np.testing.assert_array_equal(np.asarray(metrics.target_ranks(scores, t, ids)),
                                np.asarray(metrics.target_ranks(scores, t, jnp.asarray(mask))))


def test_history_errors():
  with pytest.raises(ValueError, match="columns"):
    metrics.history_mask(jnp.zeros((2, 3), bool), 4)
  with pytest.raises(ValueError, match="dtype"):
    metrics.history_mask(jnp.zeros((2, 3), jnp.float32), 4)


def test_metrics_hand_computed():
  ranks = jnp.array([1, 3, 30])
  m = metrics.metrics_at_k(ranks, ks=(5, 50), num_items=40)
  assert float(m["recall@5"]) == pytest.approx(2 / 3)
  assert float(m["precision@5"]) == pytest.approx(2 / 3 / 5)
  assert float(m["mrr@5"]) == pytest.approx((1 + 1 / 3) / 3)
  assert float(m["ndcg@5"]) == pytest.approx((1 + 1 / np.log2(4)) / 3)
  # k = 50 > N = 40: clipped to 40, every rank is a hit.
  assert float(m["recall@50"]) == 1.0
  assert float(m["precision@50"]) == pytest.approx(1 / 40)
  assert float(m["mrr"]) == pytest.approx((1 + 1 / 3 + 1 / 30) / 3)
  assert float(m["ndcg"]) == pytest.approx((1 + 0.5 + 1 / np.log2(31)) / 3)
  assert float(m["mrr@50"]) == pytest.approx(float(m["mrr"]))


def test_metrics_vs_numpy_with_valid_mask():
  rng = np.random.default_rng(2)
  ranks = rng.integers(1, 30, 20)
  valid = rng.random(20) > 0.3
  got = metrics.metrics_at_k(jnp.asarray(ranks), ks=(5, 10, 20), num_items=30,
                             valid=jnp.asarray(valid))
  r = ranks[valid].astype(np.float64)
  for k in (5, 10, 20):
    hit = r <= k
    np.testing.assert_allclose(float(got[f"recall@{k}"]), hit.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(got[f"precision@{k}"]), hit.mean() / k, rtol=1e-6)
    np.testing.assert_allclose(float(got[f"mrr@{k}"]), (hit / r).mean(), rtol=1e-6)
    np.testing.assert_allclose(float(got[f"ndcg@{k}"]), (hit / np.log2(r + 1)).mean(), rtol=1e-6)
  np.testing.assert_allclose(float(got["mrr"]), (1 / r).mean(), rtol=1e-6)


def test_padding_rows_ignored_and_empty_valid():
  ranks = jnp.array([1, 1000, 1000])
  m = metrics.metrics_at_k(ranks, ks=(1,), num_items=1000, valid=jnp.array([True, False, False]))
  assert float(m["recall@1"]) == 1.0
  m0 = metrics.metrics_at_k(ranks, ks=(1,), valid=jnp.zeros(3, bool))
  assert float(m0["recall@1"]) == 0.0


def test_bad_k():
  with pytest.raises(ValueError, match="k=0"):
    metrics.metrics_at_k(jnp.array([1]), ks=(0,))


def test_metrics_jit():
  f = jax.jit(lambda s, t, h: metrics.metrics_at_k(metrics.target_ranks(s, t, h), (1, 2), 3))
  out = f(jnp.array([[0.3, 0.2, 0.1]]), jnp.array([1]), jnp.array([[0]]))
  assert float(out["recall@1"]) == 1.0


def test_topk_items():
  scores = jnp.array([[0.1, 0.5, 0.5, 0.2],
                      [1.0, 1.0, 1.0, 1.0]])
  ids, vals = metrics.topk_items(scores, jnp.array([[1, -1], [0, 1]]), 6)
  np.testing.assert_array_equal(np.asarray(ids), [[2, 3, 0, -1, -1, -1], [2, 3, -1, -1, -1, -1]])
  assert ids.shape == (2, 6) and bool(jnp.all(jnp.isneginf(vals[:, 3:])))
  ids2, _ = metrics.topk_items(scores, None, 2)
  np.testing.assert_array_equal(np.asarray(ids2), [[1, 2], [0, 1]])


def test_rank_rewards():
  ranks = jnp.array([1, 3, 7, 2])
  np.testing.assert_allclose(np.asarray(metrics.rank_rewards(ranks, "ndcg")),
                             1 / np.log2(np.array([1, 3, 7, 2]) + 1), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(metrics.rank_rewards(ranks, "mrr")),
                             [1, 1 / 3, 1 / 7, 0.5], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(metrics.rank_rewards(ranks, "recall@3")), [1, 1, 0, 1])
  trunc = jnp.array([False, True, False, True])
  np.testing.assert_allclose(
      np.asarray(metrics.rank_rewards(ranks, "mrr", trunc, penalty_reward=-0.5)),
      [1, -0.5, 1 / 7, -0.5], rtol=1e-6)
  for bad in ("dcg", "recall@0", "recall@x"):
    with pytest.raises(ValueError, match="reward_type"):
      metrics.rank_rewards(ranks, bad)


def test_rank_log_metrics():
  out = metrics.rank_log_metrics(jnp.array([1, 3]))
  assert float(out["mrr"]) == pytest.approx((1 + 1 / 3) / 2)
  assert float(out["ndcg"]) == pytest.approx((1 + 0.5) / 2)
