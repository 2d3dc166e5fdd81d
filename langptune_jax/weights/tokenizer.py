"""Tokenizer loading (local HF directories and GGUF files) and small id helpers.

`load_tokenizer(path)` returns a transformers tokenizer with its chat template,
offline only. A GGUF file goes through transformers' GGUF support; when that
leaves the chat template unset, the template is read from the file's
`tokenizer.chat_template` metadata. Converting a GGUF vocabulary is slow (tens
of seconds), so the result is saved once as an HF directory under the asset
cache and reloaded from there.

`batch_encode` tokenizes many texts at once through the underlying `tokenizers`
(Rust) object, with truncation and padding switched off so lengths are exact.
"""

from __future__ import annotations

import functools
import mmap
import os
import pathlib
import shutil
import struct
import tempfile
from typing import Sequence

import numpy as np

# Gemma turn format, used only for Gemma-vocabulary GGUF files that carry no
# template (the Gemma 3 base checkpoints); instruction-tuned files bring their own.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (message['content'] | trim) + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")


def _gguf_cache_dir(p: pathlib.Path) -> pathlib.Path:
  from langptune_jax import assets

  st = p.stat()
  return assets.cache_dir() / "tokenizers" / f"{p.stem}-{st.st_size}-{st.st_mtime_ns}"


def _from_gguf(p: pathlib.Path):
  """A GGUF file's tokenizer, converted once and then kept as an HF directory."""
  import transformers

  cached = _gguf_cache_dir(p)
  if (cached / "tokenizer_config.json").exists():
    return transformers.AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
  tok = transformers.AutoTokenizer.from_pretrained(
      str(p.parent), gguf_file=p.name, local_files_only=True)
  if not getattr(tok, "chat_template", None):
    template = gguf_chat_template(p)
    if not template and "<start_of_turn>" in tok.get_vocab():
      template = GEMMA_CHAT_TEMPLATE
    if template:
      tok.chat_template = template
  try:
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{cached.name}.", dir=cached.parent))
    tok.save_pretrained(str(tmp))
    try:
      os.rename(tmp, cached)
    except OSError:  # another process got there first
      shutil.rmtree(tmp, ignore_errors=True)
  except OSError:
    pass  # a read-only cache only costs the next load its conversion time
  return tok


@functools.lru_cache(maxsize=8)
def _load_cached(path: str):
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  import transformers  # Imported lazily: it is slow and only needed here.

  p = pathlib.Path(path)
  if p.is_file():
    if p.suffix != ".gguf":
      raise ValueError(f"tokenizer path {p} is a file but not a .gguf file")
    return _from_gguf(p)
  if not (p / "tokenizer.json").exists() and not (p / "tokenizer_config.json").exists():
    raise FileNotFoundError(
        f"tokenizer directory {p} has neither tokenizer.json nor tokenizer_config.json")
  return transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def load_tokenizer(path: str | os.PathLike):
  """Loads a tokenizer from a local HF directory or a .gguf file (cached per path)."""
  if not str(path):
    raise ValueError("tokenizer path is empty; set encoder.path / decoder.path")
  p = pathlib.Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(f"tokenizer path not found: {p}")
  return _load_cached(str(p.resolve()))


_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_metadata_strings(path: str | os.PathLike, keys: set[str]) -> dict[str, str]:
  """String values of the given GGUF metadata keys, read straight from the header.

  A direct walk over the key/value section; `gguf.GGUFReader` builds Python
  objects for every vocabulary entry, which takes tens of seconds on a 262k vocab.
  """
  out: dict[str, str] = {}
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
    if buf[:4] != b"GGUF":
      raise ValueError(f"{path}: not a GGUF file (bad magic)")
    n_kv = struct.unpack_from("<Q", buf, 16)[0]
    pos = 24

    def read_str(pos: int) -> tuple[bytes, int]:
      n = struct.unpack_from("<Q", buf, pos)[0]
      return buf[pos + 8:pos + 8 + n], pos + 8 + n

    for _ in range(n_kv):
      key, pos = read_str(pos)
      kind = struct.unpack_from("<I", buf, pos)[0]
      pos += 4
      if kind == _GGUF_STRING:
        value, pos = read_str(pos)
        if key.decode("utf-8") in keys:
          out[key.decode("utf-8")] = value.decode("utf-8")
      elif kind == _GGUF_ARRAY:
        elem, n = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if elem == _GGUF_STRING:
          for _ in range(n):
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        else:
          pos += _GGUF_SCALAR_BYTES[elem] * n
      else:
        pos += _GGUF_SCALAR_BYTES[kind]
  return out


def gguf_chat_template(path: str | os.PathLike) -> str | None:
  """The `tokenizer.chat_template` string stored in a GGUF file's metadata, if any."""
  key = "tokenizer.chat_template"
  return gguf_metadata_strings(path, {key}).get(key)


def pad_id(tok) -> int:
  """Padding id: the tokenizer's pad token, else its EOS token, else 0."""
  for value in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
    if value is not None:
      return int(value)
  return 0


# End-of-turn markers of the chat formats in use (Gemma, Llama 3, ChatML/SmolLM2).
_END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<eos>")


def eos_ids(tok) -> list[int]:
  """All ids that end a generated turn: the EOS token plus known end-of-turn tokens."""
  ids = []
  if getattr(tok, "eos_token_id", None) is not None:
    ids.append(int(tok.eos_token_id))
  vocab = tok.get_vocab()
  for token in _END_OF_TURN:
    if token in vocab and int(vocab[token]) not in ids:
      ids.append(int(vocab[token]))
  return ids


@functools.lru_cache(maxsize=8)
def _raw_backend(tok):
  import tokenizers

  backend = getattr(tok, "backend_tokenizer", None)
  if backend is None:
    return None
  # A private copy: the shared one may carry truncation (e.g. 128 for MiniLM)
  # that would hide true lengths from the length filters.
  raw = tokenizers.Tokenizer.from_str(backend.to_str())
  raw.no_truncation()
  raw.no_padding()
  return raw


def batch_encode(tok, texts: Sequence[str], add_special_tokens: bool = True,
                 batch_size: int = 1024) -> list[list[int]]:
  """Token ids of each text, untruncated, through the fast (Rust) batch path."""
  raw = _raw_backend(tok)
  out: list[list[int]] = []
  # The ids are all we need: the fast variant skips character offsets.
  encode = None if raw is None else getattr(raw, "encode_batch_fast", raw.encode_batch)
  for start in range(0, len(texts), batch_size):
    chunk = list(texts[start:start + batch_size])
    if encode is not None:
      out.extend(e.ids for e in encode(chunk, add_special_tokens=add_special_tokens))
    else:
      out.extend(tok(chunk, add_special_tokens=add_special_tokens)["input_ids"])
  return out


def pad_batch(ids: Sequence[Sequence[int]], length: int, pad: int,
              left: bool) -> tuple[np.ndarray, np.ndarray]:
  """Pads (never truncates) id lists to `length`: ([N, length] int32 ids, int32 mask)."""
  tokens = np.full((len(ids), length), pad, dtype=np.int32)
  mask = np.zeros((len(ids), length), dtype=np.int32)
  for row, seq in enumerate(ids):
    n = len(seq)
    if n > length:
      raise ValueError(f"sequence of {n} tokens does not fit length {length}")
    if n == 0:
      continue
    if left:
      tokens[row, length - n:] = seq
      mask[row, length - n:] = 1
    else:
      tokens[row, :n] = seq
      mask[row, :n] = 1
  return tokens, mask
