"""Shared-prompt scoring: each prompt run once per group gives the row-by-row numbers."""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
import planted  # noqa: E402

from configs import base  # noqa: E402
from langptune_jax import parallel, sampling  # noqa: E402
from langptune_jax import settings as settings_lib  # noqa: E402
from langptune_jax.models import finetune  # noqa: E402
from langptune_jax.models import lora as lora_lib  # noqa: E402
from langptune_jax.train import rlso  # noqa: E402
from langptune_jax.train import state as state_lib  # noqa: E402

VOCAB = 24
ATOL = 1e-5


def rollout(num_prompts, group, prompt_len=10, response_len=7, seed=0):
  """Left-padded prompts repeated per group, right-padded responses of random lengths."""
  rng = np.random.default_rng(seed)
  prompt_tokens = rng.integers(4, VOCAB, (num_prompts, prompt_len)).astype(np.int32)
  prompt_mask = np.arange(prompt_len)[None] >= rng.integers(0, prompt_len - 2, (num_prompts, 1))
  prompt_tokens = np.where(prompt_mask, prompt_tokens, 0)
  rows = num_prompts * group
  lengths = rng.integers(1, response_len + 1, (rows, 1))
  response_mask = np.arange(response_len)[None] < lengths
  response_tokens = np.where(response_mask, rng.integers(4, VOCAB, (rows, response_len)), 0)
  return {"prompt_tokens": np.repeat(prompt_tokens, group, axis=0),
          "prompt_mask": np.repeat(prompt_mask, group, axis=0),
          "response_tokens": response_tokens.astype(np.int32), "response_mask": response_mask}


def assert_trees_close(a, b, atol=ATOL):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol,
                                                       rtol=0), a, b)


FAMILIES = {
    "llama": {},
    "gemma3_sliding": dict(family="gemma3", norm_one_plus=True, embed_scale=True, act="gelu_tanh",
                           post_norms=True, qk_norm=True, tie_embeddings=True, sliding_window=4,
                           layer_types=("local", "global"), rope_local_theta=10_000.0),
    "gemma2_softcap": dict(family="gemma2", norm_one_plus=True, embed_scale=True,
                           act="gelu_tanh", post_norms=True, tie_embeddings=True,
                           attn_logit_softcap=50.0, final_logit_softcap=30.0),
}


@pytest.mark.parametrize("group", [2, 4])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_grouped_logprobs_and_gradients_equal_row_by_row(family, group):
  model = planted.tiny_encoder(VOCAB, **FAMILIES[family])
  batch = {k: jnp.asarray(v) for k, v in rollout(3, group).items()}
  graphdef, params = nnx.split(model)

  def score(fn, params):
    logp, entropy = fn(nnx.merge(graphdef, params), *batch.values(), temperature=0.7,
                       return_entropy=True)
    weights = jnp.arange(1, logp.shape[0] + 1) / logp.shape[0] ** 2  # rows weigh differently
    return jnp.sum(logp * weights) + jnp.mean(entropy), (logp, entropy)

  grouped = lambda m, *a, **k: sampling.grouped_sequence_logprobs(m, *a, group_size=group, **k)
  (_, rows_out), rows_grads = jax.jit(jax.value_and_grad(
      lambda p: score(sampling.sequence_logprobs, p), has_aux=True))(params)
  (_, packed_out), packed_grads = jax.jit(jax.value_and_grad(
      lambda p: score(grouped, p), has_aux=True))(params)
  assert_trees_close(rows_out, packed_out)
  assert_trees_close(rows_grads, packed_grads)
  assert float(jnp.max(jnp.abs(rows_out[0]))) > 1.0  # real log-probs, not all zeros


def test_grouped_mask_keeps_responses_apart():
  prompt_mask = jnp.asarray([[False, True, True]])
  response_mask = jnp.asarray([[[True, True], [True, False]]])
  mask = np.asarray(sampling.grouped_causal_mask(prompt_mask, response_mask))[0]
  # slots: 0 pad, 1-2 prompt, 3-4 response 1, 5-6 response 2 (6 is padding)
  assert mask[4].tolist() == [False, True, True, True, True, False, False]
  assert mask[5].tolist() == [False, True, True, False, False, True, False]
  assert mask[2].tolist() == [False, True, True, False, False, False, False]
  assert mask[6, 6] and not mask[4, 6]


