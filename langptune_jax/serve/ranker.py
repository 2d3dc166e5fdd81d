"""Ranking the catalogue with one profile text: embed it, score every item, take the top-k.

A profile is embedded as one row cut to the smallest of a few fixed widths
(16, 32, 64, ... up to the window) that holds it: right padding changes no
embedding, a short profile costs a fraction of a full window, and every width
is compiled once, at warm-up.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from langptune_jax.models import embedder as embedder_lib

EMPTY_PROFILE = "profile is empty: write a few words about the user's taste"

# Traces of the ranking model's jitted call; the compile-count test reads it.
TRACE_COUNTS: collections.Counter = collections.Counter()


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, tokens, mask):
  TRACE_COUNTS["embed"] += 1
  return nnx.merge(graphdef, state)(tokens, mask)


def on_one_device(model, device=None):
  """A copy of `model` whose arrays all live on one device (default: the first)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.device_put(state, device or jax.devices()[0]))


class Ranker:
  """The ranking model (decoder) on one device, reading profiles of at most `max_len` tokens."""

  def __init__(self, embedder: embedder_lib.Embedder, tokenizer, max_len: int):
    self.graphdef, self.state = nnx.split(on_one_device(embedder))
    self.tokenizer = tokenizer
    self.max_len = int(max_len)
    self.widths = sorted({min(w, self.max_len) for w in (16, 32, 64, 128, 256, 512)}
                         | {self.max_len})

  def width_for(self, num_tokens: int) -> int:
    return next(w for w in self.widths if w >= num_tokens)

  def warm_up(self) -> None:
    """Compiles every profile width."""
    for width in self.widths:
      self.embed_rows(np.zeros((1, width), np.int32), np.ones((1, width), np.int32))

  def embed_rows(self, tokens, mask):
    return _embed(self.graphdef, self.state, jnp.asarray(tokens), jnp.asarray(mask))

  def check_profile(self, text) -> str:
    if not isinstance(text, str) or not text.strip():
      raise ValueError(EMPTY_PROFILE)
    count = len(self.tokenizer(text)["input_ids"])
    if count > self.max_len:
      raise ValueError(f"profile is {count} tokens; the ranking model reads at most "
                       f"data.decoder_max_len={self.max_len}: shorten it")
    return text

  def embed_profile(self, text: str) -> np.ndarray:
    """The L2-normalised embedding of a profile (one row of a fixed width)."""
    tokens, mask = embedder_lib.tokenize_texts(self.tokenizer, [self.check_profile(text)],
                                               self.max_len)
    width = self.width_for(int(mask.sum()))
    emb = np.asarray(jax.device_get(self.embed_rows(tokens[:, :width], mask[:, :width])),
                     np.float32)[0]
    return emb / max(float(np.linalg.norm(emb)), 1e-12)

  def top_k(self, text: str, item_embeddings: np.ndarray, k: int, exclude=()):
    """(item ids, scores) of the k best items, best first; `exclude` never appears."""
    if k < 1:
      raise ValueError(f"k={k}: must be >= 1")
    scores = item_embeddings @ self.embed_profile(text)
    excluded = np.asarray([int(i) for i in exclude], np.int64)
    if excluded.size:
      scores[excluded] = -np.inf
    k = min(k, int(np.isfinite(scores).sum()))
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return top, scores[top]
