"""Text embedder: pooling, normalisation, tokenization, BERT and LLM backbones vs transformers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from langptune_jax import parallel
from langptune_jax.models import bert
from langptune_jax.models import embedder as emb
from langptune_jax.rec import retrieval


class _Fixed(nnx.Module):
  """A stand-in backbone returning given hidden states (to test pooling alone)."""

  def __init__(self, hidden):
    self.hidden = nnx.Variable(jnp.asarray(hidden))

  def __call__(self, tokens, positions, attention_mask, return_hidden=False):
    assert return_hidden
    return self.hidden[...], None


def _right_padded(lengths, length):
  return (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)


def test_pooling_modes():
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = _right_padded([5, 2, 1], 5)
  np.testing.assert_allclose(emb.pool(hidden, mask, "cls"), hidden[:, 0])
  want_mean = np.stack([hidden[0].mean(0), hidden[1, :2].mean(0), hidden[2, 0]])
  np.testing.assert_allclose(emb.pool(hidden, mask, "mean"), want_mean, rtol=1e-6)
  want_last = np.stack([hidden[0, 4], hidden[1, 1], hidden[2, 0]])
  np.testing.assert_allclose(emb.pool(hidden, mask, "last"), want_last)
  # The last real token also with left padding (the index does not assume a side).
  left = mask[:, ::-1].copy()
  np.testing.assert_allclose(emb.pool(hidden, left, "last"), hidden[:, 4])
  with pytest.raises(ValueError, match="decoder.pooling='max'"):
    emb.pool(hidden, mask, "max")


def test_embed_normalize_flag_and_dtype():
  rng = np.random.default_rng(1)
  hidden = (rng.normal(size=(2, 4, 8)) * 3).astype(np.float32)
  backbone = _Fixed(hidden.astype(jnp.bfloat16))
  tokens = jnp.zeros((2, 4), jnp.int32)
  mask = jnp.asarray(_right_padded([4, 3], 4))
  raw = emb.embed(backbone, tokens, mask, "last", normalize=False)
  unit = emb.embed(backbone, tokens, mask, "last", normalize=True)
  assert raw.dtype == unit.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, rtol=1e-6)
  assert not np.allclose(np.linalg.norm(raw, axis=-1), 1.0)
  np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=-1, keepdims=True), rtol=1e-6)
  # A zero vector stays finite when normalised.
  assert np.all(np.isfinite(emb.l2_normalize(jnp.zeros((1, 3)))))
  with pytest.raises(ValueError, match="tokens shape"):
    emb.embed(backbone, tokens, mask[:, :3], "last")


def test_llm_path_gets_causal_padded_mask_and_positions():
  seen = {}

  class Spy(nnx.Module):
    def __call__(self, tokens, positions, attention_mask, return_hidden=False):
      seen["positions"], seen["mask"] = positions, attention_mask
      return jnp.ones(tokens.shape + (2,)), None

  mask = _right_padded([3, 1], 4)
  emb.embed(Spy(), jnp.zeros((2, 4), jnp.int32), jnp.asarray(mask), "last")
  np.testing.assert_array_equal(seen["positions"], [[0, 1, 2, 2], [0, 0, 0, 0]])
  m = np.asarray(seen["mask"])
  assert m.shape == (2, 4, 4)
  np.testing.assert_array_equal(m[0, 2], [1, 1, 1, 0])  # causal, real keys only
  np.testing.assert_array_equal(m[0, 0], [1, 0, 0, 0])
  np.testing.assert_array_equal(m[1, 3], [1, 0, 0, 0])  # pad keys never attended


def test_is_truncated():
  mask = _right_padded([4, 2, 0], 4)
  np.testing.assert_array_equal(emb.is_truncated(mask), [True, False, False])
  np.testing.assert_array_equal(emb.is_truncated(jnp.asarray(mask)), [True, False, False])


def test_tokenize_texts_bert(minilm_dir):
  from tokenizers import Tokenizer
  tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)
  texts = ["a cat", "one two three four five six seven eight nine ten", ""]
  ids, mask = emb.tokenize_texts(tok, texts, max_len=6)
  assert ids.shape == mask.shape == (3, 6) and ids.dtype == np.int32
  cls, sep = tok.cls_token_id, tok.sep_token_id
  np.testing.assert_array_equal(ids[0], [cls, *tok("a cat", add_special_tokens=False)["input_ids"],
                                         sep, 0, 0])
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0])
  assert ids[1, 0] == cls and ids[1, -1] == sep  # truncation keeps the final [SEP]
  np.testing.assert_array_equal(ids[2, :2], [cls, sep])
  np.testing.assert_array_equal(emb.is_truncated(mask), [False, True, False])
  # Exactly filling the window counts as over-length too (no padding left).
  _, full = emb.tokenize_texts(tok, ["a cat"], max_len=4)
  assert emb.is_truncated(full)[0]
  # A raw `tokenizers.Tokenizer` gives the same ids, and the caller's object is untouched.
  raw = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
  before = raw.truncation
  ids2, mask2 = emb.tokenize_texts(raw, texts, max_len=6)
  np.testing.assert_array_equal(ids2, ids)
  np.testing.assert_array_equal(mask2, mask)
  assert raw.truncation == before
  with pytest.raises(ValueError, match="max_len=0"):
    emb.tokenize_texts(tok, texts, max_len=0)
  with pytest.raises(TypeError, match="got NoneType"):
    emb.tokenize_texts(tok, ["x", None], max_len=4)


def test_tokenize_texts_pads_right_with_eos_when_no_pad_token():
  class NoPad:
    pad_token_id = None
    eos_token_id = 7
    padding_side = "left"

    def __call__(self, texts, truncation, max_length, padding):
      assert truncation and not padding
      return {"input_ids": [[1, 2, 3, 4, 5][:max_length] if t == "long" else [1, 9]
                            for t in texts]}

  ids, mask = emb.tokenize_texts(NoPad(), ["short", "long"], max_len=4)
  np.testing.assert_array_equal(ids, [[1, 9, 7, 7], [1, 2, 3, 4]])
  np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 1]])


def _tiny_bert(seed=0, **kw):
  cfg = bert.BertConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_position_embeddings=32, **kw)
  return bert.Bert(cfg, rngs=nnx.Rngs(seed))


def test_embedder_module_and_errors():
  model = _tiny_bert()
  e = emb.Embedder(model, family="bert", pooling="cls", normalize=False)
  tokens = jnp.asarray(np.arange(12).reshape(2, 6) % 128, jnp.int32)
  mask = jnp.asarray(_right_padded([6, 3], 6))
  got = nnx.jit(lambda m, t, k: m(t, k))(e, tokens, mask)
  want = nnx.jit(lambda m, t, k: m(t, k)[:, 0])(model, tokens, mask)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert e.num_layers() == 2
  with pytest.raises(ValueError, match="decoder.pooling='cls' is meaningless"):
    emb.Embedder(model, family="llama", pooling="cls")
  with pytest.raises(ValueError, match="decoder.family='t5'"):
    emb.Embedder(model, family="t5", pooling="mean")
  with pytest.raises(ValueError, match="decoder.family='t5'"):
    emb.load_embedder("t5", "/nowhere")
  with pytest.raises(ValueError, match="decoder.path is empty"):
    emb.load_embedder("bert", "")
  with pytest.raises(FileNotFoundError, match="decoder.path='/nowhere/x'"):
    emb.load_embedder("bert", "/nowhere/x")
  with pytest.raises(ValueError, match="decoder.pooling='first'"):
    emb.load_embedder("bert", "/nowhere", pooling="first")


def test_embed_catalogue_matches_direct_on_mesh():
  e = emb.Embedder(_tiny_bert(seed=3), family="bert", pooling="mean", normalize=True)
  rng = np.random.default_rng(3)
  lengths = rng.integers(1, 11, size=11)
  mask = _right_padded(lengths, 10)
  ids = (rng.integers(1, 128, size=(11, 10)) * mask).astype(np.int32)
  want = np.asarray(e(jnp.asarray(ids), jnp.asarray(mask)))
  embed = nnx.jit(lambda model, t, m: model(t, m))
  got = retrieval.embed_catalogue(lambda t, m: embed(e, t, m), ids, mask, 4)
  assert got.shape == (11, 32) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5)
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=4)))
  sharded = parallel.shard_module(nnx.clone(e), mesh)
  with parallel.use_mesh(mesh):
    got = retrieval.embed_catalogue(lambda t, m: embed(sharded, t, m), ids, mask, 3,
                                    mesh=mesh)  # rounded up to 4
  np.testing.assert_allclose(got, want, atol=1e-5)
  with pytest.raises(ValueError, match="batch_size=0"):
    retrieval.embed_catalogue(lambda t, m: embed(e, t, m), ids, mask, 0)


def _torch_mean_pooled(model, enc):
  with torch.no_grad():
    out = model(**enc).last_hidden_state
  m = enc["attention_mask"].unsqueeze(-1).float()
  pooled = (out * m).sum(1) / m.sum(1).clamp(min=1e-9)
  return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.mark.slow
def test_minilm_matches_transformers(minilm_dir):
  from langptune_jax.weights import tokenizer as tok_lib
  tok = tok_lib.load_tokenizer(minilm_dir)
  sentences = ["A man is playing a guitar on stage.",
               "Someone performs music with a guitar in front of an audience.",
               "The stock market fell sharply after the announcement.",
               "cat"]
  ids, mask = emb.tokenize_texts(tok, sentences, max_len=24)
  e = emb.load_embedder("bert", minilm_dir, pooling="mean", normalize=True)
  got = np.asarray(jax.jit(lambda i, m: emb.embed(e.model, i, m, "mean", True))(ids, mask))
  ref = transformers.BertModel.from_pretrained(str(minilm_dir), local_files_only=True).eval()
  enc = {"input_ids": torch.tensor(ids, dtype=torch.long),
         "attention_mask": torch.tensor(mask, dtype=torch.long)}
  want = _torch_mean_pooled(ref, enc)
  assert got.shape == (4, 384)
  err = np.abs(got - want).max()
  assert err <= 1e-3, err
  sims = got @ got.T
  assert sims[0, 1] > sims[0, 2] + 0.2  # the paraphrase is far closer than the unrelated one
  assert sims[0, 1] > sims[0, 3]


def _save_tiny_llama(tmp_path, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=64, max_position_embeddings=64,
                                 tie_word_embeddings=True, rms_norm_eps=1e-5,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
  cfg._attn_implementation = "eager"
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(tmp_path)
  return model


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_llm_embedder_matches_transformers(tmp_path, pooling):
  ref = _save_tiny_llama(tmp_path)
  e = emb.load_embedder("llama", tmp_path, pooling=pooling, normalize=False)
  lengths = [9, 5, 2]
  mask = _right_padded(lengths, 9)
  rng = np.random.default_rng(4)
  ids = (rng.integers(3, 128, size=(3, 9)) * mask).astype(np.int32)
  got = np.asarray(e(jnp.asarray(ids), jnp.asarray(mask)))
  with torch.no_grad():
    hidden = ref.model(input_ids=torch.tensor(ids, dtype=torch.long),
                       attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state
  hidden = hidden.numpy()
  if pooling == "last":
    want = np.stack([hidden[i, n - 1] for i, n in enumerate(lengths)])
  else:
    want = np.stack([hidden[i, :n].mean(0) for i, n in enumerate(lengths)])
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match="decoder.family='gemma' but .* holds a 'llama' model"):
    emb.load_embedder("gemma", tmp_path, pooling="last")


def test_recommender_remat_takes_the_mode_names():
  with pytest.raises(ValueError, match=r"^decoder.remat='dots': expected one of none, full$"):
    emb.load_embedder("bert", "/nowhere", remat="dots")
  with pytest.raises(ValueError, match=r"^decoder.remat=True: expected one of none, full$"):
    emb.load_embedder("bert", "/nowhere", remat=True)
