"""Reads local Hugging Face model directories (config.json + safetensors).

Generic helpers (:func:`read_config`, :func:`iter_tensors`, :func:`load_state`,
:func:`~langptune_jax.weights.placement.build_module`) serve every model family; :func:`load_decoder` builds a
Llama/Gemma :class:`~langptune_jax.models.transformer.Decoder`. Tensors are
read one at a time from memory-mapped safetensors files (bfloat16 included)
and, given a mesh, put straight into their final sharding, so no full copy of
the model ever sits on one host device.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from langptune_jax import parallel
from langptune_jax.models import gemma, llama
from langptune_jax.models.presets import decoder_config_from_hf  # noqa: F401  (public here too)
from langptune_jax.models.transformer import Decoder, DecoderConfig
from langptune_jax.weights.placement import build_module

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def _require_dir(path: str | os.PathLike) -> Path:
  path = Path(path).expanduser()
  if not path.is_dir():
    raise ValueError(f"{path}: not a directory (expected a Hugging Face model directory)")
  return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  """``config.json`` of a model directory as a dict."""
  file = _require_dir(path) / CONFIG_FILE
  if not file.is_file():
    raise ValueError(f"{file}: missing config.json")
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: invalid JSON ({e})") from None


def read_generation_config(path: str | os.PathLike) -> dict[str, Any]:
  """``generation_config.json`` as a dict ({} when absent)."""
  file = _require_dir(path) / "generation_config.json"
  return json.loads(file.read_text()) if file.is_file() else {}


def tensor_files(path: str | os.PathLike) -> list[Path]:
  """The safetensors files of a directory: one file, or the shards of an index."""
  path = _require_dir(path)
  if (path / INDEX_FILE).is_file():
    index = json.loads((path / INDEX_FILE).read_text())
    names = sorted(set(index.get("weight_map", {}).values()))
    files = [path / n for n in names]
    for f in files:
      if not f.is_file():
        raise ValueError(f"{f}: shard listed in {INDEX_FILE} is missing")
    return files
  if (path / SINGLE_FILE).is_file():
    return [path / SINGLE_FILE]
  raise ValueError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def _read_safetensors(file: Path) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, array) lazily from one safetensors file via a memory map."""
  with open(file, "rb") as f:
    header_len = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(header_len))
  data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_len)
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
      raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    yield name, data[start:end].view(dtype).reshape(info["shape"])


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
  """Streams every (HF name, host array) of a model directory."""
  for file in tensor_files(path):
    yield from _read_safetensors(file)


def load_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a directory in one dict (small models and tests)."""
  return dict(iter_tensors(path))


# --- decoders ----------------------------------------------------------------

# Tensors HF checkpoints may carry that are not parameters of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_names(config: DecoderConfig) -> dict[str, tuple[str, bool]]:
  """Our path -> (HF tensor name, transpose?) for a decoder config."""
  return (llama.hf_names if config.family == "llama" else gemma.hf_names)(config)


def _decoder_tensors(path: Path, config: DecoderConfig) -> Iterator[tuple[str, np.ndarray]]:
  by_hf = {hf: (ours, t) for ours, (hf, t) in hf_names(config).items()}
  for name, array in iter_tensors(path):
    if name.endswith(_IGNORED_SUFFIXES):
      continue
    if name == "lm_head.weight" and config.tie_embeddings:
      continue  # some tied checkpoints also store the (identical) head
    if name not in by_hf:
      raise ValueError(f"{path}: unexpected tensor {name} for a {config.family} decoder")
    ours, transpose = by_hf[name]
    yield ours, (array.T if transpose else array)


def load_decoder(path: str | os.PathLike, *, dtype="float32", param_dtype="float32",
                 mesh: Mesh | None = None,
                 rules: Sequence[tuple[str, Any]] = parallel.DEFAULT_RULES,
                 **overrides) -> tuple[Decoder, DecoderConfig]:
  """Loads a decoder from an HF directory or a ``.gguf`` file.

  Args:
    path: HF model directory (config.json + safetensors) or a .gguf file.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
    mesh: when given, parameters are placed straight into their shardings.
    **overrides: extra DecoderConfig fields (e.g. remat='full').
  """
  path = Path(path).expanduser()
  if path.suffix == ".gguf":
    from langptune_jax.weights import gguf as gguf_lib  # the gguf package is optional here
    return gguf_lib.load_decoder_gguf(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                      rules=rules, **overrides)
  hf = read_config(path)
  if hf.get("model_type") == "gemma3" and "text_config" in hf:
    raise ValueError(f"{path / CONFIG_FILE}: multimodal Gemma3ForConditionalGeneration; "
                     "save the text model (Gemma3ForCausalLM) instead")
  config = decoder_config_from_hf(hf, source=str(path / CONFIG_FILE), dtype=dtype,
                                  param_dtype=param_dtype, **overrides)
  gen = read_generation_config(path)
  if gen.get("eos_token_id") is not None:
    eos = gen["eos_token_id"]
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    config = config.replace(eos_ids=tuple(dict.fromkeys(config.eos_ids + eos)))
  model = build_module(lambda: Decoder(config, rngs=nnx.Rngs(0)), _decoder_tensors(path, config),
                       source=str(path), param_dtype=jnp.dtype(param_dtype), mesh=mesh,
                       rules=rules)
  return model, config
