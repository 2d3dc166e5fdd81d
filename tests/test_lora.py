"""LoRA adapters, trainable-parameter selection and the reference policy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from vjp_check import assert_vjp_matches

from langptune_jax import sampling
from langptune_jax.models import finetune, lora, transformer

VOCAB = 48


def tiny(tie: bool, seed: int = 0):
  config = transformer.DecoderConfig(
      family="llama", vocab_size=VOCAB, embed_dim=16, num_layers=3, num_heads=2,
      num_kv_heads=1, head_dim=8, mlp_dim=32, tie_embeddings=tie, eos_ids=(1,), pad_id=0)
  return transformer.Decoder(config, rngs=nnx.Rngs(seed))


def batch():
  tokens = jnp.asarray([[0, 0, 5, 7, 9, 11, 2, 3], [4, 8, 15, 16, 23, 42, 6, 1]], jnp.int32)
  mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], bool)
  return tokens, mask


def logits(model):
  tokens, mask = batch()
  out, _ = model(tokens, sampling.positions_from_mask(mask), sampling.causal_padding_mask(mask))
  return out


def perturb_adapters(model, seed=1, scale=0.5):
  """Random non-zero adapters, as if trained."""
  state = nnx.state(model, nnx.LoRAParam)
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
  nnx.update(model, jax.tree.map(
      lambda x: jax.random.normal(next(keys), x.shape, x.dtype) * scale, state))


def flat_params(model, wrt=nnx.Param):
  return {"/".join(map(str, k)): np.asarray(v)
          for k, v in nnx.to_flat_state(nnx.state(model, wrt))}


def test_apply_lora_targets_and_zero_init():
  model = tiny(tie=False)
  before = logits(model)
  adapted = lora.apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  assert len(adapted) == 3 * 7 + 1 and "lm_head" in adapted
  assert "layers/2/mlp/down_proj" in adapted
  np.testing.assert_array_equal(logits(model), before)
  n_lora = finetune.count_params(model, nnx.LoRAParam)
  assert n_lora > 0 and n_lora < finetune.count_params(model, nnx.Param)

  only_attn = tiny(tie=False)
  adapted = lora.apply_lora(only_attn, targets=("q", "v"), rank=2, alpha=2.0, rngs=nnx.Rngs(1))
  assert sorted(p.split("/")[-1] for p in adapted) == ["q_proj"] * 3 + ["v_proj"] * 3


def test_lora_on_a_tied_head_adapts_the_output_projection_only():
  model = tiny(tie=True)
  base = logits(model)
  embedding = np.asarray(model.embedder.embedding.get_value()).copy()
  adapted = lora.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  assert len(adapted) == 3 * 7 + 1 and adapted[-1] == "head_lora"
  np.testing.assert_allclose(logits(model), base, atol=1e-6)  # B starts at zero
  head_b = model.head_lora.lora_b
  head_b.set_value(jnp.ones_like(head_b.get_value()))
  changed = logits(model)
  assert np.abs(changed - base).max() > 1e-2
  with lora.adapters_off():
    np.testing.assert_allclose(logits(model), base, atol=1e-6)
  # The input embedding table is untouched: only the head sees the adapter.
  np.testing.assert_array_equal(np.asarray(model.embedder.embedding.get_value()), embedding)
  with pytest.raises(ValueError, match="cannot be merged"):
    lora.merge_lora(model)


def test_bad_lora_targets_raise():
  with pytest.raises(ValueError, match="unknown"):
    lora.apply_lora(tiny(tie=True), targets=("q", "qkv"), rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  model = tiny(tie=False)
  lora.apply_lora(model, targets=("q",), rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="already has an adapter"):
    lora.apply_lora(model, targets=("q",), rank=2, alpha=4.0, rngs=nnx.Rngs(1))


def test_merge_lora_keeps_the_function():
  model = tiny(tie=False)
  lora.apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  base = logits(model)
  perturb_adapters(model, scale=0.1)
  adapted = logits(model)
  assert float(jnp.max(jnp.abs(adapted - base))) > 0.1
  assert lora.merge_lora(model) == 22
  assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  # (x @ A) @ B and x @ (W + A B) round differently, at float32's ~1e-7 per operation
  # (matmuls at highest precision, see conftest).
  np.testing.assert_allclose(logits(model), adapted, atol=1e-5, rtol=1e-5)


def test_trainable_filter_selection():
  model = tiny(tie=False)
  lora.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  flt = finetune.model_trainable_filter(model, "partial", num_layers_unfrozen=1)
  names = set(flat_params(model, flt))
  assert names and all(n.startswith(("layers/2/", "final_norm", "lm_head/kernel")) for n in names)
  assert "lm_head/kernel" in names and "final_norm/scale" in names
  assert not any("lora" in n for n in names)
  assert "embedder/embedding" not in names
  assert set(flat_params(model, finetune.trainable_filter("lora"))) == \
      set(flat_params(model, nnx.LoRAParam))
  assert len(flat_params(model, finetune.trainable_filter("full"))) == len(flat_params(model))
  with pytest.raises(ValueError, match="encoder.training"):
    finetune.trainable_filter("adapters")
  with pytest.raises(ValueError, match="num_layers_unfrozen"):
    finetune.trainable_filter("partial", num_layers_unfrozen=5, num_layers=3)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_low_rank_product_gradient_matches_autodiff(dtype, tol):
  """The hand-written backward of an adapter equals JAX's transpose of the plain formula."""
  kx, ka, kb, kg = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (2, 5, 12), dtype)
  a = jax.random.normal(ka, (12, 3), dtype)
  b = jax.random.normal(kb, (3, 7), dtype)
  cotangent = jax.random.normal(kg, (2, 5, 7), dtype)
  plain = lambda x, a, b: (x @ a) @ b * jnp.asarray(2.5, dtype)
  fused = lambda x, a, b: lora.low_rank_product(x, a, b, 2.5)
  assert_vjp_matches(plain, fused, (x, a, b), cotangent, tol)


