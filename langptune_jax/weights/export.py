"""Exports a Decoder to a Hugging Face directory (config.json + model.safetensors).

LoRA adapters are merged into their kernels (``W + A @ B * alpha / rank``), so
the result is a plain model that ``transformers.AutoModelForCausalLM`` (and
other HF-format readers) load directly. The directory is written next to its
destination first and moved into place at the end, so a crash never leaves a
half-written model behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from flax import nnx

from langptune_jax import distributed, fs
from langptune_jax.models import gemma, layers, llama
from langptune_jax.models.transformer import Decoder, DecoderConfig
from langptune_jax.weights import hf as hf_weights

_NP_TO_ST = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
             np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int32): "I32",
             np.dtype(np.int64): "I64"}
# Files copied from a source directory when given (tokenizer and chat template).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                    "chat_template.json", "added_tokens.json")


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes a safetensors file (bfloat16 included) from host arrays."""
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  arrays = []
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if array.dtype not in _NP_TO_ST:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {array.dtype}")
    header[name] = {"dtype": _NP_TO_ST[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays.append(array)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for array in arrays:
      f.write(array.tobytes())


def merged_params(model: nnx.Module) -> dict[str, np.ndarray]:
  """Our path -> host array of every base parameter, LoRA deltas merged in."""
  out: dict[str, np.ndarray] = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if isinstance(var, nnx.LoRAParam):
      continue
    out["/".join(map(str, path))] = distributed.to_host(var.get_value())
  for path, node in nnx.iter_graph(model):
    if isinstance(node, layers.Linear) and node.lora is not None:
      key = "/".join(map(str, path)) + "/kernel"
      delta = distributed.to_host(node.lora.delta())
      out[key] = (out[key].astype(np.float32) + delta.astype(np.float32)).astype(out[key].dtype)
  return out


def _exported_config(model: Decoder) -> DecoderConfig:
  # A LoRA on a tied output head changes the head only: the export unties it.
  if getattr(model, "head_lora", None) is not None:
    return model.config.replace(tie_embeddings=False)
  return model.config


def hf_state(model: Decoder, dtype=np.float32) -> dict[str, np.ndarray]:
  """HF tensor name -> array ([out, in] linear weights) of a Decoder."""
  params = merged_params(model)
  if getattr(model, "head_lora", None) is not None:
    table = params["embedder/embedding"].astype(np.float32)  # [vocab, embed]
    delta = distributed.to_host(model.head_lora.delta()).astype(np.float32)  # [embed, vocab]
    params["lm_head/kernel"] = (table.T + delta).astype(params["embedder/embedding"].dtype)
  names = hf_weights.hf_names(_exported_config(model))
  missing = sorted(set(names) - set(params))
  if missing:
    raise ValueError(f"model has no parameter {missing[0]} needed for export")
  state = {}
  for ours, (hf_name, transpose) in names.items():
    array = params[ours]
    state[hf_name] = np.asarray(array.T if transpose else array).astype(dtype)
  return state


def config_to_hf(config: DecoderConfig, dtype=np.float32) -> dict[str, Any]:
  hf = (llama.config_to_hf if config.family == "llama" else gemma.config_to_hf)(config)
  eos = list(config.eos_ids)
  hf.update({"bos_token_id": config.bos_id, "pad_token_id": config.pad_id,
             "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
             "torch_dtype": "bfloat16" if np.dtype(dtype) == ml_dtypes.bfloat16 else "float32"})
  return hf


def export_decoder(model: Decoder, out_dir: str | os.PathLike, *, dtype="float32",
                   tokenizer_dir: str | os.PathLike | None = None) -> Path:
  """Writes `model` (LoRA merged) as an HF directory; returns its path.

  Args:
    model: the Decoder (sharded or not; gathered to the host here).
    out_dir: destination; replaced atomically if it exists.
    dtype: 'float32' or 'bfloat16' for the saved tensors.
    tokenizer_dir: optional HF directory whose tokenizer files are copied along.
  """
  np_dtype = np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)
  if np_dtype not in _NP_TO_ST:
    raise ValueError(f"export dtype={dtype!r}: use 'float32', 'float16' or 'bfloat16'")
  state = hf_state(model, np_dtype)  # every process joins the gathers
  out_dir = Path(out_dir).expanduser()
  if not distributed.is_coordinator():
    return out_dir
  with staged_dir(out_dir, overwrite=True) as tmp:
    write_safetensors(tmp / hf_weights.SINGLE_FILE, state)
    (tmp / hf_weights.CONFIG_FILE).write_text(
        json.dumps(config_to_hf(_exported_config(model), np_dtype), indent=2))
    c = model.config
    gen = {"bos_token_id": c.bos_id, "pad_token_id": c.pad_id,
           "eos_token_id": list(c.eos_ids) if len(c.eos_ids) != 1 else c.eos_ids[0]}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer_dir is not None:
      for name in _TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.is_file():
          shutil.copy2(src, tmp / name)
  return out_dir


def check_target(out_dir: str | os.PathLike, overwrite: bool) -> None:
  """Refuses to replace a non-empty folder (it may hold the user's own files)."""
  out_dir = fs.as_path(out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    raise ValueError(f"export target {out_dir} exists and is not a folder")
  if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
    raise ValueError(f"export target {out_dir} is not empty; pass --overwrite to replace it "
                     "(everything in it is deleted) or move it away")


@contextlib.contextmanager
def staged_dir(out_dir: str | os.PathLike, *, overwrite: bool = False):
  """Yields a temporary folder that replaces `out_dir` only once the block completes.

  An export interrupted at any point (kill -9 included) leaves `out_dir` as it
  was and, at worst, a hidden ``.<name>.tmp-*`` folder next to it; never a
  folder that looks complete but lacks a file. Process 0 moves the result into
  place; other processes' folders are discarded. A bucket target is staged in
  the local temp directory and uploaded with config.json files last (a bucket
  has no rename: an interrupted upload leaves a folder without them).
  """
  remote = fs.is_remote(out_dir)
  out_dir = fs.path(out_dir) if remote else Path(out_dir).expanduser()
  check_target(out_dir, overwrite)
  if not remote:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = fs.temp_dir(tempfile.gettempdir() if remote else out_dir.parent,
                    prefix=f".{out_dir.name}.tmp-")
  try:
    yield tmp
    if not distributed.is_coordinator():
      shutil.rmtree(tmp, ignore_errors=True)
      return
    check_target(out_dir, overwrite)  # it may have filled up while we wrote
    if remote:
      fs.rmtree(out_dir)
      last = tuple(f.relative_to(tmp).as_posix() for f in tmp.rglob(hf_weights.CONFIG_FILE))
      fs.upload_tree(tmp, out_dir, last=last)
      shutil.rmtree(tmp, ignore_errors=True)
    elif out_dir.exists():
      old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
      os.replace(out_dir, old)
      os.replace(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