def build_state(mode, mesh, remat):
  """A tiny policy (LoRA or top block tuned) moved away from its reference, on `mesh`."""
  model = planted.tiny_encoder(VOCAB, remat=remat)
  if mode == "lora":
    lora_lib.apply_lora(model, targets=("q", "v", "down", "lm_head"), rank=2,
                        alpha=4.0, dropout=0.0, rngs=nnx.Rngs(1))
  reference = finetune.ReferencePolicy.from_model(model, mode, num_layers_unfrozen=1)
  wrt = finetune.model_trainable_filter(model, mode, 1)
  trainable = nnx.state(model, wrt)
  keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(trainable))))
  nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape),
                                 trainable))
  train_state = state_lib.TrainState.create(model, optax.sgd(0.1), wrt, mesh)
  if reference.state is not None:
    reference = reference.replace(state=jax.device_put(
        reference.state, parallel.state_shardings(reference.state, mesh)))
  return train_state, reference


def scores_and_gradients(train_state, reference, mesh, batch, settings):
  scoring = rlso.make_policy_logprobs(train_state, mesh, settings)
  logp_old, logp_ref, entropy = scoring(
      train_state.state, reference, parallel.global_batch(batch, mesh))
  rng = np.random.default_rng(3)
  rows = len(batch["prompt_tokens"])
  task = rng.uniform(size=rows).astype(np.float32)
  total, kl = rlso.shaped_rewards(task, logp_old, logp_ref, settings)
  # logp_old a little off the current policy: the loss and its gradient are not trivial
  full = dict(batch, logp_old=np.asarray(logp_old) + rng.normal(0, 0.1, rows).astype(np.float32),
              total_reward=np.asarray(total), task_reward=task, kl=np.asarray(kl))

  def grads(state, batch):
    with parallel.use_mesh(mesh):
      model, _ = nnx.merge(train_state.graphdef, state)
      loss, metrics, grads = rlso.rlso_loss_and_grads(model, train_state.wrt, batch, settings)
      return loss, metrics, grads

  loss, metrics, g = jax.jit(grads)(train_state.state, parallel.global_batch(full, mesh))
  return (logp_old, logp_ref, entropy), loss, metrics, g


def settings_for(group, micro, shared):
  return rlso.RLSOSettings(group_size=group, eta=1.0, kl_coef=0.1, whiten=True, temperature=0.9,
                           micro_batch_size=micro, shared_prompt=shared)


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("mode", ["lora", "partial"])
@pytest.mark.parametrize("group,micro", [(2, 0), (4, 0), (2, 2), (4, 2)])
def test_rlso_scoring_and_update_equal_row_by_row(group, micro, mode, devices):
  shape = dict(data=2, fsdp=2, tensor=2) if devices == 8 else dict(data=1, fsdp=1, tensor=1)
  mesh = parallel.make_mesh(ml_collections.ConfigDict(shape), jax.devices()[:devices])
  # micro-batches with full recomputation: the remat path is covered as well
  train_state, reference = build_state(mode, mesh, remat="full" if micro else "none")
  batch = rollout(4, group, seed=group + micro)
  rows = scores_and_gradients(train_state, reference, mesh, batch,
                              settings_for(group, micro, shared=False))
  packed = scores_and_gradients(train_state, reference, mesh, batch,
                                settings_for(group, micro, shared=True))
  assert_trees_close(rows[0], packed[0])
  np.testing.assert_allclose(float(rows[1]), float(packed[1]), atol=ATOL, rtol=0)
  assert_trees_close({k: rows[2][k] for k in ("loss", "ratio", "entropy")},
                     {k: packed[2][k] for k in ("loss", "ratio", "entropy")})
  assert_trees_close(rows[3], packed[3])
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(rows[3])) > 1e-3
  if mode == "lora":  # the reference really is another policy
    assert float(jnp.max(jnp.abs(rows[0][0] - rows[0][1]))) > 1e-3


