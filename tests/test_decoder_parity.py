"""Decoder parity with transformers+torch: tiny random Llama/Gemma 1/2/3, KV cache,
left padding, sharded forward, and real GGUF weights (slow)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from langptune_jax import parallel
from langptune_jax.models import transformer as tr
from langptune_jax.weights import hf as hf_weights

VOCAB = 128
SEQ = 24
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.15,
              max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _hf_config(kind: str):
  if kind == "llama_untied":
    return transformers.LlamaConfig(**COMMON, tie_word_embeddings=False, rope_theta=500000.0,
                                    rope_scaling=LLAMA3_ROPE)
  if kind == "llama_tied":
    return transformers.LlamaConfig(**COMMON, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE)
  if kind == "gemma":
    return transformers.GemmaConfig(**{**COMMON, "num_key_value_heads": 1}, head_dim=16)
  if kind == "gemma2":
    return transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=8,
                                     query_pre_attn_scalar=32, attn_logit_softcapping=5.0,
                                     final_logit_softcapping=3.0)
  if kind == "gemma3":
    return transformers.Gemma3TextConfig(
        **COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_scaling={"rope_type": "linear", "factor": 2.0})
  raise ValueError(kind)


KINDS = ("llama_untied", "llama_tied", "gemma", "gemma2", "gemma3")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """kind -> (torch model, saved directory); built lazily."""
  cache = {}

  def get(kind):
    if kind not in cache:
      torch.manual_seed(hash(kind) % 1000)
      config = _hf_config(kind)
      config._attn_implementation = "eager"
      model = transformers.AutoModelForCausalLM.from_config(config).eval()
      # Random norm weights, so the (1 + w) conventions are exercised.
      with torch.no_grad():
        for name, p in model.named_parameters():
          if "norm" in name:
            p.add_(0.1 * torch.randn_like(p))
      path = tmp_path_factory.mktemp(kind)
      model.save_pretrained(path)
      cache[kind] = (model, path)
    return cache[kind]

  return get


def _tokens(batch=2, length=SEQ, seed=0):
  return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


def _torch_logits(model, tokens, mask=None):
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.tensor(mask, dtype=torch.long)}
    return model(torch.tensor(tokens, dtype=torch.long), **kw).logits.float().numpy()


def _full_forward(model, tokens):
  valid = jnp.ones(tokens.shape, bool)
  logits, cache = model(jnp.asarray(tokens), tr.positions_from_mask(valid),
                        tr.causal_mask(valid))
  assert cache is None
  return np.asarray(logits)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_random_parity(hf_models, kind):
  torch_model, path = hf_models(kind)
  model, config = hf_weights.load_decoder(path)
  assert config.family == kind.split("_")[0]
  tokens = _tokens()
  ref = _torch_logits(torch_model, tokens)
  ours = _full_forward(model, tokens)
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  assert np.abs(ref).max() > 0.5  # logits are not trivially small
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_config_switches(hf_models):
  _, path = hf_models("gemma2")
  _, c2 = hf_weights.load_decoder(path)
  assert c2.layer_types == ("local", "global", "local") and c2.sliding_window == 8
  assert c2.attn_logit_softcap == 5.0 and c2.final_logit_softcap == 3.0 and c2.post_norms
  _, c3 = hf_weights.load_decoder(hf_models("gemma3")[1])
  assert c3.qk_norm and c3.rope_local_theta == 10_000.0 and c3.rope_theta == 1_000_000.0
  assert c3.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
  hash(c3)  # usable as a static jit argument


@pytest.mark.parametrize("kind", ["llama_untied", "gemma2"])
def test_kv_cache_decode_matches_full_forward(hf_models, kind):
  model, _ = hf_weights.load_decoder(hf_models(kind)[1])
  tokens = _tokens(length=20, seed=1)
  full = _full_forward(model, tokens)
  b, total, prefill, cache_len = 2, 20, 7, 32
  cache = model.init_cache(b, cache_len)
  step = nnx.jit(lambda m, tok, pos, mask, c: m(tok, pos, mask, c))
  outs = []
  t0 = 0
  for t1 in [prefill] + list(range(prefill + 1, total + 1)):
    q = jnp.arange(t0, t1)
    mask = jnp.broadcast_to(jnp.arange(cache_len)[None, :] <= q[:, None], (b, t1 - t0, cache_len))
    pos = jnp.broadcast_to(q, (b, t1 - t0)).astype(jnp.int32)
    logits, cache = step(model, jnp.asarray(tokens[:, t0:t1]), pos, mask, cache)
    assert int(cache["end_index"]) == t1
    outs.append(np.asarray(logits))
    t0 = t1
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama_tied", "gemma2", "gemma3"])
def test_left_padding_leaves_rows_unchanged(hf_models, kind):
  torch_model, path = hf_models(kind)
  model, _ = hf_weights.load_decoder(path)
  lengths = (SEQ, SEQ - 9)
  rows = [_tokens(1, n, seed=3 + i)[0] for i, n in enumerate(lengths)]
  padded = np.zeros((2, SEQ), np.int32)
  valid = np.zeros((2, SEQ), bool)
  for i, row in enumerate(rows):
    padded[i, SEQ - len(row):] = row
    valid[i, SEQ - len(row):] = True
  logits, _ = model(jnp.asarray(padded), tr.positions_from_mask(jnp.asarray(valid)),
                    tr.causal_mask(jnp.asarray(valid)))
  logits = np.asarray(logits)
  for i, row in enumerate(rows):
    alone = _full_forward(model, row[None])[0]
    np.testing.assert_allclose(logits[i, SEQ - len(row):], alone, atol=1e-5, rtol=0)
  # transformers agrees on the padded batch too.
  ref = _torch_logits(torch_model, padded, valid)
  np.testing.assert_allclose(logits[valid], ref[valid], atol=1e-4, rtol=0)


def test_sharded_forward_matches_single_device(hf_models):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (emulated) devices")
  path = hf_models("gemma3")[1]
  model, _ = hf_weights.load_decoder(path)
  tokens = _tokens(batch=4)
  single = _full_forward(model, tokens)
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=4)))
  sharded_model, _ = hf_weights.load_decoder(path, mesh=mesh)
  q = sharded_model.layers[0].attn.q_proj.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  valid = jnp.ones(tokens.shape, bool)

  @nnx.jit
  def forward(m, tok, pos, mask):
    return m(tok, pos, mask)[0]

  with parallel.use_mesh(mesh):
    out = forward(sharded_model, jnp.asarray(tokens), tr.positions_from_mask(valid),
                  tr.causal_mask(valid))
  np.testing.assert_allclose(np.asarray(out), single, atol=1e-5, rtol=0)
  # Also through shard_module on an already-loaded model.
  parallel.shard_module(model, mesh)
  with parallel.use_mesh(mesh):
    out2 = forward(model, jnp.asarray(tokens), tr.positions_from_mask(valid),
                   tr.causal_mask(valid))
  np.testing.assert_allclose(np.asarray(out2), single, atol=1e-5, rtol=0)


def test_remat_and_hidden(hf_models):
  path = hf_models("llama_untied")[1]
  model, _ = hf_weights.load_decoder(path, remat="full")
  tokens = _tokens()
  valid = jnp.ones(tokens.shape, bool)
  args = (jnp.asarray(tokens), tr.positions_from_mask(valid), tr.causal_mask(valid))

  def loss(m):
    return m(*args)[0].mean()

  value, grads = nnx.value_and_grad(loss)(model)
  plain, _ = hf_weights.load_decoder(path)
  np.testing.assert_allclose(float(value), _full_forward(plain, tokens).mean(), atol=1e-6)
  assert float(jnp.abs(grads.layers[0].attn.q_proj.kernel[...]).max()) > 0
  hidden, _ = plain(*args, return_hidden=True)
  assert hidden.shape == (2, SEQ, 64)
  np.testing.assert_allclose(np.asarray(plain.logits_from_hidden(hidden)),
                             _full_forward(plain, tokens), atol=1e-6)


# --- real offline weights (GGUF) vs transformers' own GGUF conversion --------

TEXT = "The quick brown fox jumps over the lazy dog. A good movie recommendation is"


def _hf_from_gguf(path):
  """transformers' GGUF dequantization + renaming, into a torch model (no accelerate)."""
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  config_dict = load_gguf_checkpoint(str(path))["config"]
  config = transformers.AutoConfig.for_model(**config_dict)
  config._attn_implementation = "eager"
  from transformers.initialization import no_init_weights
  with no_init_weights():  # skip the (slow) random init of a large vocabulary
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
  tensors = {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in tensors.items()}
  result = model.load_state_dict(tensors, strict=False)
  assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys, result
  model.tie_weights()
  assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  return model.eval()


