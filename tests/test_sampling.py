"""Sampler and log-prob scoring on a tiny random decoder (and SmolLM2 vs HF, slow)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from langptune_jax import parallel, sampling
from langptune_jax.models import transformer

EOS, PAD, VOCAB = 1, 0, 64


def tiny_decoder(seed=0, tie=True, vocab=VOCAB):
  """A 2-layer GQA Llama with weights large enough that argmaxes are clear."""
  config = transformer.DecoderConfig(
      family="llama", vocab_size=vocab, embed_dim=32, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=8, mlp_dim=64, norm_eps=1e-5, tie_embeddings=tie,
      eos_ids=(EOS,), pad_id=PAD)
  model = transformer.Decoder(config, rngs=nnx.Rngs(seed))
  # Default init (std 0.02) gives near-uniform logits; rescale so that ranks
  # are well separated and greedy paths are robust to rounding.
  state = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(seed + 100), 64))
  def rescale(x):
    std = 1.0 if x.ndim == 1 else (1.0 / np.sqrt(x.shape[0]) if x.shape[0] != vocab else 1.0)
    if x.ndim == 1:
      return jnp.ones_like(x)
    return jax.random.normal(next(keys), x.shape, x.dtype) * std * 1.5
  nnx.update(model, jax.tree.map(rescale, state))
  return model


def left_pad(rows, length=None):
  length = length or max(len(r) for r in rows)
  tokens = np.full((len(rows), length), PAD, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, r in enumerate(rows):
    tokens[i, length - len(r):] = r
    mask[i, length - len(r):] = True
  return jnp.asarray(tokens), jnp.asarray(mask)


def full_forward_logits(model, tokens, mask):
  logits, _ = model(tokens, sampling.positions_from_mask(mask),
                    sampling.causal_padding_mask(mask))
  return logits


@nnx.jit
def _next_token(model, tokens, length):
  """argmax of a full (uncached) forward at position length - 1 of a right-padded row."""
  mask = jnp.arange(tokens.shape[1])[None] < length
  logits = full_forward_logits(model, tokens, mask)
  return jnp.argmax(logits[0, length - 1])


def reference_greedy(model, row, n, width=32):
  """Greedy decoding by a full forward over the whole sequence at every step."""
  seq = list(row)
  for _ in range(n):
    tokens = jnp.asarray([seq + [PAD] * (width - len(seq))], jnp.int32)
    seq.append(int(_next_token(model, tokens, len(seq))))
  return seq[len(row):]


PROMPTS = [[5, 9, 17, 33, 2, 8, 40], [7, 3, 11], [60, 21, 4, 4, 19]]


@pytest.fixture(scope="module")
def model():
  return tiny_decoder()


def test_greedy_matches_full_forward_argmax(model):
  tokens, mask = left_pad(PROMPTS)
  out = sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=10,
                        greedy=True, pad_id=PAD)
  assert out.tokens.shape == (3, 10) and out.tokens.dtype == jnp.int32
  assert bool(out.response_mask.all())
  for i, row in enumerate(PROMPTS):
    assert out.tokens[i].tolist() == reference_greedy(model, row, 10)


def test_left_padding_does_not_change_generation(model):
  tokens, mask = left_pad(PROMPTS)
  batched = sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=8,
                            greedy=True)
  for i, row in enumerate(PROMPTS):
    single_t, single_m = left_pad([row])
    alone = sampling.sample(model, single_t, single_m, rng=jax.random.key(0), max_new_tokens=8,
                            greedy=True)
    assert batched.tokens[i].tolist() == alone.tokens[0].tolist()
    np.testing.assert_allclose(batched.logprobs[i], alone.logprobs[0], atol=1e-5)


def test_eos_truncation_and_stop_at_eos(model):
  tokens, mask = left_pad(PROMPTS)
  free = sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=12,
                         greedy=True, pad_id=PAD)
  # Declare the token row 0 produces at step 3 an EOS.
  eos = int(free.tokens[0, 3])
  pad = VOCAB - 1
  out = sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=12,
                        greedy=True, eos_ids=(eos,), pad_id=pad)
  for i in range(3):
    row = free.tokens[i].tolist()
    first = row.index(eos) if eos in row else 12
    expect = row[:first + 1] + [pad] * (12 - first - 1)
    assert out.tokens[i].tolist() == expect[:12]
    assert out.response_mask[i].tolist() == [t <= first for t in range(12)]
    assert bool(jnp.all(out.logprobs[i][first + 1:] == 0.0))
  assert int(out.response_mask[0].sum()) == 4  # up to and including the EOS
  stopped = sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=12,
                            greedy=True, eos_ids=(eos,), pad_id=pad, stop_at_eos=True)
  np.testing.assert_array_equal(stopped.tokens, out.tokens)
  np.testing.assert_array_equal(stopped.response_mask, out.response_mask)
  np.testing.assert_allclose(stopped.logprobs, out.logprobs, atol=1e-6)


def test_min_new_tokens_suppresses_eos(model):
  tokens, mask = left_pad(PROMPTS[:1])
  free = sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=6,
                         greedy=True)
  eos = int(free.tokens[0, 0])
  early = sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=6,
                          greedy=True, eos_ids=(eos,))
  assert int(early.response_mask[0].sum()) == 1
  late = sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=6,
                         greedy=True, eos_ids=(eos,), min_new_tokens=3)
  assert eos not in late.tokens[0, :3].tolist()
  assert int(late.response_mask[0].sum()) >= 3


def test_top_k_one_and_tiny_top_p_equal_greedy(model):
  tokens, mask = left_pad(PROMPTS)
  greedy = sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=8,
                           greedy=True)
  for kw in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)):
    out = sampling.sample(model, tokens, mask, rng=jax.random.key(3), max_new_tokens=8, **kw)
    np.testing.assert_array_equal(out.tokens, greedy.tokens, err_msg=str(kw))


def test_top_k_and_top_p_restrict_the_support(model):
  prompt = PROMPTS[0]
  temp = 4.0  # a flat distribution: many tokens are likely
  tokens, mask = left_pad([prompt] * 64)
  first_logits = full_forward_logits(model, tokens[:1], mask[:1])[0, -1]
  probs = np.asarray(jax.nn.softmax(first_logits / temp))
  order = np.argsort(-probs)
  kw = dict(rng=jax.random.key(1), max_new_tokens=1, temperature=temp)
  free = sampling.sample(model, tokens, mask, **kw)
  assert len(set(free.tokens[:, 0].tolist())) > 3
  top3 = sampling.sample(model, tokens, mask, top_k=3, **kw)
  assert set(top3.tokens[:, 0].tolist()) <= set(order[:3].tolist())
  assert len(set(top3.tokens[:, 0].tolist())) > 1
  # The smallest nucleus holding 60% of the mass.
  n_keep = int(np.searchsorted(np.cumsum(probs[order]), 0.6) + 1)
  assert 1 < n_keep < VOCAB // 2
  nucleus = sampling.sample(model, tokens, mask, top_p=0.6, **kw)
  assert set(nucleus.tokens[:, 0].tolist()) <= set(order[:n_keep].tolist())
  assert len(set(nucleus.tokens[:, 0].tolist())) > 1


def test_sampled_logprobs_match_full_forward(model):
  tokens, mask = left_pad(PROMPTS)
  out = sampling.sample(model, tokens, mask, rng=jax.random.key(7), max_new_tokens=9,
                        temperature=0.7, eos_ids=(EOS,), pad_id=PAD)
  full_tokens = jnp.concatenate([tokens, out.tokens], axis=1)
  full_mask = jnp.concatenate([mask, out.response_mask], axis=1)
  recomputed = sampling.token_logprobs_jit(model, full_tokens, full_mask, temperature=0.7)
  np.testing.assert_allclose(out.logprobs, recomputed[:, tokens.shape[1]:], atol=1e-4)
  assert float(jnp.abs(out.logprobs).sum()) > 0
  seq = sampling.sequence_logprobs(model, tokens, mask, out.tokens, out.response_mask,
                                   temperature=0.7, chunk_size=4)
  np.testing.assert_allclose(seq, out.logprobs.sum(-1), atol=1e-4)


def test_token_logprobs_chunking_and_entropy(model):
  tokens, mask = left_pad(PROMPTS)
  a, ent_a = sampling.token_logprobs(model, tokens, mask, return_entropy=True, chunk_size=128)
  b, ent_b = sampling.token_logprobs(model, tokens, mask, return_entropy=True, chunk_size=2)
  np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(ent_a, ent_b, atol=1e-5)
  # Reference: log_softmax of a plain full forward.
  logits = full_forward_logits(model, tokens, mask)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  valid = mask[:, 1:] & mask[:, :-1]
  np.testing.assert_allclose(a[:, 1:], jnp.where(valid, picked, 0), atol=1e-5)
  assert bool(jnp.all(a[:, 0] == 0)) and bool(jnp.all(a[~mask] == 0))
  assert bool(jnp.all(ent_a[:, 1:][valid] > 0))
  assert bool(jnp.all(ent_a[:, 1:][valid] <= np.log(VOCAB) + 1e-5))


def test_stream_pieces_are_the_sampled_tokens(model):
  tokens, mask = left_pad(PROMPTS)
  for greedy in (True, False):
    whole = sampling.sample(model, tokens, mask, rng=jax.random.key(4), max_new_tokens=11,
                            temperature=0.7, greedy=greedy, pad_id=PAD)
    pieces = list(sampling.sample_stream(model, tokens, mask, rng=jax.random.key(4),
                                         max_new_tokens=11, chunk_tokens=3, temperature=0.7,
                                         greedy=greedy, pad_id=PAD))
    assert [p.shape for p in pieces] == [(3, 3)] * 3 + [(3, 2)]
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), whole.tokens)
  # Once every row has produced an EOS the stream ends; the pieces hold the tokens up to it.
  eos = int(whole.tokens[0, 1])
  cut = sampling.sample(model, tokens, mask, rng=jax.random.key(4), max_new_tokens=11,
                        temperature=0.7, eos_ids=(eos,), pad_id=PAD)
  pieces = list(sampling.sample_stream(model, tokens, mask, rng=jax.random.key(4),
                                       max_new_tokens=11, chunk_tokens=3, temperature=0.7,
                                       eos_ids=(eos,), pad_id=PAD))
  streamed = np.concatenate(pieces, axis=1)
  ends = [row.index(eos) + 1 if eos in row else 11 for row in streamed.tolist()]
  assert streamed.shape[1] == min(11, -(-max(ends) // 3) * 3)
  for i, end in enumerate(ends):
    assert streamed[i, :end].tolist() == np.asarray(cut.tokens)[i, :end].tolist()
    assert bool(cut.response_mask[i, :end].all()) and not bool(cut.response_mask[i, end:].any())
  with pytest.raises(ValueError, match="chunk_tokens=0"):
    next(sampling.sample_stream(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=4,
                                chunk_tokens=0))


def test_no_recompilation_within_a_bucket(model):
  tokens, mask = left_pad(PROMPTS)
  sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=10)
  before = dict(sampling.TRACE_COUNTS)
  # Different prompt length and new-token count, same buckets (16 and 16).
  tokens2, mask2 = left_pad(PROMPTS, length=11)
  out = sampling.sample(model, tokens2, mask2, rng=jax.random.key(1), max_new_tokens=13)
  assert out.tokens.shape == (3, 13)
  assert dict(sampling.TRACE_COUNTS) == before


def test_sharded_batch_equals_single_device(model):
  rows = [PROMPTS[i % 3][: 3 + i % 4] for i in range(8)]
  tokens, mask = left_pad(rows)
  single = sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=6,
                           greedy=True)
  mesh = parallel.make_mesh(type("M", (), {"data": 8, "fsdp": 1, "tensor": 1})())
  sharded_model = nnx.clone(model)
  parallel.shard_module(sharded_model, mesh)
  with parallel.use_mesh(mesh):
    out = sampling.sample(sharded_model, tokens, mask, rng=jax.random.key(0), max_new_tokens=6,
                          greedy=True)
    # An odd batch is padded to the data-parallel size and cut back.
    odd = sampling.sample(sharded_model, tokens[:5], mask[:5], rng=jax.random.key(0),
                          max_new_tokens=6, greedy=True)
  np.testing.assert_array_equal(out.tokens, single.tokens)
  np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-5)
  np.testing.assert_array_equal(odd.tokens, single.tokens[:5])


def test_bad_arguments_raise(model):
  tokens, mask = left_pad(PROMPTS)
  with pytest.raises(ValueError, match="max_new_tokens"):
    sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p"):
    sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="cache_size"):
    sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=8, cache_size=10)


def test_bucket_length():
  lengths = (1, 16, 17, 21, 25, 128, 129, 150, 161, 192, 193, 900, 1024, 1025)
  assert [sampling.bucket_length(n) for n in lengths] == \
      [16, 16, 20, 24, 28, 128, 160, 160, 192, 192, 224, 1024, 1024, 2048]


@pytest.mark.slow
def test_smollm2_greedy_matches_hf_generate(smollm2_gguf):
  import pathlib

  import torch
  import transformers

  from langptune_jax.weights import hf as hf_weights
  from langptune_jax.weights import tokenizer as tok_lib

  path = pathlib.Path(smollm2_gguf)
  tok = tok_lib.load_tokenizer(path)
  questions = ["Describe in two sentences what a movie lover enjoys.", "Name a film."]
  prompts = []
  for q in questions:
    text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                   add_generation_prompt=True)
    prompts.append(tok(text, add_special_tokens=False)["input_ids"])
  assert len(prompts[1]) < len(prompts[0])  # row 1 is left-padded
  eos, pad = tok_lib.eos_ids(tok), tok_lib.pad_id(tok)
  model, _ = hf_weights.load_decoder(path, dtype="float32", param_dtype="float32")
  tokens, mask = left_pad(prompts)
  ours = sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=32,
                         greedy=True, eos_ids=eos, pad_id=pad)

  torch_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32)
  torch_model.eval()
  for i, ids in enumerate(prompts):
    with torch.no_grad():
      generated = torch_model.generate(
          torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
          max_new_tokens=32, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    theirs = generated[0, len(ids):].tolist()
    n = int(ours.response_mask[i].sum())
    assert len(theirs) >= 8
    assert ours.tokens[i, :n].tolist() == theirs, (i, tok.decode(theirs))
