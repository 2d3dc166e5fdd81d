"""Weight I/O: HF directory reading, error messages, export round-trip with LoRA."""

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from langptune_jax.models import lora
from langptune_jax.models import transformer as tr
from langptune_jax.weights import export
from langptune_jax.weights import hf as hf_weights

VOCAB = 96


def _save(model, path):
  model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
      initializer_range=0.2)
  return _save(transformers.LlamaForCausalLM(config), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
  torch.manual_seed(1)
  config = transformers.Gemma2Config(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
      initializer_range=0.2)
  return _save(transformers.Gemma2ForCausalLM(config), tmp_path_factory.mktemp("gemma2"))


def _tokens(length=12):
  return np.random.RandomState(0).randint(0, VOCAB, (2, length)).astype(np.int32)


def _ours(model, tokens):
  valid = jnp.ones(tokens.shape, bool)
  return np.asarray(model(jnp.asarray(tokens), tr.positions_from_mask(valid),
                          tr.causal_mask(valid))[0])


def _theirs(path, tokens):
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def test_read_helpers(llama_dir):
  config = hf_weights.read_config(llama_dir)
  assert config["model_type"] == "llama"
  state = hf_weights.load_state(llama_dir)
  assert state["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)
  assert state["lm_head.weight"].shape == (VOCAB, 32)
  names = [n for n, _ in hf_weights.iter_tensors(llama_dir)]
  assert sorted(names) == sorted(state)


def test_sharded_index_and_bf16(llama_dir, tmp_path):
  """A two-shard bfloat16 checkpoint with an index loads to the same weights."""
  state = hf_weights.load_state(llama_dir)
  names = sorted(state)
  half = len(names) // 2
  shards = {"model-00001-of-00002.safetensors": names[:half],
            "model-00002-of-00002.safetensors": names[half:]}
  weight_map = {}
  for file, part in shards.items():
    export.write_safetensors(tmp_path / file,
                             {n: state[n].astype(ml_dtypes.bfloat16) for n in part})
    weight_map.update({n: file for n in part})
  (tmp_path / hf_weights.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
  shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
  model, config = hf_weights.load_decoder(tmp_path, param_dtype="bfloat16")
  assert config.weight_dtype == jnp.bfloat16
  kernel = model.layers[1].mlp.down_proj.kernel[...]
  assert kernel.dtype == jnp.bfloat16
  expected = state["model.layers.1.mlp.down_proj.weight"].T.astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(np.asarray(kernel), expected)


def test_missing_config(tmp_path):
  with pytest.raises(ValueError, match="missing config.json"):
    hf_weights.load_decoder(tmp_path)


def test_missing_directory(tmp_path):
  with pytest.raises(ValueError, match="not a directory"):
    hf_weights.load_decoder(tmp_path / "nope")


def test_missing_weights(llama_dir, tmp_path):
  shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
  with pytest.raises(ValueError, match="no model.safetensors"):
    hf_weights.load_decoder(tmp_path)


def test_unsupported_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
  with pytest.raises(ValueError, match=r"unsupported model_type='gpt2'.*GPT2LMHeadModel"):
    hf_weights.load_decoder(tmp_path)


def test_shape_mismatch(llama_dir, tmp_path):
  shutil.copy(llama_dir / "model.safetensors", tmp_path / "model.safetensors")
  config = json.loads((llama_dir / "config.json").read_text())
  config["intermediate_size"] = 48
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"layers/0/mlp/\w+_proj/kernel has shape"):
    hf_weights.load_decoder(tmp_path)


def test_missing_tensor(llama_dir, tmp_path):
  state = hf_weights.load_state(llama_dir)
  del state["model.layers.1.mlp.up_proj.weight"]
  export.write_safetensors(tmp_path / "model.safetensors", state)
  shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
  with pytest.raises(ValueError, match="no tensor for parameter layers/1/mlp/up_proj/kernel"):
    hf_weights.load_decoder(tmp_path)


def test_missing_gguf(tmp_path):
  with pytest.raises(ValueError, match="GGUF file not found"):
    hf_weights.load_decoder(tmp_path / "model.gguf")


@pytest.mark.parametrize("fixture", ["llama_dir", "gemma2_dir"])
def test_export_round_trip_with_lora(request, tmp_path, fixture):
  source = request.getfixturevalue(fixture)
  model, config = hf_weights.load_decoder(source)
  tokens = _tokens()
  base = _ours(model, tokens)
  rngs = nnx.Rngs(7)
  for block in model.layers:
    for lin in (block.attn.q_proj, block.attn.v_proj, block.mlp.down_proj):
      lin.add_lora(rank=2, alpha=4.0, rngs=rngs)
      b = lin.lora.lora_b
      b.set_value(0.3 * jnp.asarray(np.random.RandomState(1).randn(*b.get_value().shape),
                                    jnp.float32))
  if config.tie_embeddings:  # a LoRA on the tied head is exported as an untied lm_head
    lora.apply_lora(model, targets=("lm_head",), rank=2, alpha=4.0, rngs=rngs)
    b = model.head_lora.lora_b
    b.set_value(0.3 * jnp.asarray(np.random.RandomState(2).randn(*b.get_value().shape),
                                  jnp.float32))
  adapted = _ours(model, tokens)
  assert np.abs(adapted - base).max() > 1e-2  # the adapters matter
  out = export.export_decoder(model, tmp_path / "exported", tokenizer_dir=None)
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                   "model.safetensors"]
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
  np.testing.assert_allclose(_theirs(out, tokens), adapted, atol=1e-4, rtol=0)
  # And our loader reads our export back to the same logits.
  again, config2 = hf_weights.load_decoder(out)
  assert config2.layer_types == config.layer_types
  np.testing.assert_allclose(_ours(again, tokens), adapted, atol=1e-5, rtol=0)
  # Exporting over an existing directory replaces it.
  export.export_decoder(again, out)
  np.testing.assert_allclose(_ours(hf_weights.load_decoder(out)[0], tokens), adapted, atol=1e-5)


# --- GGUF: a tiny file written the way llama.cpp's converter writes it --------

_GGUF_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm"}


def _llama_cpp_permute(w, n_heads):
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _write_gguf(hf_dir, path, arch):
  import gguf
  hf = hf_weights.read_config(hf_dir)
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(hf["num_hidden_layers"])
  writer.add_context_length(256)
  writer.add_embedding_length(hf["hidden_size"])
  writer.add_feed_forward_length(hf["intermediate_size"])
  writer.add_head_count(hf["num_attention_heads"])
  writer.add_head_count_kv(hf["num_key_value_heads"])
  writer.add_key_length(hf["head_dim"])
  writer.add_value_length(hf["head_dim"])
  writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
  theta = hf["rope_parameters"]
  theta = theta["full_attention"]["rope_theta"] if arch == "gemma3" else theta["rope_theta"]
  writer.add_rope_freq_base(theta)
  if arch == "gemma3":
    writer.add_sliding_window(hf["sliding_window"])
  writer.add_eos_token_id(hf["eos_token_id"])
  gemma_post = {"post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
  for name, w in hf_weights.load_state(hf_dir).items():
    w = np.asarray(w, np.float32)
    if name == "model.embed_tokens.weight":
      new = "token_embd.weight"
    elif name == "model.norm.weight":
      new = "output_norm.weight"
    elif name == "lm_head.weight":
      new = "output.weight"
    else:
      _, _, i, rest = name.split(".", 3)
      rest = rest.removesuffix(".weight")
      extra = gemma_post if arch == "gemma3" else {"post_attention_layernorm": "ffn_norm"}
      new = f"blk.{i}.{_GGUF_BLOCK.get(rest) or extra[rest]}.weight"
      if arch == "llama" and rest == "self_attn.q_proj":
        w = _llama_cpp_permute(w, hf["num_attention_heads"])
      if arch == "llama" and rest == "self_attn.k_proj":
        w = _llama_cpp_permute(w, hf["num_key_value_heads"])
    if arch == "gemma3" and new.endswith("norm.weight"):
      w = w + 1.0  # llama.cpp stores Gemma norms as 1 + w
    writer.add_tensor(new, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
  torch.manual_seed(2)
  config = transformers.Gemma3TextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
      query_pre_attn_scalar=8, initializer_range=0.2)
  model = transformers.Gemma3ForCausalLM(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  return _save(model, tmp_path_factory.mktemp("gemma3"))


@pytest.mark.parametrize("fixture,arch", [("llama_dir", "llama"), ("gemma3_dir", "gemma3")])
def test_gguf_matches_hf_directory(request, tmp_path, fixture, arch):
  """Q/K un-permutation (llama) and the 1 + w norm storage (gemma) are undone."""
  hf_dir = request.getfixturevalue(fixture)
  path = _write_gguf(hf_dir, tmp_path / "tiny.gguf", arch)
  from_gguf, gcfg = hf_weights.load_decoder(path)
  from_dir, dcfg = hf_weights.load_decoder(hf_dir)
  assert gcfg.tie_embeddings == dcfg.tie_embeddings
  assert gcfg.layer_types == dcfg.layer_types and gcfg.sliding_window == dcfg.sliding_window
  tokens = _tokens()
  np.testing.assert_allclose(_ours(from_gguf, tokens), _ours(from_dir, tokens), atol=1e-5, rtol=0)


def test_gguf_unsupported_architecture(tmp_path):
  import gguf
  writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
  writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match="unsupported general.architecture='gpt2'"):
    hf_weights.load_decoder(tmp_path / "x.gguf")
