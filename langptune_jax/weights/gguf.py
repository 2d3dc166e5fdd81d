"""Loads Llama and Gemma decoders from GGUF files (llama.cpp format).

Tensors are dequantized to float32 with the ``gguf`` package. Two llama.cpp
storage conventions are undone here: Llama Q/K projection rows are permuted
for interleaved RoPE (we use split-half RoPE), and Gemma norm weights are
stored as ``1 + w`` (we store ``w``, as HF does).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from langptune_jax import parallel
from langptune_jax.models.transformer import Decoder, DecoderConfig
from langptune_jax.weights.placement import build_module

# general.architecture -> our family.
ARCHITECTURES = {"llama": "llama", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3"}

# Per-block GGUF tensor name -> our path inside the block.
_BLOCK_NAMES = {
    "attn_q": "attn/q_proj/kernel", "attn_k": "attn/k_proj/kernel",
    "attn_v": "attn/v_proj/kernel", "attn_output": "attn/o_proj/kernel",
    "ffn_gate": "mlp/gate_proj/kernel", "ffn_up": "mlp/up_proj/kernel",
    "ffn_down": "mlp/down_proj/kernel",
    "attn_norm": "pre_attn_norm/scale", "ffn_norm": "pre_ffw_norm/scale",
    "post_attention_norm": "post_attn_norm/scale", "post_ffw_norm": "post_ffw_norm/scale",
    "attn_q_norm": "attn/q_norm/scale", "attn_k_norm": "attn/k_norm/scale",
}


def _reader(path: Path):
  import gguf  # imported lazily: only GGUF users need the package
  if not path.is_file():
    raise ValueError(f"{path}: GGUF file not found")
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # corrupt or not a GGUF file
    raise ValueError(f"{path}: cannot read as GGUF ({e})") from None


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """All GGUF key/values except the (large) tokenizer vocab arrays."""
  reader = _reader(Path(path))
  skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
          "tokenizer.ggml.merges")
  return {k: f.contents() for k, f in reader.fields.items() if k not in skip}


def _dequantize(tensor) -> np.ndarray:
  import gguf
  data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  # GGUF lists dimensions fastest-first; numpy wants them slowest-first.
  return np.asarray(data, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def config_from_gguf(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                     *, source: str, **overrides) -> DecoderConfig:
  """DecoderConfig from GGUF metadata (``<arch>.*`` keys) and tensor shapes."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"{source}: unsupported general.architecture={arch!r}; supported: "
                     f"{tuple(ARCHITECTURES)}")
  family = ARCHITECTURES[arch]

  def get(key, default=None, required=False):
    value = meta.get(f"{arch}.{key}", default)
    if required and value is None:
      raise ValueError(f"{source}: missing metadata {arch}.{key}")
    return value

  if "rope_freqs.weight" in tensor_shapes:
    raise ValueError(f"{source}: rope_freqs.weight (Llama 3.1-style RoPE factors in GGUF) is not "
                     "supported; load the HF safetensors directory instead")
  embed_dim = int(get("embedding_length", required=True))
  num_layers = int(get("block_count", required=True))
  heads = int(get("attention.head_count", required=True))
  kv_heads = get("attention.head_count_kv", heads)
  if isinstance(kv_heads, (list, tuple)):
    kv_heads = kv_heads[0]
  head_dim = int(get("attention.key_length") or embed_dim // heads)
  vocab = int(tensor_shapes["token_embd.weight"][0])
  scaling = None
  if get("rope.scaling.type") not in (None, "none"):
    scaling = {"rope_type": str(get("rope.scaling.type")),
               "factor": float(get("rope.scaling.factor", 1.0))}
  eos = meta.get("tokenizer.ggml.eos_token_id")
  fields = dict(
      family=family, vocab_size=vocab, embed_dim=embed_dim, num_layers=num_layers,
      num_heads=heads, num_kv_heads=int(kv_heads), head_dim=head_dim,
      mlp_dim=int(get("feed_forward_length", required=True)),
      norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
      rope_scaling=scaling,
      tie_embeddings="output.weight" not in tensor_shapes,
      max_position_embeddings=int(get("context_length", 8192)),
      bos_id=meta.get("tokenizer.ggml.bos_token_id"),
      eos_ids=() if eos is None else (int(eos),),
      pad_id=meta.get("tokenizer.ggml.padding_token_id"))
  if family == "llama":
    fields.update(rope_theta=float(get("rope.freq_base", 10_000.0)), act="silu")
  else:
    fields.update(act="gelu_tanh", norm_one_plus=True, embed_scale=True,
                  rope_theta=float(get("rope.freq_base", 10_000.0 if family != "gemma3"
                                       else 1_000_000.0)))
  if family == "gemma2":
    fields.update(post_norms=True, sliding_window=int(get("attention.sliding_window", 4096)),
                  layer_types=tuple("local" if i % 2 == 0 else "global"
                                    for i in range(num_layers)),
                  attn_logit_softcap=get("attn_logit_softcapping"),
                  final_logit_softcap=get("final_logit_softcapping"),
                  query_pre_attn_scalar=float(head_dim))
  if family == "gemma3":
    # llama.cpp fixes the 5:1 pattern; only the 27B model scales queries by
    # embed/heads instead of head_dim.
    qpas = embed_dim // heads if num_layers == 62 else head_dim
    fields.update(post_norms=True, qk_norm=True, rope_local_theta=10_000.0,
                  sliding_window=int(get("attention.sliding_window", 4096)),
                  layer_types=tuple("local" if (i + 1) % 6 else "global"
                                    for i in range(num_layers)),
                  query_pre_attn_scalar=float(qpas))
  fields.update(overrides)
  return DecoderConfig(**fields)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's Q/K row permutation; w is [out, in] (torch layout)."""
  out, rest = w.shape[0], w.shape[1:]
  return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _our_name(name: str) -> str | None:
  if name == "token_embd.weight":
    return "embedder/embedding"
  if name == "output.weight":
    return "lm_head/kernel"
  if name == "output_norm.weight":
    return "final_norm/scale"
  parts = name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _BLOCK_NAMES:
    return f"layers/{parts[1]}/{_BLOCK_NAMES[parts[2]]}"
  return None


def _tensors(reader, config: DecoderConfig, source: str) -> Iterator[tuple[str, np.ndarray]]:
  from tqdm import tqdm
  for tensor in tqdm(reader.tensors, desc=f"gguf {Path(source).name}", leave=False):
    ours = _our_name(tensor.name)
    if ours is None:
      raise ValueError(f"{source}: unexpected tensor {tensor.name} for a {config.family} decoder")
    w = _dequantize(tensor)
    if config.family == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
      heads = config.num_heads if "attn_q" in tensor.name else config.num_kv_heads
      w = _unpermute(w, heads)
    if config.norm_one_plus and ours.endswith("norm/scale"):
      w = w - 1.0  # llama.cpp folds Gemma's "1 +" into the stored weight
    if ours.endswith("/kernel"):
      w = w.T  # [out, in] -> [in, out]
    yield ours, w


def load_decoder_gguf(path: str | os.PathLike, *, dtype="float32", param_dtype="float32",
                      mesh: Mesh | None = None,
                      rules: Sequence[tuple[str, Any]] = parallel.DEFAULT_RULES,
                      **overrides) -> tuple[Decoder, DecoderConfig]:
  """Builds a Decoder from a .gguf file (dequantized to `param_dtype`)."""
  path = Path(path).expanduser()
  reader = _reader(path)
  skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
          "tokenizer.ggml.merges")
  meta = {k: f.contents() for k, f in reader.fields.items() if k not in skip}
  shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
  config = config_from_gguf(meta, shapes, source=str(path), dtype=dtype, param_dtype=param_dtype,
                            **overrides)
  model = build_module(lambda: Decoder(config, rngs=nnx.Rngs(0)),
                                  _tensors(reader, config, str(path)), source=str(path),
                                  param_dtype=jnp.dtype(param_dtype), mesh=mesh, rules=rules)
  return model, config
