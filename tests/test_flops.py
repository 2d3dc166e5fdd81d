"""FLOPs accounting, chip table, MFU and step timing."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from langptune_jax import flops

LLAMA = types.SimpleNamespace(family="llama", vocab_size=1000, embed_dim=64, num_layers=3,
                              num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=256)
BERT = types.SimpleNamespace(family="bert", vocab_size=500, hidden_size=64, num_layers=2,
                             num_heads=4, intermediate_size=128)


def test_matmul_params_by_hand():
  p = flops.matmul_params(LLAMA)
  # q + k + v + o per layer: 64*64 + 2*64*32 + 64*64.
  assert p["attention"] == 3 * (64 * 64 + 2 * 64 * 32 + 64 * 64)
  assert p["mlp"] == 3 * 3 * 64 * 256  # gated: gate, up, down
  assert p["lm_head"] == 64 * 1000
  b = flops.matmul_params(BERT)
  assert b["attention"] == 2 * 4 * 64 * 64 and b["mlp"] == 2 * 2 * 64 * 128
  assert b["lm_head"] == 0  # an embedder has no vocabulary projection


def test_forward_and_train_flops():
  t = 128
  n = sum(flops.matmul_params(LLAMA).values())
  fwd = flops.forward_flops_per_token(LLAMA, t)
  attention = 4 * 3 * 4 * 16 * (t + 1) / 2  # causal: mean context (T+1)/2
  assert fwd == pytest.approx(2 * n + attention)
  # Full training: the 6N rule (3x forward).
  assert flops.train_flops_per_token(LLAMA, t) == pytest.approx(3 * fwd)
  # Frozen base + LoRA: weight gradients only for the adapters.
  lora = flops.lora_params(LLAMA, 8)
  assert 0 < lora < n
  lora_train = flops.train_flops_per_token(LLAMA, t, lora_rank=8)
  fwd_lora = flops.forward_flops_per_token(LLAMA, t, lora_rank=8)
  assert fwd_lora < lora_train < 3 * fwd_lora
  assert lora_train == pytest.approx(2 * fwd_lora + attention + 2 * lora)
  # BERT attends to the whole sequence.
  assert flops.forward_flops_per_token(BERT, 32) == pytest.approx(
      2 * sum(flops.matmul_params(BERT).values()) + 4 * 2 * 4 * 16 * 32)


def test_decode_and_sample_flops():
  per = flops.decode_flops_per_token(LLAMA, 100)
  assert per > flops.decode_flops_per_token(LLAMA, 10)  # longer context costs more
  total = flops.sample_flops(LLAMA, batch=2, prompt_len=8, new_tokens=4)
  prefill = 2 * 8 * flops.forward_flops_per_token(LLAMA, 8)
  decode = sum(2 * flops.decode_flops_per_token(LLAMA, 8 + s + 1) for s in range(4))
  assert total == pytest.approx(prefill + decode)


def test_step_flops():
  t = 24
  assert flops.rlso_pass_flops(LLAMA, 4, 16, 8, lora_rank=8) == pytest.approx(
      4 * t * flops.train_flops_per_token(LLAMA, t, lora_rank=8))
  assert flops.logprobs_flops(LLAMA, 4, t) == pytest.approx(
      2 * flops.logprobs_flops(LLAMA, 4, t, with_reference=False))
  assert flops.cl_step_flops(BERT, 8, 32) == pytest.approx(
      2 * 8 * 32 * 3 * flops.forward_flops_per_token(BERT, 32))
  assert flops.embed_flops(BERT, 8, 32) == pytest.approx(
      8 * 32 * flops.forward_flops_per_token(BERT, 32))


def test_forward_flops_match_xla_cost_analysis():
  """The analytic matmul count agrees with XLA's count of a real decoder forward."""
  from flax import nnx

  from langptune_jax.models import transformer
  cfg = transformer.DecoderConfig(family="llama", vocab_size=512, embed_dim=64, num_layers=2,
                                  num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=256,
                                  tie_embeddings=False)
  model = transformer.Decoder(cfg, rngs=nnx.Rngs(0))
  b, t = 2, 32
  tokens = jnp.zeros((b, t), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = transformer.causal_mask(jnp.ones((b, t), bool))
  graphdef, state = nnx.split(model)

  def fwd(state, tokens, positions, mask):
    return nnx.merge(graphdef, state)(tokens, positions, mask)[0]

  cost = jax.jit(fwd).lower(state, tokens, positions, mask).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost or "flops" not in cost:
    pytest.skip("this backend gives no cost analysis")
  # XLA computes the full (masked) T x T attention: compare with a non-causal count.
  dims = dataclasses.replace(flops.dims_of(cfg), causal=False)
  expected = b * t * flops.forward_flops_per_token(dims, t)
  # XLA also counts element-wise work (norms, softmax, rope), a few percent here.
  assert expected <= cost["flops"] <= 1.25 * expected


def test_chip_table_and_lookup():
  assert flops.chip("H100").hbm_gib == 80 and flops.chip("v5e").hbm_gib == 16
  assert flops.chip("v5p").peak_tflops > flops.chip("v4").peak_tflops
  with pytest.raises(ValueError, match="unknown chip 'tpu9'"):
    flops.chip("tpu9")
  kinds = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
           "TPU v6 lite": "v6e", "NVIDIA H100 80GB HBM3": "H100", "NVIDIA H200": "H200",
           "NVIDIA A100-SXM4-80GB": "A100"}
  for kind, name in kinds.items():
    assert flops.chip_for_device(types.SimpleNamespace(device_kind=kind)).name == name, kind
  assert flops.chip_for_device(types.SimpleNamespace(device_kind="cpu")) is None
  # CPU: no table entry, so the configured peak is the only source.
  assert flops.peak_tflops(0.0, types.SimpleNamespace(device_kind="cpu")) == 0.0
  assert flops.peak_tflops(12.5, types.SimpleNamespace(device_kind="cpu")) == 12.5
  assert flops.peak_tflops(0.0, types.SimpleNamespace(device_kind="TPU v4")) == 275.0


def test_mfu():
  # 8 devices x 100 TFLOP/s for 2 s = 1.6e15 FLOPs at 100%.
  assert flops.mfu(0.4e15, 2.0, 8, 100.0) == pytest.approx(0.25)
  assert flops.mfu(1e12, 1.0, 8, 0.0) == 0.0  # unknown peak: no MFU


def test_step_timer_separates_compile_from_steps():
  timer = flops.StepTimer("cl", num_devices=1, peak_tflops_per_device=1.0, log=None)
  step = timer.wrap(jax.jit(lambda x: jnp.tanh(x @ x)))
  x = jnp.ones((64, 64))
  step(x)
  assert timer.num_compiles == 1 and timer.compile_time_s > 0 and timer.num_steps == 0
  compile_time = timer.compile_time_s
  out = step(x)
  step(x)
  np.testing.assert_allclose(out, jnp.tanh(x @ x), rtol=1e-6)
  assert timer.num_steps == 2 and timer.compile_time_s == compile_time
  step(jnp.ones((32, 32)))  # a new shape compiles again and is not a step
  assert timer.num_compiles == 2 and timer.num_steps == 2
  m = timer.metrics(tokens=1000, flops=2 * 64 ** 3)
  assert m["cl/step_time_s"] > 0 and m["cl/compile_time_s"] > compile_time
  assert m["cl/tokens_per_s"] == pytest.approx(1000 / m["cl/step_time_s"])
  assert m["cl/mfu"] == pytest.approx(2 * 64 ** 3 / m["cl/step_time_s"] / 1e12)
