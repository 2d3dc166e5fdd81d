"""The authors' protocol switches, each against a reference computation.

Group InfoNCE negatives, the peft LoRA init bound, AdamW betas and weight decay
per section, the whitening scope, duplicate-target negatives and the raw-history
baseline's tokenization.
"""

import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))

import planted  # noqa: E402

from langptune_jax.models import lora  # noqa: E402
from langptune_jax.rec import baselines  # noqa: E402
from langptune_jax.train import contrastive, losses  # noqa: E402
from langptune_jax.train import state as state_lib  # noqa: E402


def _np_group_info_nce(q, k, temperature, group):
  """Mean over rows of the cross-entropy within each consecutive group (float64)."""
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  k = k / np.linalg.norm(k, axis=1, keepdims=True)
  nll = []
  for start in range(0, len(q), group):
    logits = q[start:start + group] @ k[start:start + group].T / temperature
    logits -= logits.max(axis=1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    nll.extend(-np.diag(log_softmax))
  return float(np.mean(nll))


def _cl_batch(tok, data, rows=8):
  users = data.train.take(np.arange(rows))
  return {"profile_tokens": data.item_tokens[users.history[:, 0]],
          "profile_mask": data.item_mask[users.history[:, 0]],
          "item_tokens": data.item_tokens[users.target],
          "item_mask": data.item_mask[users.target],
          "item_ids": users.target}


def _cl(decoder, batch, **kw):
  """(loss, metrics, grads) of one CL batch, jitted (eager autodiff is slow on CPU)."""
  fn = nnx.jit(lambda model, b: contrastive.cl_loss_and_grads(model, nnx.Param, b,
                                                              temperature=0.1, **kw))
  return fn(decoder, batch)


def test_cl_step_with_group_negatives_equals_reference():
  tok = planted.word_tokenizer()
  data = planted.planted_data(tok)
  decoder = planted.tiny_decoder(len(tok))
  batch = _cl_batch(tok, data)
  # Micro-batches of 4 (the gradient-cache path) over two groups of 4 pairs.
  loss, _, grads = _cl(decoder, batch, micro_batch_size=4, group_size=4)
  q = np.asarray(decoder(batch["profile_tokens"], batch["profile_mask"]), np.float64)
  k = np.asarray(decoder(batch["item_tokens"], batch["item_mask"]), np.float64)
  want = _np_group_info_nce(q, k, 0.1, 4)
  assert float(loss) == pytest.approx(want, abs=1e-5)
  assert want != pytest.approx(_np_group_info_nce(q, k, 0.1, 8), abs=1e-3)  # groups matter
  # The gradient is the mean of the two groups' own InfoNCE gradients.
  halves = [{key: v[i:i + 4] for key, v in batch.items()} for i in (0, 4)]
  parts = [_cl(decoder, h)[2] for h in halves]
  jax.tree.map(lambda g, a, b: np.testing.assert_allclose(g, (a + b) / 2, atol=1e-5),
               grads, *parts)


def test_global_negatives_still_available():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(8, 5)), rng.normal(size=(8, 5))
  loss, _ = losses.info_nce(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), 0.1)
  assert float(loss) == pytest.approx(_np_group_info_nce(q, k, 0.1, 8), abs=1e-4)
  with pytest.raises(ValueError, match="cl.group_size=3"):
    losses.info_nce(jnp.asarray(q), jnp.asarray(k), 0.1, group_size=3)


def test_dedupe_negatives_flag():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(4, 6))
  k = rng.normal(size=(4, 6))
  ids = jnp.asarray([3, 3, 5, 7])
  kept, _ = losses.info_nce(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), 0.1)
  deduped, _ = losses.info_nce(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), 0.1,
                               key_ids=ids)
  # The authors' default keeps a repeated target as a negative: plain InfoNCE.
  assert float(kept) == pytest.approx(_np_group_info_nce(q, k, 0.1, 4), abs=1e-4)
  assert float(deduped) < float(kept)
  # With every target the same item, dedupe leaves no negative at all.
  same, _ = losses.info_nce(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), 0.1,
                            key_ids=jnp.zeros(4, jnp.int32))
  assert float(same) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("init,bound", [("peft", 1 / 8), ("he_uniform", (6 / 64) ** 0.5)])
