"""Non-LLM baselines scored on the same splits: popularity, random and SASRec.

All baselines return raw scores over the whole catalogue ``[B, N]`` (or ``[N]``
for popularity); history masking and ranking are done by
:mod:`langptune_jax.rec.metrics` exactly as for profile embeddings.

SASRec (Kang & McAuley, 2018) here: item embeddings (scaled by sqrt(D)) plus
learned positions, pre-LayerNorm causal self-attention blocks, and scores =
last hidden state . item embeddings (tied). Trained on the training users'
sequences with next-item prediction at every position, either full-catalogue
softmax cross-entropy ('softmax') or the original binary cross-entropy with one
uniformly sampled negative per position ('bce').
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from langptune_jax import parallel
from langptune_jax.models import layers
from langptune_jax.weights import tokenizer as tok_lib

Array = jax.Array
PAD = 0  # token id of padding; item id i is token i + 1


def history_query_tokens(tokenizer, texts: Sequence[str], pad_len: int, keep: int,
                         pad_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Raw-history queries as the authors tokenize them: (tokens i32[U, keep], mask).

  Each text is truncated to `pad_len` tokens (the closing special token kept),
  left-padded to `pad_len`, and the last `keep` positions are kept: a long
  history keeps its most recent part, a short one its whole text.
  """
  if not 0 < keep <= pad_len:
    raise ValueError(f"baselines.history_max_len={keep} must be in [1, history_pad_len={pad_len}]")
  pad = tok_lib.pad_id(tokenizer) if pad_id is None else pad_id
  tokens = np.full((len(texts), pad_len), pad, np.int32)
  mask = np.zeros((len(texts), pad_len), np.int32)
  for row, ids in enumerate(tok_lib.batch_encode(tokenizer, list(texts), add_special_tokens=True)):
    ids = list(ids)
    if len(ids) > pad_len:
      ids = ids[:pad_len - 1] + ids[-1:]
    if ids:
      tokens[row, pad_len - len(ids):] = ids
      mask[row, pad_len - len(ids):] = 1
  return tokens[:, pad_len - keep:], mask[:, pad_len - keep:]


def item_counts(item_ids: np.ndarray | Sequence[int], num_items: int) -> np.ndarray:
  """Interaction counts i64[N] from a flat array of training interaction item ids."""
  ids = np.asarray(item_ids, np.int64).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= num_items):
    raise ValueError(f"item ids must lie in [0, {num_items}), got range [{ids.min()}, {ids.max()}]")
  return np.bincount(ids, minlength=num_items)


def popularity_scores(train_item_counts: np.ndarray | Array, num_items: int) -> Array:
  """f32[N] scores = training interaction counts (broadcast over users; mask history later).

  Equal counts tie; ranking applies the pessimistic tie rule and top-k returns
  lower item ids first.
  """
  counts = jnp.asarray(train_item_counts, jnp.float32)
  if counts.shape != (num_items,):
    raise ValueError(f"train_item_counts has shape {counts.shape}, expected ({num_items},)")
  return counts


def random_scores(rng: Array, batch: int, num_items: int) -> Array:
  """f32[B, N] i.i.d. uniform scores from a seeded key (ties have probability ~0)."""
  return jax.random.uniform(rng, (batch, num_items), jnp.float32)


# --- SASRec ------------------------------------------------------------------


class _SelfAttention(nnx.Module):
  """Multi-head causal self-attention with key padding."""

  def __init__(self, dim: int, num_heads: int, dropout: float, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"SASRec embed_dim={dim} is not divisible by num_heads={num_heads}")
    self.num_heads = num_heads
    self.q = layers.Linear(dim, dim, axes=("embed", "heads"), use_bias=True, rngs=rngs)
    self.k = layers.Linear(dim, dim, axes=("embed", "heads"), use_bias=True, rngs=rngs)
    self.v = layers.Linear(dim, dim, axes=("embed", "heads"), use_bias=True, rngs=rngs)
    self.o = layers.Linear(dim, dim, axes=("heads", "embed"), use_bias=True, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: Array, valid: Array) -> Array:
    b, length, d = x.shape
    h = self.num_heads

    def split(t):
      return t.reshape(b, length, h, d // h)

    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // h)
    causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
    allowed = causal[None, None] & valid[:, None, None, :]
    # A finite fill keeps all-padding query rows finite (they are never read).
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = self.dropout(jax.nn.softmax(logits, axis=-1))
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, d)
    return self.o(out)


