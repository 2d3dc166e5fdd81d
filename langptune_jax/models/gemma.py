"""Gemma 1/2/3 (text): HF config -> DecoderConfig, and HF tensor names."""

from __future__ import annotations

from typing import Any

from langptune_jax.models import llama, transformer
from langptune_jax.models.transformer import Decoder, DecoderConfig  # noqa: F401 (re-export)

# HF model_type -> our family.
MODEL_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}


def _layer_types(hf: dict[str, Any], family: str, num_layers: int) -> tuple[str, ...] | None:
  if family == "gemma":
    return None
  if hf.get("layer_types"):
    mapping = {"sliding_attention": "local", "full_attention": "global"}
    try:
      return tuple(mapping[t] for t in hf["layer_types"])
    except KeyError as e:
      raise ValueError(f"config.json layer_types: unknown entry {e.args[0]!r}") from None
  if family == "gemma2":  # even layers slide
    return tuple("local" if i % 2 == 0 else "global" for i in range(num_layers))
  pattern = int(hf.get("sliding_window_pattern", 6))
  return tuple("local" if (i + 1) % pattern else "global" for i in range(num_layers))


def _gemma3_rope(hf: dict[str, Any]) -> tuple[float, float, dict | None]:
  params = hf.get("rope_parameters") or {}
  full = dict(params.get("full_attention") or {})
  local = dict(params.get("sliding_attention") or {})
  theta = float(full.pop("rope_theta", hf.get("rope_theta", 1_000_000.0)))
  local_theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)))
  scaling = hf.get("rope_scaling") or (full if full.get("rope_type", "default") != "default"
                                       else None)
  return theta, local_theta, (dict(scaling) if scaling else None)


def config_from_hf(hf: dict[str, Any], **overrides) -> DecoderConfig:
  """DecoderConfig from a Gemma 1/2/3 ``config.json`` dict (gemma3: the text config)."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json model_type={model_type!r}: not a Gemma text model "
                     f"{tuple(MODEL_TYPES)}")
  family = MODEL_TYPES[model_type]
  act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
  if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
    raise ValueError(f"config.json hidden_activation={act!r}: Gemma needs 'gelu_pytorch_tanh'")
  if hf.get("attention_bias"):
    raise ValueError("config.json attention_bias=true: not supported for Gemma")
  num_layers = int(hf["num_hidden_layers"])
  heads = int(hf["num_attention_heads"])
  if family == "gemma3":
    theta, local_theta, scaling = _gemma3_rope(hf)
  else:
    (theta, scaling), local_theta = llama.rope_from_hf(hf), None
  layer_types = _layer_types(hf, family, num_layers)
  has_local = layer_types is not None and "local" in layer_types
  fields = dict(
      family=family,
      vocab_size=int(hf["vocab_size"]),
      embed_dim=int(hf["hidden_size"]),
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
      mlp_dim=int(hf["intermediate_size"]),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_local_theta=local_theta,
      rope_scaling=scaling,
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
      act="gelu_tanh",
      norm_one_plus=True,
      embed_scale=True,
      post_norms=family in ("gemma2", "gemma3"),
      attn_logit_softcap=hf.get("attn_logit_softcapping") if family != "gemma" else None,
      final_logit_softcap=hf.get("final_logit_softcapping") if family != "gemma" else None,
      sliding_window=int(hf["sliding_window"]) if has_local else None,
      layer_types=layer_types,
      query_pre_attn_scalar=(float(hf.get("query_pre_attn_scalar") or 256)
                             if family != "gemma" else None),
      qk_norm=family == "gemma3",
      max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
      **llama.special_ids(hf))
  fields.update(overrides)
  return DecoderConfig(**fields)


def hf_names(config: DecoderConfig) -> dict[str, tuple[str, bool]]:
  """Our parameter path -> (HF tensor name, transpose?)."""
  names = transformer.hf_linear_names(config)
  for i in range(config.num_layers):
    ours, hf = f"layers/{i}", f"model.layers.{i}"
    names[f"{ours}/pre_attn_norm/scale"] = (f"{hf}.input_layernorm.weight", False)
    if config.post_norms:
      names[f"{ours}/post_attn_norm/scale"] = (f"{hf}.post_attention_layernorm.weight", False)
      names[f"{ours}/pre_ffw_norm/scale"] = (f"{hf}.pre_feedforward_layernorm.weight", False)
      names[f"{ours}/post_ffw_norm/scale"] = (f"{hf}.post_feedforward_layernorm.weight", False)
    else:
      names[f"{ours}/pre_ffw_norm/scale"] = (f"{hf}.post_attention_layernorm.weight", False)
    if config.qk_norm:
      names[f"{ours}/attn/q_norm/scale"] = (f"{hf}.self_attn.q_norm.weight", False)
      names[f"{ours}/attn/k_norm/scale"] = (f"{hf}.self_attn.k_norm.weight", False)
  return names


def config_to_hf(config: DecoderConfig) -> dict[str, Any]:
  """A ``config.json`` dict that transformers' Gemma*ForCausalLM loads."""
  c = config
  arch = {"gemma": ("GemmaForCausalLM", "gemma"), "gemma2": ("Gemma2ForCausalLM", "gemma2"),
          "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}[c.family]
  hf = {
      "architectures": [arch[0]], "model_type": arch[1],
      "vocab_size": c.vocab_size, "hidden_size": c.embed_dim,
      "intermediate_size": c.mlp_dim, "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim, "hidden_activation": "gelu_pytorch_tanh",
      "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
      "max_position_embeddings": c.max_position_embeddings, "attention_bias": False,
  }
  if c.family == "gemma":
    hf["rope_theta"] = c.rope_theta
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": c.rope_theta}
    return hf
  hf.update({
      # transformers validates this field as an int.
      "query_pre_attn_scalar": (int(c.query_pre_attn_scalar)
                                if float(c.query_pre_attn_scalar).is_integer()
                                else c.query_pre_attn_scalar),
      "attn_logit_softcapping": c.attn_logit_softcap,
      "final_logit_softcapping": c.final_logit_softcap,
      "sliding_window": c.sliding_window or 4096,
      "layer_types": ["sliding_attention" if t == "local" else "full_attention"
                      for t in c.layer_types],
  })
  if c.family == "gemma2":
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": c.rope_theta}
  else:
    full = {"rope_type": "default", "rope_theta": c.rope_theta}
    full.update(c.rope_scaling_dict or {})
    hf["rope_parameters"] = {
        "full_attention": full,
        "sliding_attention": {"rope_type": "default",
                              "rope_theta": c.rope_local_theta or 10_000.0}}
  return hf
