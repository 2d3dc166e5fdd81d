"""BERT encoder: parity with transformers' BertModel, loading errors, sharding."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from langptune_jax import parallel
from langptune_jax.models import bert

TINY_HF = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=40, type_vocab_size=2,
               layer_norm_eps=1e-12)


def _save_tiny(tmp_path, cls_name="BertModel", hidden_act="gelu", seed=0):
  """A tiny random HF BERT with every weight perturbed (norms and biases too)."""
  torch.manual_seed(seed)
  cfg = transformers.BertConfig(**TINY_HF, hidden_act=hidden_act)
  cfg._attn_implementation = "eager"
  model = getattr(transformers, cls_name)(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path)
  return model


def _batch(seed=0, batch=3, length=12, lengths=(12, 7, 3)):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, TINY_HF["vocab_size"], size=(batch, length)).astype(np.int32)
  mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  tokens = np.where(mask == 1, tokens, 0).astype(np.int32)
  types = (rng.random((batch, length)) < 0.3).astype(np.int32) * mask
  return tokens, mask, types


def _torch_hidden(model, tokens, mask, types):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                token_type_ids=torch.tensor(types, dtype=torch.long))
  return out.last_hidden_state.numpy()


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_parity_with_transformers_with_padding(tmp_path, hidden_act):
  ref = _save_tiny(tmp_path, hidden_act=hidden_act)
  model, cfg = bert.load_bert(tmp_path)
  assert cfg.num_layers == 2 and cfg.hidden_act == hidden_act
  tokens, mask, types = _batch()
  want = _torch_hidden(ref, tokens, mask, types)
  got = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(types)))
  assert got.shape == want.shape == (3, 12, 32)
  # Padded positions too: BERT masks keys only, so every position is defined.
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_loads_prefixed_checkpoint_and_ignores_heads(tmp_path):
  """BertForMaskedLM saves `bert.`-prefixed names plus `cls.` head tensors."""
  ref = _save_tiny(tmp_path, cls_name="BertForMaskedLM", seed=1)
  names = load_file(str(tmp_path / "model.safetensors")).keys()
  assert any(n.startswith("bert.") for n in names)
  model, _ = bert.load_bert(tmp_path)
  tokens, mask, types = _batch(seed=1)
  want = _torch_hidden(ref.bert, tokens, mask, types)
  got = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(types)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_sharded_index_and_bf16_params(tmp_path):
  ref = _save_tiny(tmp_path, seed=2)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  (tmp_path / "model.safetensors").unlink()
  names = sorted(tensors)
  half = len(names) // 2
  parts = {"model-00001-of-00002.safetensors": names[:half],
           "model-00002-of-00002.safetensors": names[half:]}
  weight_map = {}
  for file, keys in parts.items():
    save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    weight_map.update({k: file for k in keys})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  model, _ = bert.load_bert(tmp_path, param_dtype=jnp.bfloat16)
  assert model.layers[1].mlp.up.kernel[...].dtype == jnp.bfloat16
  tokens, mask, types = _batch(seed=2)
  want = _torch_hidden(ref, tokens, mask, types)
  got = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(types)))
  # bf16 weights, f32 compute: exactly the f32 model with its weights rounded to bf16.
  with torch.no_grad():
    for p in ref.parameters():
      p.copy_(p.to(torch.bfloat16).to(torch.float32))
  rounded = _torch_hidden(ref, tokens, mask, types)
  np.testing.assert_allclose(got, rounded, atol=1e-4, rtol=0)
  assert np.abs(got - want).max() > 1e-2  # the weights really were rounded


def _tiny_cfg(**kw):
  base = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
              max_position_embeddings=32)
  base.update(kw)
  return bert.BertConfig(**base)


def test_sharded_equals_unsharded():
  model = bert.Bert(_tiny_cfg(), rngs=nnx.Rngs(0))
  tokens, mask, _ = _batch(seed=3, batch=8, length=16, lengths=(16, 9, 4, 1, 16, 2, 5, 11))
  tokens = tokens % 128
  want = np.asarray(nnx.jit(lambda m, t, k: m(t, k))(model, jnp.asarray(tokens),
                                                     jnp.asarray(mask)))
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=4)))
  sharded = parallel.shard_module(nnx.clone(model), mesh)
  kernel = sharded.layers[0].attn.query.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert sharded.layers[0].mlp.down.kernel[...].sharding.spec == \
      jax.sharding.PartitionSpec("tensor", "fsdp")
  with parallel.use_mesh(mesh):
    t = parallel.put(tokens, mesh, ("batch", None))
    k = parallel.put(mask, mesh, ("batch", None))
    got = nnx.jit(lambda m, t, k: m(t, k))(sharded, t, k)
  assert got.sharding.spec[0] == "fsdp"  # batch sharded over the data-parallel axes
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_load_onto_mesh(tmp_path):
  ref = _save_tiny(tmp_path, seed=4)
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=4)))
  model, _ = bert.load_bert(tmp_path, mesh=mesh)
  assert model.layers[0].attn.key.kernel[...].sharding.spec == \
      jax.sharding.PartitionSpec("fsdp", "tensor")
  tokens, mask, types = _batch(seed=4, batch=4, lengths=(12, 7, 3, 1))
  want = _torch_hidden(ref, tokens, mask, types)
  with parallel.use_mesh(mesh):
    got = nnx.jit(lambda m, a, b, c: m(a, b, c))(model, jnp.asarray(tokens), jnp.asarray(mask),
                                                  jnp.asarray(types))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_remat_same_values_and_grads():
  tokens, mask, _ = _batch(seed=5, batch=2, length=8, lengths=(8, 5))
  tokens, mask = jnp.asarray(tokens % 128), jnp.asarray(mask)

  def loss(m):
    return jnp.sum(m(tokens, mask) ** 2)

  plain = bert.Bert(_tiny_cfg(num_layers=1), rngs=nnx.Rngs(1))
  remat = bert.Bert(_tiny_cfg(num_layers=1, remat=True), rngs=nnx.Rngs(1))
  value_and_grad = nnx.jit(nnx.value_and_grad(loss))
  l1, g1 = value_and_grad(plain)
  l2, g2 = value_and_grad(remat)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_fused_attention_equals_einsum_on_right_padding():
  tokens, mask, _ = _batch(seed=8, batch=3, length=8, lengths=(8, 5, 1))
  tokens, mask = jnp.asarray(tokens % 128), jnp.asarray(mask)
  run = nnx.jit(lambda m, t, k: m(t, k))
  plain = run(bert.Bert(_tiny_cfg(num_layers=1), rngs=nnx.Rngs(3)), tokens, mask)
  fused = run(bert.Bert(_tiny_cfg(num_layers=1, attention="fused"), rngs=nnx.Rngs(3)), tokens,
              mask)
  np.testing.assert_allclose(np.asarray(fused), np.asarray(plain), atol=1e-5)
  with pytest.raises(ValueError, match="attention='flash'"):
    _tiny_cfg(attention="flash")


def test_bf16_compute_close_to_f32():
  tokens, mask, _ = _batch(seed=6, batch=2, length=8, lengths=(8, 5))
  tokens, mask = jnp.asarray(tokens % 128), jnp.asarray(mask)
  f32 = bert.Bert(_tiny_cfg(num_layers=1), rngs=nnx.Rngs(2))
  bf16 = bert.Bert(_tiny_cfg(num_layers=1, dtype=jnp.bfloat16), rngs=nnx.Rngs(2))
  run = nnx.jit(lambda m, t, k: m(t, k))
  a, b = run(f32, tokens, mask), run(bf16, tokens, mask)
  assert b.dtype == jnp.bfloat16
  # LayerNorm outputs up to ~3 carry bf16 steps of 2**-6; one block of bf16 matmuls gives a
  # few of them at most (measured: max 0.021, mean 0.0026 over seeds).
  err = np.abs(np.asarray(b, np.float32) - np.asarray(a))
  assert err.max() < 0.04 and err.mean() < 0.005, (err.max(), err.mean())


def test_config_from_hf():
  cfg = bert.config_from_hf(dict(TINY_HF, num_hidden_layers=3, hidden_act="gelu_new"))
  assert (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.hidden_act) == (3, 4, 8, "gelu_new")
  with pytest.raises(ValueError, match="hidden_act='swish'"):
    bert.config_from_hf(dict(TINY_HF, hidden_act="swish"))
  with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
    bert.config_from_hf(dict(TINY_HF, position_embedding_type="relative_key"))
  with pytest.raises(ValueError, match="missing field 'hidden_size'"):
    bert.config_from_hf({k: v for k, v in TINY_HF.items() if k != "hidden_size"})
  with pytest.raises(ValueError, match="model_type='llama'"):
    bert.config_from_hf(dict(TINY_HF, model_type="llama"))
  with pytest.raises(ValueError, match="not divisible by num_heads=5"):
    bert.BertConfig(hidden_size=32, num_heads=5)


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="model directory not found"):
    bert.load_bert(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    bert.load_bert(tmp_path)
  _save_tiny(tmp_path, seed=7)
  file = tmp_path / "model.safetensors"
  tensors = load_file(str(file))

  missing = dict(tensors)
  del missing["encoder.layer.1.output.dense.bias"]
  save_file(missing, str(file))
  with pytest.raises(ValueError, match=r"missing tensor 'encoder\.layer\.1\.output\.dense\.bias'"):
    bert.load_bert(tmp_path)

  extra = dict(tensors, **{"encoder.layer.5.output.dense.bias": np.zeros(32, np.float32)})
  save_file(extra, str(file))
  with pytest.raises(ValueError, match=r"unexpected tensor 'encoder\.layer\.5\.output\.dense"):
    bert.load_bert(tmp_path)

  wrong = dict(tensors)
  wrong["encoder.layer.0.intermediate.dense.weight"] = np.zeros((32, 64), np.float32)
  save_file(wrong, str(file))
  with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.intermediate\.dense\.weight' has "
                     r"shape \(64, 32\), expected \(32, 64\)"):
    bert.load_bert(tmp_path)

  file.unlink()
  with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
    bert.load_bert(tmp_path)


def test_call_errors():
  model = bert.Bert(_tiny_cfg(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="exceeds max_position_embeddings=32"):
    model(jnp.zeros((1, 33), jnp.int32), jnp.ones((1, 33), jnp.int32))
  with pytest.raises(ValueError, match="attention_mask shape"):
    model(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5), jnp.int32))


def test_export_round_trips_through_transformers(tmp_path):
  """A trained BERT decoder written back as HF weights loads in transformers unchanged."""
  from langptune_jax.models import embedder
  from langptune_jax.train import commands
  _save_tiny(tmp_path / "src", seed=3)
  model, _ = bert.load_bert(tmp_path / "src")
  kernel = model.layers[0].attn.query.kernel
  kernel.set_value(kernel.get_value() + 0.1)  # as if trained
  tokens, mask, types = _batch(seed=3)
  types = np.zeros_like(types)
  ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
  # The tokenizer files are copied along; a word-level one is enough here.
  import tokenizers
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizers.Tokenizer(
          tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
      unk_token="[UNK]")
  tok.save_pretrained(str(tmp_path / "src"))
  commands._export_embedder(embedder.Embedder(model, family="bert", pooling="mean"),
                            tmp_path / "out", str(tmp_path / "src"))
  theirs = _torch_hidden(transformers.BertModel.from_pretrained(str(tmp_path / "out")).eval(),
                         tokens, mask, types)
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  assert (tmp_path / "out" / "tokenizer.json").exists()
  assert not (tmp_path / ".out.tmp").exists()
