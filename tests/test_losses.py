"""RLSO (REBEL) and InfoNCE loss math against NumPy loops, sharding invariance, a planted toy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from langptune_jax import parallel
from langptune_jax.train import losses


def test_whiten_population_variance_and_eps():
  x = np.array([1.0, 2.0, 3.0, 6.0], np.float32)
  got = np.asarray(losses.whiten(x))
  want = (x - x.mean()) / np.sqrt(x.var() + 1e-8)  # np.var is the population variance
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert abs(got.mean()) < 1e-6 and got.var() == pytest.approx(1.0, abs=1e-5)
  # Constant input: eps keeps it finite (all zeros).
  np.testing.assert_array_equal(np.asarray(losses.whiten(np.full(4, 3.0))), 0.0)
  big_eps = np.asarray(losses.whiten(x, eps=1.0))
  np.testing.assert_allclose(big_eps, (x - x.mean()) / np.sqrt(x.var() + 1.0), rtol=1e-6)


def test_whiten_mask():
  x = np.array([1.0, 100.0, 3.0, 5.0], np.float32)
  m = np.array([True, False, True, True])
  got = np.asarray(losses.whiten(x, m))
  v = x[m]
  np.testing.assert_allclose(got[m], (v - v.mean()) / np.sqrt(v.var() + 1e-8), rtol=1e-6)
  assert got[1] == 0.0


def test_kl_shaped_reward_sign():
  task = jnp.array([1.0, 1.0])
  logp_ref = jnp.array([-10.0, -10.0])
  # Row 0: the policy likes its sample more than the reference -> KL > 0 -> lower total.
  logp_old = jnp.array([-5.0, -10.0])
  total, kl = losses.kl_shaped_reward(task, logp_old, logp_ref, kl_coef=0.2)
  np.testing.assert_allclose(np.asarray(kl), [5.0, 0.0])
  np.testing.assert_allclose(np.asarray(total), [0.0, 1.0], atol=1e-6)
  total0, _ = losses.kl_shaped_reward(task, logp_old, logp_ref, kl_coef=0.0)
  np.testing.assert_allclose(np.asarray(total0), [1.0, 1.0])


def np_rebel(lp_new, lp_old, r, g, eta, mask=None):
  mask = np.ones_like(r, bool) if mask is None else mask
  terms = []
  for p in range(len(r) // g):
    for j, k in itertools.combinations(range(g), 2):
      a, b = p * g + j, p * g + k
      if mask[a] and mask[b]:
        terms.append(((lp_new[a] - lp_old[a]) - (lp_new[b] - lp_old[b]) - eta * (r[a] - r[b])) ** 2)
  return np.mean(terms)


@pytest.mark.parametrize("g", [2, 3, 4])
def test_rebel_loss_vs_numpy(g):
  rng = np.random.default_rng(g)
  n = 5 * g
  lp_new, lp_old = rng.normal(size=n) * 3, rng.normal(size=n) * 3
  r = rng.random(n)
  got = float(losses.rebel_loss(lp_new, lp_old, r, g, eta=0.7))
  assert got == pytest.approx(np_rebel(lp_new, lp_old, r, g, 0.7), rel=1e-5)
  mask = rng.random(n) > 0.3
  got_m = float(losses.rebel_loss(lp_new, lp_old, r, g, eta=0.7, mask=mask))
  assert got_m == pytest.approx(np_rebel(lp_new, lp_old, r, g, 0.7, mask), rel=1e-5)


def test_rebel_g2_is_paper_formula():
  # Two prompts, y1/y2 adjacent: mean over prompts of ((ratio1 - ratio2) - eta (r1 - r2))^2.
  lp_new = np.array([-1.0, -2.0, -3.0, -1.5])
  lp_old = np.array([-1.5, -1.0, -2.0, -2.0])
  r = np.array([0.8, 0.1, 0.2, 0.9])
  p1 = ((0.5) - (-1.0) - (0.7)) ** 2
  p2 = ((-1.0) - (0.5) - (-0.7)) ** 2
  assert float(losses.rebel_loss(lp_new, lp_old, r, 2, eta=1.0)) == pytest.approx((p1 + p2) / 2)


def test_rebel_loss_gradient_direction():
  # Minimising moves logp of the higher-reward sample up relative to the other.
  lp_old = jnp.zeros(2)
  r = jnp.array([1.0, 0.0])
  grad = jax.grad(lambda lp: losses.rebel_loss(lp, lp_old, r, 2))(jnp.zeros(2))
  assert grad[0] < 0 < grad[1]


def test_rebel_errors():
  with pytest.raises(ValueError, match="num_generations=1"):
    losses.rebel_loss(jnp.zeros(4), jnp.zeros(4), jnp.zeros(4), 1)
  with pytest.raises(ValueError, match="multiple"):
    losses.rebel_loss(jnp.zeros(5), jnp.zeros(5), jnp.zeros(5), 2)


def test_group_permutation_keeps_groups():
  perm = np.asarray(losses.group_permutation(jax.random.key(0), 6, 3))
  assert sorted(perm.tolist()) == list(range(18))
  groups = perm.reshape(6, 3)
  np.testing.assert_array_equal(groups % 3, np.tile([0, 1, 2], (6, 1)))
  assert len(set((groups // 3)[:, 0].tolist())) == 6
  assert not np.array_equal(perm, np.arange(18))
  # Permuting rows and rewards together leaves the REBEL loss unchanged.
  rng = np.random.default_rng(0)
  a, b, r = rng.normal(size=18), rng.normal(size=18), rng.random(18)
  assert float(losses.rebel_loss(a[perm], b[perm], r[perm], 3)) == pytest.approx(
      float(losses.rebel_loss(a, b, r, 3)), rel=1e-6)


def np_info_nce(q, k, tau):
  q = q / np.linalg.norm(q, axis=-1, keepdims=True)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  logits = q @ k.T / tau
  m = logits.max(-1, keepdims=True)
  logz = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
  return np.mean(logz - np.diag(logits)), logits


def test_info_nce_vs_numpy():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(12, 8)).astype(np.float64)
  k = q + rng.normal(size=(12, 8)) * 1.5
  loss, m = losses.info_nce(q.astype(np.float32), k.astype(np.float32), temperature=0.1,
                            ks=(1, 3))
  want, logits = np_info_nce(q, k, 0.1)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  ranks = 1 + np.sum(logits > np.diag(logits)[:, None], axis=-1)
  assert float(m["accuracy"]) == pytest.approx(np.mean(ranks == 1))
  assert float(m["recall@3"]) == pytest.approx(np.mean(ranks <= 3))


def test_info_nce_valid_and_duplicate_keys():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(6, 4)).astype(np.float32)
  k = rng.normal(size=(6, 4)).astype(np.float32)
  valid = np.array([True, True, True, True, False, False])
  loss, _ = losses.info_nce(q, k, 0.1, valid=valid)
  want, _ = np_info_nce(q[:4].astype(np.float64), k[:4].astype(np.float64), 0.1)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  # Rows 0 and 1 share a target item: neither is a negative for the other.
  ids = np.array([7, 7, 1, 2, 3, 4])
  loss_d, _ = losses.info_nce(q, k, 0.1, key_ids=ids)
  qq = q / np.linalg.norm(q, axis=-1, keepdims=True)
  kk = k / np.linalg.norm(k, axis=-1, keepdims=True)
  logits = qq @ kk.T / 0.1
  logits[0, 1] = logits[1, 0] = -np.inf
  nll = [np.log(np.exp(row[np.isfinite(row)]).sum()) - row[i] for i, row in enumerate(logits)]
  assert float(loss_d) == pytest.approx(np.mean(nll), rel=1e-5)


@pytest.mark.parametrize("axes", [{"data": 8, "fsdp": 1}, {"data": 2, "fsdp": 4}])
def test_info_nce_sharded_equals_single_device(axes):
  rng = np.random.default_rng(2)
  q = rng.normal(size=(16, 8)).astype(np.float32)
  k = rng.normal(size=(16, 8)).astype(np.float32)
  single_loss, single_m = jax.jit(losses.info_nce)(q, k)
  single_grad = jax.jit(jax.grad(lambda a, b: losses.info_nce(a, b)[0]))(q, k)
  mesh = parallel.make_mesh(ConfigDict(dict(axes, tensor=1)))
  qs, ks = parallel.put(q, mesh, ("batch", None)), parallel.put(k, mesh, ("batch", None))
  assert len(qs.sharding.device_set) == 8
  with parallel.use_mesh(mesh):
    loss, m = jax.jit(losses.info_nce)(qs, ks)
    grad = jax.jit(jax.grad(lambda a, b: losses.info_nce(a, b)[0]))(qs, ks)
  # The global batch is used: 15 negatives per row on every layout.
  assert float(loss) == pytest.approx(float(single_loss), rel=1e-6)
  assert float(m["recall@5"]) == float(single_m["recall@5"])
  np.testing.assert_allclose(np.asarray(grad), np.asarray(single_grad), rtol=1e-5, atol=1e-7)
  want, _ = np_info_nce(q.astype(np.float64), k.astype(np.float64), 0.1)
  assert float(loss) == pytest.approx(want, rel=1e-5)


def test_info_nce_planted_toy_learns():
  # Learnable query/key tables for 32 pairs; gradient descent must align the pairs.
  rng = np.random.default_rng(3)
  params = {"q": jnp.asarray(rng.normal(size=(32, 8)), jnp.float32),
            "k": jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)}
  opt = optax.adam(0.05)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    (loss, m), g = jax.value_and_grad(lambda p: losses.info_nce(p["q"], p["k"], 0.1),
                                      has_aux=True)(params)
    updates, state = opt.update(g, state)
    return optax.apply_updates(params, updates), state, loss, m

  _, _, loss0, m0 = step(params, state)
  for _ in range(60):
    params, state, loss, m = step(params, state)
  assert float(loss) < 0.5 * float(loss0)
  assert float(m["recall@1"]) >= 0.9 > float(m0["recall@1"])


def test_rl_metrics():
  task = jnp.array([1.0, 0.0, 0.5, 0.5])
  total = jnp.array([0.9, -0.1, 0.5, 0.4])
  kl = jnp.array([0.5, 0.5, 0.0, 0.5])
  lp_new = jnp.array([-1.0, -2.0, -3.0, -4.0])
  lp_old = jnp.array([-1.0, -2.5, -2.0, -4.0])
  ent = jnp.array([2.0, 2.0, 4.0, 4.0])
  m = losses.rl_metrics(task, total, kl, lp_new, lp_old, entropy=ent,
                        mask=jnp.array([True, True, True, False]))
  lr = np.array([0.0, 0.5, -1.0])
  ratio = np.exp(lr)
  assert float(m["reward"]) == pytest.approx(0.5)
  assert float(m["total_reward"]) == pytest.approx(1.3 / 3)
  assert float(m["kl"]) == pytest.approx(1 / 3)
  assert float(m["entropy"]) == pytest.approx(8 / 3)
  assert float(m["ratio"]) == pytest.approx(ratio.mean(), rel=1e-6)
  assert float(m["approx_kl"]) == pytest.approx(((ratio - 1) - lr).mean(), rel=1e-6)
  assert float(m["approx_kl"]) > 0