def test_reused_rollout_logprobs_skip_the_policy_pass():
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                            jax.devices()[:1])
  train_state, reference = build_state("lora", mesh, remat="none")
  batch = rollout(2, 2)
  settings = settings_for(2, 0, shared=True)
  recomputed = rlso.make_policy_logprobs(train_state, mesh, settings)(
      train_state.state, reference, parallel.global_batch(batch, mesh))
  token_logp = np.random.default_rng(0).normal(size=batch["response_mask"].shape)
  sample = sampling.SampleOutput(tokens=batch["response_tokens"],
                                 response_mask=batch["response_mask"], logprobs=token_logp,
                                 prompt_tokens=batch["prompt_tokens"],
                                 prompt_mask=batch["prompt_mask"])
  reuse = settings_for(2, 0, shared=True).__class__(
      **{**settings.__dict__, "reuse_rollout_logprobs": True})
  assert rlso.scoring_batch(batch, sample, settings) is batch
  reused = rlso.make_policy_logprobs(train_state, mesh, reuse)(
      train_state.state, reference,
      parallel.global_batch(rlso.scoring_batch(batch, sample, reuse), mesh))
  expected = np.sum(np.where(batch["response_mask"], token_logp, 0.0), axis=-1)
  np.testing.assert_allclose(np.asarray(reused[0]), expected, atol=1e-5)
  np.testing.assert_allclose(np.asarray(reused[1]), np.asarray(recomputed[1]), atol=1e-6)


# |sampler - recomputed| sequence log-probs measured on these prompts (48 new tokens,
# ~43 per row, sequence log-probs around -110): float32 at most 1.1e-4; bfloat16
# compute (float32 weights, the base config) at most 0.96 and 0.35 on average (0.62
# and 0.25 scored row by row), not negligible next to the KL term and the rewards,
# hence rl.reuse_rollout_logprobs off by default. The tolerances leave about three to
# ten times that.
ROLLOUT_TOLERANCE = {("float32", "float32"): 1e-3, ("bfloat16", "float32"): 3.0}


@pytest.mark.slow
@pytest.mark.parametrize("dtype,param_dtype", sorted(ROLLOUT_TOLERANCE))
def test_rollout_logprobs_match_recomputed_on_smollm2(smollm2_gguf, dtype, param_dtype):
  from langptune_jax.weights import hf as hf_weights
  from langptune_jax.weights import tokenizer as tok_lib

  tok = tok_lib.load_tokenizer(smollm2_gguf)
  questions = ["Describe in two sentences what a movie lover enjoys.", "Name a film.",
               "Write a short profile of a user who likes thrillers and old westerns.",
               "What kind of books does a reader of space operas like?"]
  prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                         add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"] for q in questions]
  length = max(map(len, prompts))
  tokens = np.zeros((len(prompts), length), np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):], mask[i, length - len(p):] = p, True
  tokens, mask = np.repeat(tokens, 2, axis=0), np.repeat(mask, 2, axis=0)
  model, _ = hf_weights.load_decoder(smollm2_gguf, dtype=dtype, param_dtype=param_dtype)
  out = sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=48,
                        temperature=1.0, eos_ids=tok_lib.eos_ids(tok), pad_id=tok_lib.pad_id(tok))
  reused = np.sum(np.where(out.response_mask, np.asarray(out.logprobs), 0.0), axis=-1)
  recomputed = jax.jit(lambda *a: sampling.grouped_sequence_logprobs(
      model, *a, group_size=2, temperature=1.0))(tokens, mask, out.tokens, out.response_mask)
  assert np.all(np.asarray(out.response_mask).sum(axis=1) >= 1)
  np.testing.assert_allclose(reused, np.asarray(recomputed),
                             atol=ROLLOUT_TOLERANCE[(dtype, param_dtype)], rtol=0)


def test_settings_pick_the_scoring_function():
  assert settings_for(2, 0, shared=True).sequence_logprobs().func is (
      sampling.grouped_sequence_logprobs)
  assert settings_for(2, 0, shared=False).sequence_logprobs() is sampling.sequence_logprobs
  config = base.get_config()
  config.rl.shared_prompt, config.rl.reuse_rollout_logprobs = False, True
  settings = rlso.RLSOSettings.from_config(settings_lib.from_config(config).rl)
  assert (settings.shared_prompt, settings.reuse_rollout_logprobs) == (False, True)
