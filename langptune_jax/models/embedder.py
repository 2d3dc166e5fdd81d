"""Text embeddings from a BERT encoder or a decoder LLM (the recommender decoder).

:func:`embed` turns right-padded token ids into one float32 vector per text by
pooling the model's last hidden states (``cls``: the first token, ``mean``:
the average over real tokens, ``last``: the last real token) and, optionally,
L2-normalising. It is pure and jit-friendly; :class:`Embedder` bundles a model
with its pooling so that it can be trained and checkpointed as one NNX module.

Texts are tokenized with :func:`tokenize_texts` (right padding to a fixed
window, truncation); :func:`is_truncated` flags the texts that filled the whole
window, which the reward treats as over-length (docs/method.md §4).
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from langptune_jax import parallel
from langptune_jax.models import bert as bert_lib

POOLINGS = ("cls", "mean", "last")
LLM_FAMILIES = ("llama", "gemma", "gemma2", "gemma3")
FAMILIES = ("bert",) + LLM_FAMILIES
REMAT_MODES = ("none", "full")  # BERT blocks are recomputed whole or not at all


def _check_pooling(pooling: str) -> None:
  if pooling not in POOLINGS:
    raise ValueError(f"decoder.pooling={pooling!r}: expected one of {', '.join(POOLINGS)}")


def last_token_index(mask: jax.Array) -> jax.Array:
  """Index of the last real (mask != 0) position of each row; 0 for an empty row."""
  mask = mask.astype(bool)
  length = mask.shape[1]
  # argmax finds the first True of the reversed row, i.e. the last True of the row.
  idx = length - 1 - jnp.argmax(mask[:, ::-1], axis=1)
  return jnp.where(mask.any(axis=1), idx, 0)


def pool(hidden: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
  """Pools hidden states [B,T,D] over real tokens to [B,D] float32."""
  _check_pooling(pooling)
  hidden = hidden.astype(jnp.float32)
  if pooling == "cls":
    return hidden[:, 0]
  if pooling == "mean":
    weights = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden * weights, axis=1)
    return total / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
  idx = last_token_index(mask)
  return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis (as torch's F.normalize), in float32.

  Written with rsqrt of the clamped squared norm so that the gradient of an
  all-zero row (e.g. an empty profile) is zero rather than NaN.
  """
  x = jnp.asarray(x, jnp.float32)
  squared = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def hidden_states(model: nnx.Module, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """Last hidden states [B,T,D] of a :class:`Bert` or of a decoder LLM."""
  if isinstance(model, bert_lib.Bert):
    return model(tokens, mask)
  # Decoder LLM: causal attention restricted to real keys; positions count only
  # real tokens, so the result does not depend on the padding side.
  key_mask = mask.astype(bool)
  length = tokens.shape[1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  attention_mask = causal[None] & key_mask[:, None, :]
  positions = jnp.maximum(jnp.cumsum(key_mask.astype(jnp.int32), axis=1) - 1, 0)
  hidden, _ = model(tokens, positions, attention_mask, return_hidden=True)
  return hidden


def embed(model: nnx.Module, tokens: jax.Array, mask: jax.Array, pooling: str = "cls",
          normalize: bool = True) -> jax.Array:
  """Embeddings [B,D] float32 of right-padded token ids [B,T] with mask [B,T]."""
  _check_pooling(pooling)
  if tokens.shape != mask.shape:
    raise ValueError(f"embed: tokens shape {tokens.shape} != mask shape {mask.shape}")
  out = pool(hidden_states(model, tokens, mask), mask, pooling)
  out = l2_normalize(out) if normalize else out
  return parallel.constrain(out, ("activation_batch", "embed"))


class Embedder(nnx.Module):
  """A text-embedding model (BERT or decoder LLM) together with its pooling."""

  def __init__(self, model: nnx.Module, *, family: str, pooling: str = "cls",
               normalize: bool = True):
    if family not in FAMILIES:
      raise ValueError(f"decoder.family={family!r}: expected one of {', '.join(FAMILIES)}")
    _check_pooling(pooling)
    if family != "bert" and pooling == "cls":
      # The first token of a causal LM sees nothing but itself.
      raise ValueError(f"decoder.pooling='cls' is meaningless for the causal LM family "
                       f"{family!r}: use 'last' or 'mean'")
    self.model = model
    self.family, self.pooling, self.normalize = family, pooling, normalize

  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    return embed(self.model, tokens, mask, self.pooling, self.normalize)

  def num_layers(self) -> int:
    """Number of transformer blocks (used to train only the top ones)."""
    return len(self.model.layers)


def _dtype(name_or_dtype) -> Any:
  if isinstance(name_or_dtype, str):
    try:
      return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[
          name_or_dtype]
    except KeyError:
      raise ValueError(f"dtype {name_or_dtype!r}: expected float32, bfloat16 or float16") from None
  return name_or_dtype


def _load_llm(family: str, path: pathlib.Path, dtype, param_dtype, mesh: Mesh | None,
              remat: str) -> nnx.Module:
  """A decoder LLM from a local HF directory or a ``.gguf`` file."""
  from langptune_jax.weights import hf  # pylint: disable=g-import-not-at-top
  model, config = hf.load_decoder(path, dtype=jnp.dtype(dtype).name,
                                  param_dtype=jnp.dtype(param_dtype).name, mesh=mesh,
                                  remat=remat)
  loaded = config.family
  # gemma2/gemma3 checkpoints report their own family; accept any gemma* for 'gemma*'.
  if loaded.rstrip("23") != family.rstrip("23"):
    raise ValueError(f"decoder.family={family!r} but {path} holds a {loaded!r} model")
  return model


def load_embedder(family: str, path, pooling: str = "cls", normalize: bool = True,
                  dtype="float32", mesh: Mesh | None = None, *, param_dtype="float32",
                  remat: str = "none", attention: str = "einsum") -> Embedder:
  """Loads the recommender decoder (``config.decoder``) as an :class:`Embedder`.

  Args:
    family: ``bert`` or an LLM family (``llama``, ``gemma``, ``gemma2``, ``gemma3``).
    path: local HF directory (or a ``.gguf`` file for an LLM).
    pooling: ``cls``, ``mean`` or ``last``.
    normalize: L2-normalise the embeddings.
    dtype: compute dtype (name or jnp dtype).
    mesh: if given, parameters are placed in their shardings on it.
    param_dtype: storage dtype of the parameters.
    remat: 'full' recomputes each block in the backward pass; 'none' keeps activations.
    attention: BERT attention kernel, 'einsum' or 'fused' (right padding only).
  """
  if family not in FAMILIES:
    raise ValueError(f"decoder.family={family!r}: expected one of {', '.join(FAMILIES)}")
  _check_pooling(pooling)
  if remat not in REMAT_MODES:
    raise ValueError(f"decoder.remat={remat!r}: expected one of {', '.join(REMAT_MODES)}")
  if not path:
    raise ValueError("decoder.path is empty: set it to a local model directory")
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"decoder.path={str(path)!r}: no such file or directory")
  dtype, param_dtype = _dtype(dtype), _dtype(param_dtype)
  if family == "bert":
    model, _ = bert_lib.load_bert(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                  remat=remat == "full", attention=attention)
  else:
    model = _load_llm(family, path, dtype, param_dtype, mesh, remat)
  return Embedder(model, family=family, pooling=pooling, normalize=normalize)


# --- tokenization --------------------------------------------------------------

def _pad_id(tokenizer) -> int:
  for attr in ("pad_token_id", "eos_token_id"):
    value = getattr(tokenizer, attr, None)
    if isinstance(value, int):
      return value
  return 0  # masked out anyway


def tokenize_texts(tokenizer, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded, truncated token ids and mask, both int32 numpy [N, max_len].

  `tokenizer` is a ``transformers`` tokenizer or a ``tokenizers.Tokenizer``.
  Special tokens are added as the tokenizer does by default; truncation keeps
  them (e.g. BERT's final [SEP]). Padding is always on the right, whatever the
  tokenizer's own padding side, with its pad token (else EOS, else 0).
  """
  if max_len < 1:
    raise ValueError(f"max_len={max_len}: must be >= 1")
  texts = list(texts)
  if not all(isinstance(t, str) for t in texts):
    bad = next(t for t in texts if not isinstance(t, str))
    raise TypeError(f"tokenize_texts: every text must be a str, got {type(bad).__name__}")
  if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "to_str"):
    # A raw `tokenizers.Tokenizer`: configure truncation on a copy, never on the caller's.
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(max_len)
    rows = [enc.ids for enc in tok.encode_batch(texts)]
    pad = tok.padding["pad_id"] if tok.padding else _pad_id(tokenizer)
  else:
    rows = tokenizer(texts, truncation=True, max_length=max_len, padding=False)["input_ids"]
    pad = _pad_id(tokenizer)
  ids = np.full((len(texts), max_len), pad, dtype=np.int32)
  mask = np.zeros((len(texts), max_len), dtype=np.int32)
  for i, row in enumerate(rows):
    row = row[:max_len]
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return ids, mask


def is_truncated(mask) -> np.ndarray | jax.Array:
  """True where a right-padded row has no padding left (the text filled the window)."""
  if isinstance(mask, jax.Array):
    return mask[:, -1].astype(bool)
  return np.asarray(mask)[:, -1].astype(bool)