def _gguf_parity(path, ids, family):
  model, config = hf_weights.load_decoder(path)
  assert config.family == family
  ids = np.asarray(ids, np.int32)[None]
  ours = _full_forward(model, ids)
  del model
  ref = _torch_logits(_hf_from_gguf(path), ids)
  err = float(np.abs(ours - ref).max())
  print(f"{path.name}: max|dlogits|={err:.3g} (max|logit|={np.abs(ref).max():.3g})")
  assert np.abs(ref).max() > 5
  assert err <= 1e-3
  assert (ours.argmax(-1) == ref.argmax(-1)).all()
  return config


@pytest.mark.slow
def test_smollm2_gguf_parity(smollm2_gguf):
  from pathlib import Path
  path = Path(smollm2_gguf)
  tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  config = _gguf_parity(path, tok(TEXT)["input_ids"], "llama")
  assert (config.num_layers, config.num_heads, config.num_kv_heads) == (30, 9, 3)
  assert config.tie_embeddings and config.eos_ids == (2,)


@pytest.mark.slow
def test_gemma3_270m_gguf_parity(gemma3_gguf):
  from pathlib import Path
  path = Path(gemma3_gguf)
  # BOS + fixed ids (the 262k-entry GGUF tokenizer conversion is slow); spans the vocab.
  ids = [2] + list(np.random.RandomState(0).randint(3, 262_000, 15))
  config = _gguf_parity(path, ids, "gemma3")
  assert config.layer_types.count("global") == 3 and config.sliding_window == 512