def test_lora_a_init_bound(init, bound):
  adapter = lora.LoRA(64, 32, rank=256, alpha=512.0, init=init, rngs=nnx.Rngs(0))
  a = np.asarray(adapter.lora_a[...])
  assert np.abs(a).max() <= bound
  assert np.abs(a).max() > 0.98 * bound  # 16k draws reach the edge of U(-b, b)
  assert np.std(a) == pytest.approx(bound / np.sqrt(3), rel=0.03)
  assert not np.asarray(adapter.lora_b[...]).any()
  with pytest.raises(ValueError, match="encoder.lora_init='x'"):
    lora.LoRA(4, 4, rank=2, alpha=2.0, init="x", rngs=nnx.Rngs(0))


def _opt(**kw):
  base = dict(lr=0.1, lr_schedule="constant", warmup_steps=0, weight_decay=0.0, adam_b1=0.9,
              adam_b2=0.999, adam_eps=1e-6, max_grad_norm=0.0)
  base.update(kw)
  return types.SimpleNamespace(**base, get=lambda key, default=None: base.get(key, default))


def _np_adamw(p, grads, lr, b1, b2, eps, wd):
  m = v = 0.0
  for t, g in enumerate(grads, 1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * ((m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + wd * p)
  return p


@pytest.mark.parametrize("b2,wd", [(0.999, 0.01), (0.95, 1e-6), (0.95, 0.3)])
def test_adamw_betas_and_weight_decay_from_the_section(b2, wd):
  tx = state_lib.adamw(_opt(adam_b2=b2, weight_decay=wd), 10)
  params = jnp.asarray([1.0, -2.0])
  opt_state = tx.init(params)
  grads = [np.asarray([0.5, 0.1]), np.asarray([-1.0, 0.3]), np.asarray([0.2, 2.0])]
  for g in grads:
    updates, opt_state = tx.update(jnp.asarray(g), opt_state, params)
    params = params + updates
  want = _np_adamw(np.asarray([1.0, -2.0]), grads, 0.1, 0.9, b2, 1e-6, wd)
  np.testing.assert_allclose(np.asarray(params), want, rtol=1e-5)


def test_whiten_chunk_scope():
  x = np.arange(8, dtype=np.float32) ** 2
  chunked = np.asarray(losses.whiten_chunks(x, 4))
  for part, raw in zip(chunked.reshape(2, 4), x.reshape(2, 4)):
    np.testing.assert_allclose(part, (raw - raw.mean()) / np.sqrt(raw.var() + 1e-8), rtol=1e-5)
  whole = np.asarray(losses.whiten_chunks(x, 0))
  np.testing.assert_allclose(whole, (x - x.mean()) / np.sqrt(x.var() + 1e-8), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(losses.whiten_chunks(x, 32)), whole, rtol=1e-6)
  with pytest.raises(ValueError, match="rl.whiten_chunk=3"):
    losses.whiten_chunks(x, 3)


def test_history_query_tokens_left_pad_and_keep_last():
  tok = planted.word_tokenizer()
  short = "user watched drama"
  long = " ".join(["comedy"] * 20)
  tokens, mask = baselines.history_query_tokens(tok, [short, long], pad_len=12, keep=6)
  assert tokens.shape == mask.shape == (2, 6)
  short_ids = tok(short)["input_ids"]
  assert tokens[0, 6 - len(short_ids):].tolist() == short_ids  # right-aligned, left-padded
  assert mask[0].tolist() == [0] * (6 - len(short_ids)) + [1] * len(short_ids)
  long_ids = tok(long)["input_ids"]
  # Truncated to 12 (the closing token kept), then the last 6 of those 12.
  assert tokens[1].tolist() == (long_ids[:11] + long_ids[-1:])[-6:] and mask[1].all()