class _Block(nnx.Module):
  """Pre-LN transformer block: x + attn(LN x), then x + FFN(LN x)."""

  def __init__(self, dim: int, num_heads: int, dropout: float, rngs: nnx.Rngs):
    self.ln1 = layers.LayerNorm(dim, eps=1e-8)
    self.attn = _SelfAttention(dim, num_heads, dropout, rngs)
    self.ln2 = layers.LayerNorm(dim, eps=1e-8)
    self.fc1 = layers.Linear(dim, dim, axes=("embed", "mlp"), use_bias=True, rngs=rngs)
    self.fc2 = layers.Linear(dim, dim, axes=("mlp", "embed"), use_bias=True, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: Array, valid: Array) -> Array:
    x = x + self.dropout(self.attn(self.ln1(x), valid))
    y = self.fc2(self.dropout(jax.nn.gelu(self.fc1(self.ln2(x)))))
    x = x + self.dropout(y)
    return x * valid[..., None]


class SASRec(nnx.Module):
  """Self-attentive sequential recommender over item ids [0, num_items)."""

  def __init__(self, num_items: int, *, max_len: int = 50, embed_dim: int = 64,
               num_heads: int = 2, num_blocks: int = 2, dropout: float = 0.2,
               rngs: nnx.Rngs):
    self.num_items, self.max_len, self.embed_dim = num_items, max_len, embed_dim
    self.item_embed = layers.Embed(num_items + 1, embed_dim, rngs=rngs)
    self.pos_embed = nnx.Param(layers.default_init()(rngs.params(), (max_len, embed_dim)),
                               out_sharding=("length", "embed"))
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.blocks = nnx.List([_Block(embed_dim, num_heads, dropout, rngs)
                            for _ in range(num_blocks)])
    self.final_ln = layers.LayerNorm(embed_dim, eps=1e-8)

  def hidden(self, tokens: Array) -> Array:
    """f32[B, L, D] states from left-padded token ids i32[B, L] (0 = padding)."""
    valid = tokens != PAD
    length = tokens.shape[1]
    x = self.item_embed(tokens) * math.sqrt(self.embed_dim)
    x = x + self.pos_embed[...][-length:][None]
    x = self.dropout(x) * valid[..., None]
    for block in self.blocks:
      x = block(x, valid)
    return parallel.constrain(self.final_ln(x), ("activation_batch", "length", "embed"))

  def item_table(self) -> Array:
    """f32[N, D] output embeddings of the real items (padding row dropped)."""
    return self.item_embed.embedding[...][1:]

  def __call__(self, tokens: Array) -> Array:
    """f32[B, N] next-item scores after the last position of each row."""
    h = self.hidden(tokens)[:, -1]
    scores = h @ self.item_table().T
    return parallel.constrain(scores, ("batch", "items"))


def left_pad_histories(histories, max_len: int) -> np.ndarray:
  """Token ids i32[B, max_len]: each history's last max_len items (ids >= 0), left-padded.

  `histories` is a list of id sequences or an array with -1 padding anywhere.
  """
  out = np.zeros((len(histories), max_len), np.int32)
  for row, seq in enumerate(histories):
    seq = np.asarray(seq, np.int64).reshape(-1)
    seq = seq[seq >= 0][-max_len:]
    if seq.size:
      out[row, max_len - seq.size:] = seq + 1
  return out


def _training_windows(sequences: list[np.ndarray], rows: np.ndarray, max_len: int,
                      rng: np.random.Generator) -> np.ndarray:
  """Left-padded windows i32[b, max_len + 1] of token ids, one random window end per row."""
  out = np.zeros((len(rows), max_len + 1), np.int32)
  for i, r in enumerate(rows):
    seq = sequences[r]
    end = int(rng.integers(min(len(seq), max_len + 1), len(seq) + 1))
    window = seq[max(0, end - max_len - 1):end]
    out[i, max_len + 1 - len(window):] = window + 1
  return out


