"""Llama 2/3/3.1/3.2 (and SmolLM2): HF config -> DecoderConfig, and HF tensor names."""

from __future__ import annotations

from typing import Any

from langptune_jax.models import transformer
from langptune_jax.models.transformer import Decoder, DecoderConfig  # noqa: F401 (re-export)

MODEL_TYPES = ("llama",)


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict | None]:
  """(theta, scaling) from either the new ``rope_parameters`` or the old keys."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling")
  theta = params.pop("rope_theta", hf.get("rope_theta", 10_000.0))
  if scaling is None and params.get("rope_type", "default") != "default":
    scaling = params
  if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
    scaling = None
  return float(theta), (dict(scaling) if scaling else None)


def special_ids(hf: dict[str, Any]) -> dict[str, Any]:
  eos = hf.get("eos_token_id")
  eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
  return {"bos_id": hf.get("bos_token_id"), "eos_ids": eos, "pad_id": hf.get("pad_token_id")}


def config_from_hf(hf: dict[str, Any], **overrides) -> DecoderConfig:
  """DecoderConfig from a Llama ``config.json`` dict; `overrides` set dtype etc."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json model_type={model_type!r}: not a Llama model {MODEL_TYPES}")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise ValueError(f"config.json {key}=true: biased Llama variants are not supported")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"config.json hidden_act={act!r}: Llama needs 'silu'")
  theta, scaling = rope_from_hf(hf)
  heads = int(hf["num_attention_heads"])
  fields = dict(
      family="llama",
      vocab_size=int(hf["vocab_size"]),
      embed_dim=int(hf["hidden_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
      mlp_dim=int(hf["intermediate_size"]),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      act="silu",
      max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
      **special_ids(hf))
  fields.update(overrides)
  return DecoderConfig(**fields)


def hf_names(config: DecoderConfig) -> dict[str, tuple[str, bool]]:
  """Our parameter path -> (HF tensor name, transpose?)."""
  names = transformer.hf_linear_names(config)
  for i in range(config.num_layers):
    names[f"layers/{i}/pre_attn_norm/scale"] = (f"model.layers.{i}.input_layernorm.weight", False)
    names[f"layers/{i}/pre_ffw_norm/scale"] = (
        f"model.layers.{i}.post_attention_layernorm.weight", False)
  return names


def config_to_hf(config: DecoderConfig) -> dict[str, Any]:
  """A ``config.json`` dict that transformers' LlamaForCausalLM loads."""
  c = config
  hf = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": c.vocab_size, "hidden_size": c.embed_dim,
      "intermediate_size": c.mlp_dim, "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.norm_eps,
      "rope_theta": c.rope_theta,
      "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "mlp_bias": False,
      "max_position_embeddings": c.max_position_embeddings,
  }
  scaling = c.rope_scaling_dict
  hf["rope_parameters"] = {"rope_type": "default", "rope_theta": c.rope_theta, **(scaling or {})}
  if scaling:  # the pre-5.x key, for older readers
    hf["rope_scaling"] = scaling
  return hf
