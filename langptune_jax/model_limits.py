"""Lengths checked against the models' own configs before a run does any work.

A `data.decoder_max_len` beyond the embedder's position table, or a prompt plus
response beyond the encoder's positions or KV cache, would otherwise fail only
when a model first sees such a batch (after the dataset is built and the
zero-shot evaluation ran: hours at paper scale). Only the model config files are
read here (config.json, or the GGUF metadata), not the weights.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from langptune_jax import settings as settings_lib
from langptune_jax.config import ConfigError


def max_positions(path: str | os.PathLike) -> int | None:
  """The position limit recorded in a model's config, or None when it records none."""
  path = pathlib.Path(path).expanduser()
  if path.suffix == ".gguf" and path.is_file():
    from langptune_jax.weights import gguf as gguf_lib
    meta = gguf_lib.read_metadata(path)
    value = meta.get(f"{meta.get('general.architecture', '')}.context_length")
  elif (path / "config.json").is_file():
    try:
      hf = json.loads((path / "config.json").read_text())
    except ValueError as e:
      raise ValueError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    value = hf.get("max_position_embeddings",
                   (hf.get("text_config") or {}).get("max_position_embeddings"))
  else:
    return None  # missing models are reported by whoever loads them
  return int(value) if isinstance(value, (int, float)) and value > 0 else None


def problems(config: settings_lib.Settings | Any) -> list[str]:
  """One `field=value: rule` line per length the models cannot hold."""
  s = settings_lib.of(config)
  out = []
  decoder_len = s.data.decoder_max_len
  limit = max_positions(s.decoder.path) if s.decoder.path else None
  if limit is not None and decoder_len > limit:
    out.append(f"data.decoder_max_len={decoder_len}: must be <= {limit}, the "
               f"max_position_embeddings of decoder.path={s.decoder.path!r}")
  prompt, response = s.data.prompt_max_len, s.rl.response_length
  limit = max_positions(s.encoder.path) if s.encoder.path else None
  if limit is not None and prompt + response > limit:
    out.append(f"data.prompt_max_len={prompt}: prompt + rl.response_length = {prompt} + "
               f"{response} = {prompt + response} must be <= {limit}, the position limit of "
               f"encoder.path={s.encoder.path!r}")
  return out


def check(config: settings_lib.Settings | Any) -> None:
  """Raises ConfigError (one line per problem) when a length does not fit the models."""
  found = problems(config)
  if found:
    raise ConfigError(found)