def _sasrec_loss(model: SASRec, window: Array, loss: str, neg_key: Array) -> Array:
  inputs, targets = window[:, :-1], window[:, 1:]
  weight = ((inputs != PAD) & (targets != PAD)).astype(jnp.float32)
  h = model.hidden(inputs)
  table = model.item_table()
  tgt = jnp.maximum(targets - 1, 0)
  if loss == "softmax":
    logits = jnp.einsum("bld,nd->bln", h, table)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
  else:  # bce with one uniform negative per position, as the original SASRec
    neg = jax.random.randint(neg_key, tgt.shape, 0, table.shape[0])
    pos_logit = jnp.sum(h * table[tgt], axis=-1)
    neg_logit = jnp.sum(h * table[neg], axis=-1)
    nll = -jax.nn.log_sigmoid(pos_logit) - jax.nn.log_sigmoid(-neg_logit)
  return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def train_sasrec(sequences, num_items: int, steps: int = 2000, seed: int = 0, *,
                 batch_size: int = 128, max_len: int = 50, embed_dim: int = 64,
                 num_heads: int = 2, num_blocks: int = 2, dropout: float = 0.2,
                 lr: float = 1e-3, weight_decay: float = 0.0, loss: str = "softmax",
                 progress: bool = True) -> SASRec:
  """Trains SASRec on training users' item sequences (oldest first) and returns it in eval mode.

  Args:
    sequences: list of item-id sequences (ids in [0, num_items)); sequences
      shorter than 2 items carry no next-item pair and are skipped.
    num_items: catalogue size N.
    steps: optimizer steps; each samples `batch_size` users with replacement
      and one random window of up to `max_len` + 1 items from each.
    seed: seeds initialisation, batch sampling, dropout and negatives.
    loss: 'softmax' (full-catalogue cross-entropy) or 'bce' (one negative).
  """
  if loss not in ("softmax", "bce"):
    raise ValueError(f"SASRec loss={loss!r}: expected 'softmax' or 'bce'")
  seqs = [np.asarray(s, np.int64).reshape(-1) for s in sequences]
  for i, s in enumerate(seqs):
    if s.size and (s.min() < 0 or s.max() >= num_items):
      raise ValueError(f"SASRec sequence {i} has item ids outside [0, {num_items})")
  seqs = [s for s in seqs if s.size >= 2]
  if not seqs:
    raise ValueError("SASRec: no training sequence has 2 or more items")

  # RngBitGenerator-based dropout keys: threefry bits for every dropout site make
  # the CPU compile several times slower for no statistical benefit here.
  rngs = nnx.Rngs(params=seed, dropout=jax.random.key(seed + 1, impl="rbg"))
  model = SASRec(num_items, max_len=max_len, embed_dim=embed_dim, num_heads=num_heads,
                 num_blocks=num_blocks, dropout=dropout, rngs=rngs)
  model.train()
  optimizer = nnx.Optimizer(model, optax.adamw(lr, b2=0.98, weight_decay=weight_decay),
                            wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, window, neg_key):
    model, optimizer = nnx.merge(graphdef, state)
    value, grads = nnx.value_and_grad(_sasrec_loss)(model, window, loss, neg_key)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), value

  rng = np.random.default_rng(seed)
  key = jax.random.key(seed + 2, impl="rbg")
  bar = tqdm(range(steps), desc="training SASRec", disable=not progress)
  for i in bar:
    rows = rng.integers(0, len(seqs), batch_size)
    window = _training_windows(seqs, rows, max_len, rng)
    state, value = step(state, window, jax.random.fold_in(key, i))
    if progress and (i % 50 == 0 or i == steps - 1):
      bar.set_postfix(loss=f"{float(value):.4f}")
  model, _ = nnx.merge(graphdef, state)
  model.eval()
  return model


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def sasrec_scores(model: SASRec, histories, batch_size: int = 1024) -> np.ndarray:
  """f32[B, N] next-item scores for users from their histories (not masked; rank with history).

  `histories` is a list of id sequences or an i32[B, H] array with -1 padding;
  each is cut to the model's last `max_len` items.
  """
  tokens = left_pad_histories(histories, model.max_len)
  model.eval()
  graphdef, state = nnx.split(model)
  out = [np.asarray(_forward(graphdef, state, tokens[i:i + batch_size]))
         for i in range(0, len(tokens), batch_size)]
  if not out:
    return np.zeros((0, model.num_items), np.float32)
  return np.concatenate(out, axis=0)
