"""Autoregressive sampling and per-token log-probabilities for decoder LLMs.

:func:`sample` runs a jitted prefill over a left-padded prompt batch followed by
a jitted ``lax.while_loop`` decode over a fixed-size KV cache that is donated
from one call to the next. Shapes are bucketed (prompt length and number of new
tokens are rounded up) so that calls with similar shapes reuse compiled code.
:func:`sample_stream` runs the same decode loop a few tokens at a time, for
showing a response while it is written.

:func:`token_logprobs` and :func:`sequence_logprobs` score given sequences with
one full forward; the log-softmax over the vocabulary is computed chunk by chunk
along the sequence (and rematerialised in the backward pass) so a 256k vocabulary
never needs a [B, L, V] buffer at once.

Both work with any module that follows the decoder contract of
:mod:`langptune_jax.models.transformer` (``__call__`` with tokens, positions,
attention mask and cache; ``logits_from_hidden``; ``init_cache``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from langptune_jax import parallel
from langptune_jax.models import transformer

# How many times each jitted function was traced (tests check recompilation).
TRACE_COUNTS: collections.Counter = collections.Counter()

_NEG_INF = -1e30  # finite "minus infinity": keeps softmax free of NaNs


@flax.struct.dataclass
class SampleOutput:
  """Result of :func:`sample`.

  Attributes:
    tokens: int32 [B, N] generated tokens; pad_id after the first EOS.
    response_mask: bool [B, N], True up to and including the first EOS.
    logprobs: float32 [B, N], log-softmax(logits / temperature) at each
      sampled token (unfiltered by top-k/top-p), 0 where the mask is False.
    prompt_tokens: int32 [B, P] the (left-padded) prompts as given.
    prompt_mask: bool [B, P].
  """
  tokens: jax.Array
  response_mask: jax.Array
  logprobs: jax.Array
  prompt_tokens: jax.Array
  prompt_mask: jax.Array


# --- masks and positions -----------------------------------------------------

def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position of each token = number of real tokens before it (padding does not count)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_padding_mask(mask: jax.Array) -> jax.Array:
  """bool [B, T, T]: query t sees real keys s <= t; padding queries see only themselves.

  Letting a padding query attend to itself keeps every softmax row non-empty
  (no NaNs); nothing real ever attends to a padding key.
  """
  t = mask.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  allowed = causal[None] & mask[:, None, :]
  return allowed | jnp.eye(t, dtype=bool)[None]


# --- shape buckets -----------------------------------------------------------

def bucket_length(n: int, minimum: int = 16) -> int:
  """Rounds n up to 2^k * (1, 1.25, 1.5 or 1.75) (>= minimum), or to a multiple of 1024
  beyond 1024.

  Quarter steps between powers of two cap the padding at a fifth of the bucket (a
  150-token prompt runs at 160, not 256), for four shapes per doubling.
  """
  n = max(int(n), 1)
  if n > 1024:
    return -(-n // 1024) * 1024
  if n <= 8:
    return max(minimum, 1 << (n - 1).bit_length())
  step = 1 << ((n - 1).bit_length() - 3)  # a quarter of the power of two below n
  return max(minimum, -(-n // step) * step)


def _dp_size() -> int:
  ctx = parallel.active_mesh()
  return 1 if ctx is None else parallel.data_parallel_size(ctx[0], ctx[1])


def _constrain_batch(x: jax.Array) -> jax.Array:
  return parallel.constrain(x, ("activation_batch",) + (None,) * (x.ndim - 1))


def _constrain_cache(cache):
  def one(x):
    if getattr(x, "ndim", 0) == 4:
      return parallel.constrain(x, transformer.KV_AXES)
    return x
  return jax.tree.map(one, cache)


# --- token selection ---------------------------------------------------------

def _filter_logits(logits: jax.Array, top_k: int, use_top_p: bool, top_p: jax.Array) -> jax.Array:
  """Masks (to -inf) every token outside the top-k and outside the top-p nucleus."""
  if top_k > 0:
    values = jax.lax.top_k(logits, top_k)[0]  # [B, k], descending
    logits = jnp.where(logits < values[:, -1:], _NEG_INF, logits)
  if use_top_p:
    if top_k > 0:
      sorted_logits = values  # the nucleus lies within the top-k
    else:
      sorted_logits = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is < top_p (the first always stays).
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, _NEG_INF, logits)
  return logits


def _select(logits, rng, step, *, temperature, min_new_tokens, eos_ids, greedy, top_k,
            use_top_p, top_p):
  """One decoding step: (next token [B], its log-prob [B]) from float32 logits [B, V]."""
  logprobs = jax.nn.log_softmax(logits / temperature, axis=-1)
  is_eos = jnp.any(jnp.arange(logits.shape[-1])[:, None] == eos_ids[None], axis=-1)
  choice = jnp.where(is_eos[None] & (step < min_new_tokens), _NEG_INF, logits)
  if greedy:
    token = jnp.argmax(choice, axis=-1)
  else:
    choice = _filter_logits(choice / temperature, top_k, use_top_p, top_p)
    token = jax.random.categorical(jax.random.fold_in(rng, step), choice, axis=-1)
  token = token.astype(jnp.int32)
  return token, jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]


def _inference_model(graphdef, state):
  """The model rebuilt inside a trace, with dropout (e.g. in adapters) off."""
  model = nnx.merge(graphdef, state)
  model.set_attributes(deterministic=True, raise_if_not_found=False)
  return model


# --- the jitted stages ---------------------------------------------------------

def _decode_step(model, select, rng, start, lengths, step, cache, logits, slots):
  """One token: select it from `logits`, feed it back; (token, log-prob, cache, logits, slots)."""
  token, logprob = select(logits, rng, step)
  # The token occupies slot start + step and may see itself.
  slots = jax.lax.dynamic_update_slice(slots, jnp.ones((token.shape[0], 1), bool),
                                       (0, start + step))
  positions = (lengths + step)[:, None]
  hidden, cache = model(token[:, None], positions, slots[:, None, :], cache, return_hidden=True)
  logits = model.logits_from_hidden(hidden).astype(jnp.float32)[:, 0]
  return token, logprob, _constrain_cache(cache), _constrain_batch(logits), slots


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_size", "cache_dtype", "mesh_key"))
def _prefill(graphdef, state, tokens, mask, *, cache_size, cache_dtype, mesh_key):
  """Runs the prompt through the model; returns (cache, last-token logits, slot mask, lengths)."""
  del mesh_key  # part of the cache key only: traces differ per active mesh
  TRACE_COUNTS["prefill"] += 1
  model = _inference_model(graphdef, state)
  batch, p = tokens.shape
  tokens, mask = _constrain_batch(tokens), _constrain_batch(mask)
  cache = _constrain_cache(model.init_cache(batch, cache_size, dtype=cache_dtype))
  attn = causal_padding_mask(mask)
  attn = jnp.pad(attn, ((0, 0), (0, 0), (0, cache_size - p)))  # empty slots: never visible
  hidden, cache = model(tokens, positions_from_mask(mask), attn, cache, return_hidden=True)
  logits = model.logits_from_hidden(hidden[:, -1:]).astype(jnp.float32)[:, 0]
  slots = jnp.pad(mask, ((0, 0), (0, cache_size - p)))
  lengths = jnp.sum(mask.astype(jnp.int32), axis=-1)
  return _constrain_cache(cache), _constrain_batch(logits), _constrain_batch(slots), lengths


@functools.partial(
    jax.jit, donate_argnames=("cache",),
    static_argnames=("graphdef", "max_steps", "greedy", "top_k", "use_top_p", "stop_at_eos",
                     "mesh_key"))
def _decode(graphdef, state, cache, logits, slots, lengths, rng, num_steps, temperature, top_p,
            min_new_tokens, pad_id, eos_ids, *, max_steps, greedy, top_k, use_top_p, stop_at_eos,
            mesh_key):
  """The decode loop: up to `num_steps` (<= max_steps) tokens, one forward per token.

  Returns (tokens, log-probs, cache); the cache comes back so that the donated
  input buffers are reused in place by the loop.
  """
  del mesh_key
  TRACE_COUNTS["decode"] += 1
  model = _inference_model(graphdef, state)
  batch = logits.shape[0]
  start = cache["end_index"]  # first free slot = the (bucketed) prompt length
  out_tokens = _constrain_batch(jnp.full((batch, max_steps), pad_id, jnp.int32))
  out_logprobs = _constrain_batch(jnp.zeros((batch, max_steps), jnp.float32))
  done = jnp.zeros((batch,), bool)
  select = functools.partial(
      _select, temperature=temperature, min_new_tokens=min_new_tokens, eos_ids=eos_ids,
      greedy=greedy, top_k=top_k, use_top_p=use_top_p, top_p=top_p)

  def cond(carry):
    step, done = carry[0], carry[5]
    going = step < num_steps
    if stop_at_eos:
      going &= ~jnp.all(done)
    return going

  def body(carry):
    step, cache, logits, slots, out, done, out_lp = carry
    token, logprob, cache, logits, slots = _decode_step(model, select, rng, start, lengths, step,
                                                        cache, logits, slots)
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
    out_lp = jax.lax.dynamic_update_slice(out_lp, logprob[:, None], (0, step))
    done = done | jnp.any(token[:, None] == eos_ids[None], axis=-1)
    return step + 1, cache, logits, slots, out, done, out_lp

  carry = (jnp.zeros((), jnp.int32), cache, logits, slots, out_tokens, done, out_logprobs)
  _, cache, _, _, out_tokens, _, out_logprobs = jax.lax.while_loop(cond, body, carry)
  return out_tokens, out_logprobs, cache


@functools.partial(
    jax.jit, donate_argnames=("cache",),
    static_argnames=("graphdef", "chunk", "greedy", "top_k", "use_top_p", "mesh_key"))
def _decode_chunk(graphdef, state, cache, logits, slots, lengths, rng, first_step, num_steps,
                  temperature, top_p, min_new_tokens, pad_id, eos_ids, *, chunk, greedy, top_k,
                  use_top_p, mesh_key):
  """Steps first_step .. first_step + chunk - 1 (none from `num_steps` on) of :func:`_decode`.

  Returns (tokens [B, chunk], cache, logits, slots): the loop's state, to go on from.
  """
  del mesh_key
  TRACE_COUNTS["decode_chunk"] += 1
  model = _inference_model(graphdef, state)
  start = cache["end_index"] - first_step  # the (bucketed) prompt length
  out = _constrain_batch(jnp.full((logits.shape[0], chunk), pad_id, jnp.int32))
  select = functools.partial(
      _select, temperature=temperature, min_new_tokens=min_new_tokens, eos_ids=eos_ids,
      greedy=greedy, top_k=top_k, use_top_p=use_top_p, top_p=top_p)

  def cond(carry):
    return (carry[0] < chunk) & (first_step + carry[0] < num_steps)

  def body(carry):
    i, cache, logits, slots, out = carry
    token, _, cache, logits, slots = _decode_step(model, select, rng, start, lengths,
                                                  first_step + i, cache, logits, slots)
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
    return i + 1, cache, logits, slots, out

  carry = (jnp.zeros((), jnp.int32), cache, logits, slots, out)
  _, cache, logits, slots, out = jax.lax.while_loop(cond, body, carry)
  return out, cache, logits, slots


@jax.jit
def _truncate_after_eos(tokens, logprobs, num_steps, pad_id, eos_ids):
  """Pads every token after the first EOS; the mask keeps tokens up to and including it."""
  steps = jnp.arange(tokens.shape[1])[None]
  generated = steps < num_steps
  is_eos = jnp.any(tokens[..., None] == eos_ids, axis=-1) & generated
  # eos_before[t]: an EOS occurs strictly before t.
  eos_before = (jnp.cumsum(is_eos.astype(jnp.int32), axis=1) - is_eos.astype(jnp.int32)) > 0
  mask = generated & ~eos_before
  return jnp.where(mask, tokens, pad_id), mask, jnp.where(mask, logprobs, 0.0)


def _mesh_key():
  ctx = parallel.active_mesh()
  return None if ctx is None else (ctx[0], ctx[1])


@dataclasses.dataclass(frozen=True)
class _Started:
  """A prompt batch after the prefill: what the decode loop (whole or in pieces) starts from."""
  graphdef: Any
  state: Any
  mesh_key: Any
  eos: jax.Array
  top_k: int
  cache: Any
  logits: jax.Array
  slots: jax.Array
  lengths: jax.Array
  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  batch: int
  n_b: int


def _start(model, prompt_tokens, prompt_mask, *, max_new_tokens, temperature, top_k, top_p,
           eos_ids, pad_id, greedy, cache_size, cache_dtype) -> _Started:
  """Checks the arguments, pads the prompts to their buckets and runs the prefill."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
  if not greedy and temperature <= 0:
    raise ValueError(f"temperature={temperature}: must be > 0 (use greedy=True for argmax)")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p}: must be in (0, 1]")
  if top_k < 0:
    raise ValueError(f"top_k={top_k}: must be >= 0")
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  prompt_mask = jnp.asarray(prompt_mask, bool)
  if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
    raise ValueError(f"prompt_tokens {prompt_tokens.shape} and prompt_mask {prompt_mask.shape} "
                     "must both be [batch, prompt_len]")
  batch, p = prompt_tokens.shape
  vocab = getattr(getattr(model, "config", None), "vocab_size", None)
  if vocab is not None and top_k > vocab:
    top_k = 0
  # EOS ids are data, not compile-time constants (-1 never matches a token).
  eos = jnp.asarray(tuple(int(e) for e in eos_ids) or (-1,), jnp.int32)

  # Bucket shapes: extra left padding for the prompt, extra rows to fill the
  # data-parallel axes, and a power-of-two output buffer for the new tokens.
  p_b = bucket_length(p)
  n_b = bucket_length(max_new_tokens)
  dp = _dp_size()
  b_b = -(-batch // dp) * dp
  tokens = jnp.pad(prompt_tokens, ((0, b_b - batch), (p_b - p, 0)), constant_values=pad_id)
  mask = jnp.pad(prompt_mask, ((0, b_b - batch), (p_b - p, 0)))
  size = cache_size or (p_b + n_b)
  if size < p_b + max_new_tokens:
    raise ValueError(f"cache_size={size}: needs at least {p_b + max_new_tokens} slots "
                     f"(bucketed prompt {p_b} + {max_new_tokens} new tokens)")
  ctx = parallel.active_mesh()
  if ctx is not None:
    sharding = parallel.batch_sharding(ctx[0], 2, ctx[1])
    tokens, mask = jax.device_put(tokens, sharding), jax.device_put(mask, sharding)

  graphdef, state = nnx.split(model)
  mesh_key = _mesh_key()
  cache, logits, slots, lengths = _prefill(graphdef, state, tokens, mask, cache_size=size,
                                           cache_dtype=cache_dtype, mesh_key=mesh_key)
  return _Started(graphdef, state, mesh_key, eos, top_k, cache, logits, slots, lengths,
                  prompt_tokens, prompt_mask, batch, n_b)


def sample(model: nnx.Module, prompt_tokens, prompt_mask, *, rng: jax.Array, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           min_new_tokens: int = 0, eos_ids: Sequence[int] = (), pad_id: int = 0,
           stop_at_eos: bool = False, greedy: bool = False,
           cache_size: int | None = None, cache_dtype: Any = None) -> SampleOutput:
  """Generates up to `max_new_tokens` tokens after each left-padded prompt.

  Args:
    model: a decoder following the contract (tokens, positions, mask, cache).
    prompt_tokens: int32 [B, P], LEFT-padded.
    prompt_mask: bool [B, P], True on real prompt tokens.
    rng: a PRNG key (unused when greedy).
    max_new_tokens: number of tokens to generate (exactly this many unless
      `stop_at_eos` ends the loop early; the output is always [B, max_new_tokens]).
    temperature: logits are divided by it before sampling and log-softmax.
    top_k: keep only the k most likely tokens (0: off).
    top_p: nucleus sampling threshold (1.0: off).
    min_new_tokens: EOS cannot be sampled before this many tokens.
    eos_ids: token ids that end a response.
    pad_id: written after the first EOS.
    stop_at_eos: stop once every row has produced an EOS (otherwise always
      generate `max_new_tokens`, as the paper does, and pad afterwards).
    greedy: argmax decoding instead of sampling (log-probs still use
      `temperature`, or 1.0 if it is not positive).
    cache_size: KV cache length (default: bucketed prompt + bucketed new tokens).
    cache_dtype: KV cache dtype (default: the model's).

  Returns:
    A :class:`SampleOutput`.
  """
  s = _start(model, prompt_tokens, prompt_mask, max_new_tokens=max_new_tokens,
             temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=eos_ids, pad_id=pad_id,
             greedy=greedy, cache_size=cache_size, cache_dtype=cache_dtype)
  out, logprobs, _ = _decode(
      s.graphdef, s.state, s.cache, s.logits, s.slots, s.lengths, rng,
      jnp.int32(max_new_tokens), jnp.float32(temperature if temperature > 0 else 1.0),
      jnp.float32(top_p), jnp.int32(min_new_tokens), jnp.int32(pad_id), s.eos,
      max_steps=s.n_b, greedy=bool(greedy), top_k=s.top_k, use_top_p=top_p < 1.0,
      stop_at_eos=bool(stop_at_eos), mesh_key=s.mesh_key)
  out, response_mask, logprobs = _truncate_after_eos(
      out, logprobs, jnp.int32(max_new_tokens), jnp.int32(pad_id), s.eos)
  out = out[:s.batch, :max_new_tokens]
  response_mask = response_mask[:s.batch, :max_new_tokens]
  logprobs = logprobs[:s.batch, :max_new_tokens]
  return SampleOutput(tokens=out, response_mask=response_mask, logprobs=logprobs,
                      prompt_tokens=s.prompt_tokens, prompt_mask=s.prompt_mask)


def sample_stream(model: nnx.Module, prompt_tokens, prompt_mask, *, rng: jax.Array,
                  max_new_tokens: int, chunk_tokens: int = 4, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0,
                  eos_ids: Sequence[int] = (), pad_id: int = 0, greedy: bool = False,
                  cache_size: int | None = None, cache_dtype: Any = None) -> Iterator[np.ndarray]:
  """:func:`sample` in pieces, for showing a response while it is written.

  Yields the next `chunk_tokens` (fewer at the end) new tokens of every row,
  int32 [B, n] on the host, until `max_new_tokens` or until every row has
  produced an EOS. The steps, and their random draws, are those of
  :func:`sample` with the same arguments: the pieces put together are its
  tokens up to the first EOS. The arguments are checked (and the prompt run)
  on the first ``next()``.
  """
  if chunk_tokens < 1:
    raise ValueError(f"chunk_tokens={chunk_tokens}: must be >= 1")
  s = _start(model, prompt_tokens, prompt_mask, max_new_tokens=max_new_tokens,
             temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=eos_ids, pad_id=pad_id,
             greedy=greedy, cache_size=cache_size, cache_dtype=cache_dtype)
  cache, logits, slots = s.cache, s.logits, s.slots
  eos = np.asarray(s.eos)
  done = np.zeros((s.batch,), bool)
  for first in range(0, max_new_tokens, chunk_tokens):
    tokens, cache, logits, slots = _decode_chunk(
        s.graphdef, s.state, cache, logits, slots, s.lengths, rng, jnp.int32(first),
        jnp.int32(max_new_tokens), jnp.float32(temperature if temperature > 0 else 1.0),
        jnp.float32(top_p), jnp.int32(min_new_tokens), jnp.int32(pad_id), s.eos,
        chunk=int(chunk_tokens), greedy=bool(greedy), top_k=s.top_k, use_top_p=top_p < 1.0,
        mesh_key=s.mesh_key)
    piece = np.asarray(jax.device_get(tokens))[:s.batch, :min(chunk_tokens,
                                                               max_new_tokens - first)]
    yield piece
    done |= np.isin(piece, eos).any(axis=1)
    if done.all():
      return


# --- scoring given sequences -------------------------------------------------

def _chunked_logprobs(model, hidden, targets, temperature, chunk, return_entropy):
  """log p(targets) (and entropy) from hidden states [B, L, D], `chunk` positions at a time."""
  b, length, d = hidden.shape
  chunk = max(1, min(chunk, length))
  n = -(-length // chunk)
  pad = n * chunk - length
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  h = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
  t = targets.reshape(b, n, chunk).swapaxes(0, 1)

  # Rematerialised: the backward pass recomputes each chunk's logits instead of
  # keeping [B, L, V] alive.
  @jax.checkpoint
  def one(h_c, t_c):
    logits = model.logits_from_hidden(h_c).astype(jnp.float32) / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, t_c[..., None], axis=-1)[..., 0]
    if return_entropy:
      return picked, -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return picked, jnp.zeros_like(picked)

  if n == 1:
    picked, ent = one(h[0], t[0])
    picked, ent = picked[None], ent[None]
  else:
    picked, ent = jax.lax.map(lambda xs: one(*xs), (h, t))
  picked = picked.swapaxes(0, 1).reshape(b, n * chunk)[:, :length]
  ent = ent.swapaxes(0, 1).reshape(b, n * chunk)[:, :length]
  return picked, ent


def _response_sums(picked, entropy, response_mask, return_entropy):
  """Per-row sum of the response tokens' log-probs (and their mean entropy)."""
  weights = response_mask.astype(jnp.float32)
  logp = jnp.sum(picked * weights, axis=-1)
  if return_entropy:
    count = jnp.maximum(jnp.sum(weights, axis=-1), 1.0)
    return logp, jnp.sum(entropy * weights, axis=-1) / count
  return logp


def token_logprobs(model: nnx.Module, tokens: jax.Array, mask: jax.Array, *,
                   temperature: float = 1.0, return_entropy: bool = False,
                   chunk_size: int = 128):
  """Per-token log p(tokens[:, t] | tokens[:, :t]) with one causal forward.

  Positions come from the mask (padding does not shift them), so a left-padded
  prompt followed by a right-padded response scores exactly like sampling.
  The value is 0 at t = 0, wherever ``mask`` is False, and where the previous
  token is padding (no real context to predict from). Traceable: call it
  inside a jitted step (or use :func:`token_logprobs_jit`).

  Returns:
    float32 [B, L] log-probs, and float32 [B, L] entropies (same zeros) when
    `return_entropy`.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  mask = jnp.asarray(mask, bool)
  hidden, _ = model(tokens, positions_from_mask(mask), causal_padding_mask(mask), None,
                    return_hidden=True)
  picked, ent = _chunked_logprobs(model, hidden[:, :-1], tokens[:, 1:], temperature, chunk_size,
                                  return_entropy)
  valid = mask[:, 1:] & mask[:, :-1]
  zero = jnp.zeros_like(picked[:, :1])
  logp = jnp.concatenate([zero, jnp.where(valid, picked, 0.0)], axis=1)
  if return_entropy:
    return logp, jnp.concatenate([zero, jnp.where(valid, ent, 0.0)], axis=1)
  return logp


@nnx.jit(static_argnames=("temperature", "return_entropy", "chunk_size"))
def token_logprobs_jit(model, tokens, mask, *, temperature=1.0, return_entropy=False,
                       chunk_size=128):
  """:func:`token_logprobs` compiled (for use outside a jitted step)."""
  TRACE_COUNTS["token_logprobs"] += 1
  return token_logprobs(model, tokens, mask, temperature=temperature,
                        return_entropy=return_entropy, chunk_size=chunk_size)


def sequence_logprobs(model: nnx.Module, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                      response_tokens: jax.Array, response_mask: jax.Array, *,
                      temperature: float = 1.0, return_entropy: bool = False,
                      chunk_size: int = 128):
  """Sum of masked response-token log-probs given the prompt, [B].

  Only the response positions go through the output head. With
  `return_entropy`, also the mean token entropy over each response, [B].
  """
  prompt_mask = jnp.asarray(prompt_mask, bool)
  response_mask = jnp.asarray(response_mask, bool)
  tokens = jnp.concatenate([jnp.asarray(prompt_tokens, jnp.int32),
                            jnp.asarray(response_tokens, jnp.int32)], axis=1)
  mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
  p, n = prompt_tokens.shape[1], response_tokens.shape[1]
  hidden, _ = model(tokens, positions_from_mask(mask), causal_padding_mask(mask), None,
                    return_hidden=True)
  # Hidden state at t predicts token t + 1: positions p-1 .. p+n-2 predict the response.
  picked, ent = _chunked_logprobs(model, hidden[:, p - 1:p + n - 1], tokens[:, p:], temperature,
                                  chunk_size, return_entropy)
  return _response_sums(picked, ent, response_mask, return_entropy)


def grouped_causal_mask(prompt_mask: jax.Array, response_mask: jax.Array) -> jax.Array:
  """bool [B, P + G*N, P + G*N] for rows [prompt | response_1 | ... | response_G].

  `response_mask` is [B, G, N]. Prompt queries see the real prompt keys before
  them; response g sees the real prompt and its own real tokens before it, never
  another response. Every query also sees itself, as in
  :func:`causal_padding_mask`, so no softmax row is empty.
  """
  b, groups, n = response_mask.shape
  p = prompt_mask.shape[1]
  valid = jnp.concatenate([prompt_mask, response_mask.reshape(b, groups * n)], axis=1)
  segment = jnp.concatenate([jnp.zeros((p,), jnp.int32),
                             jnp.repeat(jnp.arange(1, groups + 1, dtype=jnp.int32), n)])
  length = p + groups * n
  visible = jnp.tril(jnp.ones((length, length), dtype=bool))
  visible &= (segment[None, :] == 0) | (segment[None, :] == segment[:, None])
  return (visible[None] & valid[:, None, :]) | jnp.eye(length, dtype=bool)[None]


def grouped_sequence_logprobs(model: nnx.Module, prompt_tokens: jax.Array,
                              prompt_mask: jax.Array, response_tokens: jax.Array,
                              response_mask: jax.Array, *, group_size: int,
                              temperature: float = 1.0, return_entropy: bool = False,
                              chunk_size: int = 128):
  """:func:`sequence_logprobs` for rows that share their prompt in groups, each prompt run once.

  Rows are prompt-major: rows i*G .. i*G+G-1 (G = `group_size`) carry the same
  prompt (only the first row's is read). Each group becomes one packed row
  ``[prompt | response_1 | ... | response_G]`` in which every response attends
  to the shared prompt keys/values and to its own past, at the positions it has
  after the prompt alone: the same log-probs as the unpacked rows, with the
  prompt computed (and differentiated) once instead of G times.
  """
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  response_tokens = jnp.asarray(response_tokens, jnp.int32)
  prompt_mask = jnp.asarray(prompt_mask, bool)
  response_mask = jnp.asarray(response_mask, bool)
  rows, p = prompt_tokens.shape
  n = response_tokens.shape[1]
  if rows % group_size:
    raise ValueError(f"group_size={group_size}: does not divide the {rows} rows")
  num_groups = rows // group_size
  prompt = prompt_tokens.reshape(num_groups, group_size, p)[:, 0]
  prompt_valid = prompt_mask.reshape(num_groups, group_size, p)[:, 0]
  response_valid = response_mask.reshape(num_groups, group_size, n)
  tokens = jnp.concatenate([prompt, response_tokens.reshape(num_groups, group_size * n)], axis=1)
  # Each response continues the prompt's positions, as if it followed it alone.
  prompt_len = jnp.sum(prompt_valid.astype(jnp.int32), axis=1)
  response_positions = jnp.maximum(
      prompt_len[:, None, None] + jnp.cumsum(response_valid.astype(jnp.int32), axis=-1) - 1, 0)
  positions = jnp.concatenate([positions_from_mask(prompt_valid),
                               response_positions.reshape(num_groups, group_size * n)], axis=1)
  hidden, _ = model(tokens, positions, grouped_causal_mask(prompt_valid, response_valid), None,
                    return_hidden=True)
  # Token j of response g is predicted by the last prompt slot (j = 0) or by
  # the response's own previous slot.
  starts = p + n * jnp.arange(group_size)[:, None] + jnp.arange(n)[None, :] - 1
  source = jnp.where(jnp.arange(n)[None, :] == 0, p - 1, starts).reshape(-1)
  hidden = hidden[:, source].reshape(rows, n, hidden.shape[-1])
  picked, ent = _chunked_logprobs(model, hidden, response_tokens, temperature, chunk_size,
                                  return_entropy)
  return _response_sums(picked, ent, response_mask, return_entropy)


def reference_token_logprobs(reference, model: nnx.Module, tokens, mask, *,
                             temperature: float = 1.0, chunk_size: int = 128):
  """Per-token log-probs under a :class:`models.finetune.ReferencePolicy`, no gradient."""
  return reference.apply(token_logprobs, model, tokens, mask, temperature=temperature,
                         chunk_size=chunk_size)


def reference_sequence_logprobs(reference, model: nnx.Module, prompt_tokens, prompt_mask,
                                response_tokens, response_mask, *, temperature: float = 1.0,
                                chunk_size: int = 128):
  """Sequence log-probs [B] under a :class:`models.finetune.ReferencePolicy`, no gradient."""
  return reference.apply(sequence_logprobs, model, prompt_tokens, prompt_mask, response_tokens,
                         response_mask, temperature=temperature, chunk_size=chunk_size)
