"""Model dimensions of known checkpoints, for planning without weights.

The memory planner (and FLOPs accounting) need a model's shape, not its
weights. A model is found by preset name (``config.encoder.preset``), by the
``config.json`` in a local checkpoint directory, or by a preset name appearing
in the checkpoint path.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from langptune_jax.models import bert, gemma, llama
from langptune_jax.models.transformer import DecoderConfig

_GEMMA3_270M_LAYERS = tuple("global" if (i + 1) % 6 == 0 else "local" for i in range(18))

DECODERS: dict[str, DecoderConfig] = {
    "gemma-2b-it": DecoderConfig(
        family="gemma", vocab_size=256_000, embed_dim=2048, num_layers=18, num_heads=8,
        num_kv_heads=1, head_dim=256, mlp_dim=16_384, act="gelu_tanh", norm_one_plus=True,
        embed_scale=True, tie_embeddings=True, bos_id=2, eos_ids=(1, 107), pad_id=0),
    "llama-3-8b-instruct": DecoderConfig(
        family="llama", vocab_size=128_256, embed_dim=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, mlp_dim=14_336, norm_eps=1e-5, rope_theta=500_000.0,
        tie_embeddings=False, bos_id=128_000, eos_ids=(128_001, 128_009)),
    "gemma-3-270m": DecoderConfig(
        family="gemma3", vocab_size=262_144, embed_dim=640, num_layers=18, num_heads=4,
        num_kv_heads=1, head_dim=256, mlp_dim=2048, act="gelu_tanh", norm_one_plus=True,
        embed_scale=True, post_norms=True, qk_norm=True, query_pre_attn_scalar=256,
        sliding_window=512, layer_types=_GEMMA3_270M_LAYERS, rope_theta=1_000_000.0,
        rope_local_theta=10_000.0, tie_embeddings=True),
    "smollm2-135m-instruct": DecoderConfig(
        family="llama", vocab_size=49_152, embed_dim=576, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, mlp_dim=1536, norm_eps=1e-5, rope_theta=100_000.0,
        tie_embeddings=True),
    # Small random models for tests and CPU smoke runs.
    "tiny-llama": DecoderConfig(
        family="llama", vocab_size=512, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, mlp_dim=128, tie_embeddings=True, eos_ids=(2,), pad_id=0),
}

ENCODERS: dict[str, bert.BertConfig] = {
    "mxbai-embed-large-v1": bert.BertConfig(
        vocab_size=30_522, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
    "all-minilm-l6-v2": bert.BertConfig(
        vocab_size=30_522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536),
    "tiny-bert": bert.BertConfig(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
        max_position_embeddings=128),
}

# Short names accepted for convenience.
ALIASES = {"gemma-2b": "gemma-2b-it", "llama-3-8b": "llama-3-8b-instruct",
           "llama3-8b": "llama-3-8b-instruct", "smollm2": "smollm2-135m-instruct",
           "gemma3-270m": "gemma-3-270m", "mxbai": "mxbai-embed-large-v1",
           "minilm": "all-minilm-l6-v2", "tiny": "tiny-llama"}


def _canonical(name: str) -> str:
  key = name.strip().lower().replace("_", "-")
  return ALIASES.get(key, key)


def is_known(name: str, table: dict) -> bool:
  """Whether `name` (or its alias) is a preset of `table` (DECODERS or ENCODERS)."""
  return _canonical(name) in table


def _from_path(path: str, table: dict) -> str | None:
  """The preset whose name appears in the path (e.g. ``.../gemma-2b-it/``)."""
  text = str(path).lower().replace("_", "-")
  for name in sorted(table, key=len, reverse=True):
    if name in text:
      return name
  return None


def _hf_config(path: str) -> dict | None:
  if not path:
    return None
  file = pathlib.Path(path).expanduser() / "config.json"
  if not file.is_file():
    return None
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: not valid JSON ({e})") from None


def _replace(cfg: DecoderConfig, overrides: dict) -> DecoderConfig:
  if "num_layers" in overrides and "layer_types" not in overrides:
    # Keep the local/global pattern when the depth changes (smaller test models).
    pattern = cfg.layer_types
    overrides = dict(overrides, layer_types=tuple(
        pattern[i % len(pattern)] for i in range(int(overrides["num_layers"]))))
  return cfg.replace(**overrides)


def decoder_config(preset: str = "", path: str = "", *, section: str = "encoder",
                   **overrides) -> DecoderConfig:
  """A decoder LLM's config from a preset name, a checkpoint's config.json or its path."""
  if preset:
    key = _canonical(preset)
    if key not in DECODERS:
      raise ValueError(f"{section}.preset={preset!r}: unknown; known: {', '.join(DECODERS)}")
    return _replace(DECODERS[key], overrides)
  hf = _hf_config(path)
  if hf is not None:
    return decoder_config_from_hf(hf, source=f"{path}/config.json", **overrides)
  key = _from_path(path, DECODERS) if path else None
  if key is None:
    raise ValueError(f"{section}.preset is empty and {section}.path={path!r} has no config.json "
                     f"nor a known model name: set --config.{section}.preset to one of "
                     f"{', '.join(DECODERS)}")
  return _replace(DECODERS[key], overrides)


def bert_config(preset: str = "", path: str = "", *, section: str = "decoder",
                **overrides) -> bert.BertConfig:
  """A BERT embedder's config from a preset name, a checkpoint's config.json or its path."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  if preset:
    key = _canonical(preset)
    if key not in ENCODERS:
      raise ValueError(f"{section}.preset={preset!r}: unknown; known: {', '.join(ENCODERS)}")
    return dataclasses.replace(ENCODERS[key], **overrides)
  hf = _hf_config(path)
  if hf is not None:
    return bert.config_from_hf(hf, **overrides)
  key = _from_path(path, ENCODERS) if path else None
  if key is None:
    raise ValueError(f"{section}.preset is empty and {section}.path={path!r} has no config.json "
                     f"nor a known model name: set --config.{section}.preset to one of "
                     f"{', '.join(ENCODERS)}")
  return dataclasses.replace(ENCODERS[key], **overrides)


def decoder_config_from_hf(hf: dict[str, Any], *, source: str = "config.json",
                           **overrides) -> DecoderConfig:
  """DecoderConfig for any supported family, by ``model_type``."""
  model_type = hf.get("model_type")
  if model_type in llama.MODEL_TYPES:
    return llama.config_from_hf(hf, **overrides)
  if model_type in gemma.MODEL_TYPES:
    return gemma.config_from_hf(hf, **overrides)
  raise ValueError(f"{source}: unsupported model_type={model_type!r} "
                   f"(architectures={hf.get('architectures')}); supported: "
                   f"{tuple(llama.MODEL_TYPES) + tuple(gemma.MODEL_TYPES)}")