def _loss(model, tokens, mask):
  return -jnp.sum(sampling.token_logprobs(model, tokens, mask, chunk_size=3))


@pytest.mark.parametrize("mode", ["lora", "partial"])
def test_only_trainable_parameters_change(mode):
  model = tiny(tie=False)
  if mode == "lora":
    lora.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  wrt = finetune.model_trainable_filter(model, mode, num_layers_unfrozen=1)
  optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=wrt)
  before = flat_params(model)
  trainable = set(flat_params(model, wrt))

  @nnx.jit
  def step(model, optimizer, tokens, mask):
    grads = nnx.grad(_loss, argnums=nnx.DiffState(0, wrt))(model, tokens, mask)
    optimizer.update(model, grads)
    return grads

  grads = step(model, optimizer, *batch())
  assert set("/".join(map(str, k)) for k, _ in nnx.to_flat_state(grads)) == trainable
  after = flat_params(model)
  changed = {n for n in before if not np.array_equal(before[n], after[n])}
  assert changed and changed <= trainable
  if mode == "lora":  # B starts at zero, so only B moves on the first step
    assert all(n.endswith("lora_b") for n in changed)
  else:
    assert "lm_head/kernel" in changed and "layers/2/attn/q_proj/kernel" in changed


def test_lora_reference_is_the_base_model():
  model = tiny(tie=False)
  tokens, mask = batch()
  base = sampling.token_logprobs(model, tokens, mask)
  lora.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  ref = finetune.ReferencePolicy.from_model(model, "lora")
  assert ref.state is None
  perturb_adapters(model)
  policy = sampling.token_logprobs(model, tokens, mask)
  assert float(jnp.max(jnp.abs(policy - base))) > 1e-3

  @nnx.jit
  def both(model, ref, tokens, mask):
    return (sampling.reference_token_logprobs(ref, model, tokens, mask),
            sampling.token_logprobs(model, tokens, mask))

  ref_lp, policy_lp = both(model, ref, tokens, mask)
  np.testing.assert_allclose(ref_lp, base, atol=1e-5)
  np.testing.assert_allclose(policy_lp, policy, atol=1e-5)  # adapters back on afterwards


def test_partial_reference_stays_at_initial_values():
  model = tiny(tie=False)
  tokens, mask = batch()
  prompt, prompt_mask = tokens[:, :4], mask[:, :4]
  response, response_mask = tokens[:, 4:], mask[:, 4:]
  base = sampling.sequence_logprobs(model, prompt, prompt_mask, response, response_mask)
  ref = finetune.ReferencePolicy.from_model(model, "partial", num_layers_unfrozen=1)
  initial = jax.tree.map(np.asarray, ref.state)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=ref.wrt)

  @nnx.jit
  def step(model, optimizer, ref):
    def loss(model):
      logp = sampling.sequence_logprobs(model, prompt, prompt_mask, response, response_mask)
      ref_logp = sampling.reference_sequence_logprobs(ref, model, prompt, prompt_mask, response,
                                                      response_mask)
      return -jnp.sum(logp) + 0.0 * jnp.sum(ref_logp), ref_logp
    grads, ref_logp = nnx.grad(loss, argnums=nnx.DiffState(0, ref.wrt), has_aux=True)(model)
    optimizer.update(model, grads)
    return ref_logp

  for _ in range(3):
    ref_logp = step(model, optimizer, ref)
  np.testing.assert_allclose(ref_logp, base, atol=1e-5)
  trained = sampling.sequence_logprobs(model, prompt, prompt_mask, response, response_mask)
  assert bool(jnp.all(trained > base))  # the policy moved, the reference did not
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, ref.state), initial)
  np.testing.assert_allclose(
      sampling.reference_sequence_logprobs(ref, model, prompt, prompt_mask, response,
                                           response_mask), base, atol=1e-5)
