"""One decoder-only transformer for the Llama and Gemma (1/2/3) families.

The families differ only in configuration: normalisation convention, MLP
activation, embedding scale, extra post-norms, soft-capping, sliding-window
layers, qk-norm and rotary settings. :class:`DecoderConfig` holds those
switches and :class:`Decoder` implements all of them.

Attention masks are built by the caller (causal + padding), as a boolean
``[B, T, S]`` array; sliding-window layers add their window restriction from
position differences (slot indices when a cache is used), so packed rows whose
segments share one prefix (see ``sampling.grouped_sequence_logprobs``) work. Rotary angles come only from ``positions`` so left-padded batches
work. An optional KV cache (see :meth:`Decoder.init_cache`) supports prefill
followed by token-by-token decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from langptune_jax import parallel
from langptune_jax.models import attention as attention_lib
from langptune_jax.models import layers
from langptune_jax.models import lora as lora_lib

FAMILIES = ("llama", "gemma", "gemma2", "gemma3")
ACTIVATIONS = ("silu", "gelu_tanh")
REMAT_POLICIES = ("none", "full", "dots")
# Attention kernel of the scoring/training forwards (no cache): the hand-written
# masked attention (tuned for XLA:CPU), or jax.nn.dot_product_attention with
# XLA's or cuDNN's implementation. 'cudnn' off a GPU falls back to 'masked'.
ATTENTION_IMPLS = ("masked", "xla", "cudnn")

Cache = dict[str, Any]


def _as_dtype(value) -> jnp.dtype:
  return jnp.dtype(value)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Every switch of the decoder. Build with ``llama.config_from_hf`` etc."""

  family: str
  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  norm_eps: float = 1e-6
  rope_theta: float = 10_000.0
  rope_local_theta: float | None = None  # gemma3 local (sliding) layers
  # Llama-3 scaling {'rope_type': 'llama3', 'factor', 'low_freq_factor',
  # 'high_freq_factor', 'original_max_position_embeddings'} or linear
  # {'rope_type': 'linear', 'factor'}; stored as sorted (key, value) pairs so
  # the config stays hashable (usable as a static jit argument).
  rope_scaling: Any = None
  tie_embeddings: bool = True
  act: str = "silu"
  norm_one_plus: bool = False
  embed_scale: bool = False
  post_norms: bool = False
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None  # 'global' | 'local' per layer
  query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5
  qk_norm: bool = False
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  remat: str = "none"
  attention_impl: str = "masked"  # one of ATTENTION_IMPLS
  bos_id: int | None = None
  eos_ids: tuple[int, ...] = ()
  pad_id: int | None = None
  max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"DecoderConfig.family={self.family!r}: expected one of {FAMILIES}")
    if self.act not in ACTIVATIONS:
      raise ValueError(f"DecoderConfig.act={self.act!r}: expected one of {ACTIVATIONS}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"DecoderConfig.remat={self.remat!r}: expected one of {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"DecoderConfig.attention_impl={self.attention_impl!r}: expected one of "
                       f"{ATTENTION_IMPLS}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"DecoderConfig.num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
    layer_types = self.layer_types or ("global",) * self.num_layers
    layer_types = tuple(layer_types)
    if len(layer_types) != self.num_layers or set(layer_types) - {"global", "local"}:
      raise ValueError(f"DecoderConfig.layer_types={layer_types}: need {self.num_layers} "
                       "entries of 'global'/'local'")
    if "local" in layer_types and not self.sliding_window:
      raise ValueError("DecoderConfig.sliding_window must be set when layer_types has 'local'")
    object.__setattr__(self, "layer_types", layer_types)
    object.__setattr__(self, "eos_ids", tuple(self.eos_ids or ()))

  @property
  def rope_scaling_dict(self) -> dict | None:
    return dict(self.rope_scaling) if self.rope_scaling else None

  @property
  def compute_dtype(self) -> jnp.dtype:
    return _as_dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return _as_dtype(self.param_dtype)

  @property
  def attn_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def replace(self, **kwargs) -> "DecoderConfig":
    return dataclasses.replace(self, **kwargs)


# --- rotary embeddings -------------------------------------------------------

def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> jax.Array:
  """Inverse frequencies [head_dim // 2], with optional linear/llama3 scaling."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if not scaling:
    return inv_freq
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return inv_freq
  if kind == "linear":
    return inv_freq / float(scaling["factor"])
  if kind == "llama3":
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band in
    # between interpolated smoothly.
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)
  raise ValueError(f"rope_scaling.rope_type={kind!r}: only 'default', 'linear' and 'llama3' "
                   "are supported")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Split-half rotary embedding of x [B, T, H, Dh] at positions [B, T]."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


# Logical axes of a KV cache tensor (and of keys/values inside attention).
KV_AXES = ("activation_batch", "kv_heads", "kv_length", "head_dim")


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if not cap else jnp.tanh(x / cap) * cap


# --- modules -----------------------------------------------------------------

class Attention(nnx.Module):
  """Multi-head attention with grouped KV heads, RoPE and an optional cache."""

  def __init__(self, config: DecoderConfig, layer_type: str, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.is_local = layer_type == "local"
    kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype, rngs=rngs)
    self.q_proj = layers.Linear(c.embed_dim, c.num_heads * c.head_dim, axes=("embed", "q_heads"),
                                **kw)
    self.k_proj = layers.Linear(c.embed_dim, c.num_kv_heads * c.head_dim,
                                axes=("embed", "kv_heads"), **kw)
    self.v_proj = layers.Linear(c.embed_dim, c.num_kv_heads * c.head_dim,
                                axes=("embed", "kv_heads"), **kw)
    self.o_proj = layers.Linear(c.num_heads * c.head_dim, c.embed_dim, axes=("q_heads", "embed"),
                                **kw)
    if c.qk_norm:
      norm_kw = dict(eps=c.norm_eps, one_plus=c.norm_one_plus, dtype=c.compute_dtype,
                     param_dtype=c.weight_dtype)
      self.q_norm = layers.RMSNorm(c.head_dim, **norm_kw)
      self.k_norm = layers.RMSNorm(c.head_dim, **norm_kw)
    else:
      self.q_norm = self.k_norm = None
    if self.is_local and c.family == "gemma3":
      theta, scaling = c.rope_local_theta or 10_000.0, None  # local layers are never scaled
    else:
      theta, scaling = c.rope_theta, c.rope_scaling
    self.rope_theta = theta
    self.rope_scaling = scaling  # hashable (key, value) pairs or None

  def __call__(self, x: jax.Array, positions: jax.Array, attention_mask: jax.Array,
               layer_cache: Cache | None, end_index: jax.Array | None):
    c = self.config
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
    k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
    q = parallel.constrain(q, ("activation_batch", "length", "heads", "head_dim"))
    k = parallel.constrain(k, ("activation_batch", "length", "kv_heads", "head_dim"))
    v = parallel.constrain(v, ("activation_batch", "length", "kv_heads", "head_dim"))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = rope_inv_freq(c.head_dim, self.rope_theta,
                             dict(self.rope_scaling) if self.rope_scaling else None)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)

    fused = self._fused_impl(layer_cache, t)
    if fused is not None:
      return self._fused_attention(q, k, v, attention_mask, positions, fused), None

    # Keys and values as [B, K, S, D]: each (row, head) is one contiguous [S, D]
    # matrix, the layout both attention matmuls read without re-laying out the
    # cache (a [B, S, K, D] cache was transposed whole at every decode step).
    k = parallel.constrain(k.transpose(0, 2, 1, 3), KV_AXES)
    v = parallel.constrain(v.transpose(0, 2, 1, 3), KV_AXES)
    new_cache = None
    if layer_cache is not None:
      start = (0, 0, end_index, 0)
      k_all = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype),
                                           start)
      v_all = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype),
                                           start)
      k_all, v_all = parallel.constrain(k_all, KV_AXES), parallel.constrain(v_all, KV_AXES)
      new_cache = {"k": k_all, "v": v_all}
      k, v = k_all.astype(c.compute_dtype), v_all.astype(c.compute_dtype)
      q_slots = end_index + jnp.arange(t)
    else:
      q_slots = jnp.arange(t)
    s = k.shape[2]

    groups = c.num_heads // c.num_kv_heads
    mask = attention_mask.astype(bool)
    if mask.shape != (b, t, s):
      raise ValueError(f"attention_mask shape {mask.shape}: expected {(b, t, s)}")
    if self.is_local and layer_cache is None:
      # Distance in positions: exact for packed rows whose segments continue a
      # shared prefix; the same as slots for one left-padded sequence.
      distance = positions[:, :, None] - positions[:, None, :]
      mask = mask & (distance < c.sliding_window)
    elif self.is_local:
      distance = q_slots[:, None] - jnp.arange(s)[None, :]
      mask = mask & (distance < c.sliding_window)[None]
    # Queries as [B, K, G*T, D]: each key/value head's G query heads stacked,
    # so both matmuls are [B, K]-batched products of row-major operands
    # (einsum's operand order led XLA:CPU to a slow transposed-V product).
    q = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(b, c.num_kv_heads, groups * t, c.head_dim)
    if t == 1:
      out = self._decode_step_attention(q, k, v, mask)
    elif c.attn_logit_softcap:
      out = self._softcapped_attention(q, k, v, mask)
    elif layer_cache is None:  # queries and keys are the same T slots
      causal = jnp.arange(s)[None, :] <= q_slots[:, None]  # a causal LM, whatever the mask says
      out = attention_lib.causal_attention(q, k, v, mask & causal[None], c.attn_scale,
                                           num_chunks=min(4, t // 64))
    else:
      out = attention_lib.masked_attention(q, k, v, mask, c.attn_scale)
    out = out.reshape(b, c.num_kv_heads, groups, t, c.head_dim).transpose(0, 3, 1, 2, 4)
    out = out.reshape(b, t, c.num_heads, c.head_dim)
    out = parallel.constrain(out, ("activation_batch", "length", "heads", "head_dim"))
    out = self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim))
    return out, new_cache

  def _fused_impl(self, layer_cache, t) -> str | None:
    """The jax.nn.dot_product_attention implementation to use, or None for our own kernels."""
    impl = self.config.attention_impl
    if impl == "masked" or layer_cache is not None or t == 1 or self.config.attn_logit_softcap:
      return None
    if impl == "cudnn" and jax.default_backend() != "gpu":
      return None
    return impl

  def _fused_attention(self, q, k, v, attention_mask, positions, impl):
    """[B, T, H, D] queries over the same T keys, by jax.nn.dot_product_attention."""
    c = self.config
    b, t = q.shape[:2]
    mask = attention_mask.astype(bool)
    if mask.shape != (b, t, t):
      raise ValueError(f"attention_mask shape {mask.shape}: expected {(b, t, t)}")
    mask &= jnp.tril(jnp.ones((t, t), bool))[None]  # a causal LM, whatever the mask says
    if self.is_local:
      mask &= (positions[:, :, None] - positions[:, None, :]) < c.sliding_window
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=c.attn_scale,
                                       implementation=impl)
    out = parallel.constrain(out, ("activation_batch", "length", "heads", "head_dim"))
    return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim))

  def _decode_step_attention(self, q, k, v, mask):
    """One query per row: products and sums beat B*K tiny matmuls on CPU."""
    c = self.config
    logits = jnp.sum(q[:, :, :, None, :].astype(jnp.float32) *
                     k[:, :, None, :, :].astype(jnp.float32), axis=-1) * c.attn_scale
    probs = self._masked_softmax(logits, mask)
    return jnp.sum(probs[..., None] * v[:, :, None, :, :], axis=-2)  # [B, K, G, D]

  def _softcapped_attention(self, q, k, v, mask):
    """Gemma 2's soft-capped scores, differentiated by autodiff."""
    c = self.config
    batch_dims = ((0, 1), (0, 1))
    logits = jax.lax.dot_general(q, k, (((3,), (3,)), batch_dims),
                                 preferred_element_type=jnp.float32) * c.attn_scale
    probs = self._masked_softmax(logits, mask)
    return jax.lax.dot_general(probs, v, (((3,), (2,)), batch_dims))

  def _masked_softmax(self, logits, mask):
    """[B, K, G*T, S] float32 scores -> soft-capped, masked probabilities."""
    logits = attention_lib.masked_scores(_softcap(logits, self.config.attn_logit_softcap), mask)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.config.compute_dtype)
    b, kv_heads, groups, t, s = probs.shape
    return probs.reshape(b, kv_heads, groups * t, s)


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) * up(x))."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype, rngs=rngs)
    self.act = c.act
    self.gate_proj = layers.Linear(c.embed_dim, c.mlp_dim, axes=("embed", "mlp"), **kw)
    self.up_proj = layers.Linear(c.embed_dim, c.mlp_dim, axes=("embed", "mlp"), **kw)
    self.down_proj = layers.Linear(c.mlp_dim, c.embed_dim, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = self.gate_proj(x)
    gate = jax.nn.silu(gate) if self.act == "silu" else jax.nn.gelu(gate, approximate=True)
    h = parallel.constrain(gate * self.up_proj(x), ("activation_batch", "length", "mlp"))
    return self.down_proj(h)


class Block(nnx.Module):
  """Pre-norm residual block; Gemma 2/3 add post-attention and post-MLP norms."""

  def __init__(self, config: DecoderConfig, layer_type: str, *, rngs: nnx.Rngs):
    c = config
    norm = lambda: layers.RMSNorm(c.embed_dim, eps=c.norm_eps, one_plus=c.norm_one_plus,
                                  dtype=c.compute_dtype, param_dtype=c.weight_dtype)
    self.pre_attn_norm = norm()
    self.attn = Attention(c, layer_type, rngs=rngs)
    self.post_attn_norm = norm() if c.post_norms else None
    self.pre_ffw_norm = norm()
    self.mlp = MLP(c, rngs=rngs)
    self.post_ffw_norm = norm() if c.post_norms else None

  def __call__(self, x, positions, attention_mask, layer_cache, end_index):
    h, new_cache = self.attn(self.pre_attn_norm(x), positions, attention_mask, layer_cache,
                             end_index)
    if self.post_attn_norm is not None:
      h = self.post_attn_norm(h)
    x = parallel.constrain(x + h, ("activation_batch", "length", "embed"))
    h = self.mlp(self.pre_ffw_norm(x))
    if self.post_ffw_norm is not None:
      h = self.post_ffw_norm(h)
    x = parallel.constrain(x + h, ("activation_batch", "length", "embed"))
    return x, new_cache


def _run_block(block: Block, x, positions, attention_mask, layer_cache, end_index):
  return block(x, positions, attention_mask, layer_cache, end_index)


class Decoder(nnx.Module):
  """Decoder-only language model; see the module docstring for the contract."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.embedder = layers.Embed(c.vocab_size, c.embed_dim, dtype=c.compute_dtype,
                                 param_dtype=c.weight_dtype, rngs=rngs)
    self.layers = nnx.List([Block(c, c.layer_types[i], rngs=rngs) for i in range(c.num_layers)])
    self.final_norm = layers.RMSNorm(c.embed_dim, eps=c.norm_eps, one_plus=c.norm_one_plus,
                                     dtype=c.compute_dtype, param_dtype=c.weight_dtype)
    self.lm_head = (None if c.tie_embeddings else
                    layers.Linear(c.embed_dim, c.vocab_size, axes=("embed", "vocab"),
                                  dtype=c.compute_dtype, param_dtype=c.weight_dtype, rngs=rngs))
    # With tied embeddings the output head has no layer of its own; a LoRA
    # target 'lm_head' then adds this adapter to the head only (the input
    # embedding lookup is unchanged), as PEFT does on a tied lm_head.
    self.head_lora: lora_lib.LoRA | None = nnx.data(None)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty KV cache of `max_len` slots per row."""
    c = self.config
    dtype = _as_dtype(dtype or c.compute_dtype)
    shape = (batch, c.num_kv_heads, max_len, c.head_dim)  # KV_AXES
    return {"end_index": jnp.zeros((), jnp.int32),
            "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                       for _ in range(c.num_layers)]}

  def embed(self, tokens: jax.Array) -> jax.Array:
    x = self.embedder(tokens)
    if self.config.embed_scale:
      # Scale in the compute dtype (the constant is rounded there too).
      x = x * jnp.asarray(math.sqrt(self.config.embed_dim), x.dtype)
    return x

  def logits_from_hidden(self, h: jax.Array) -> jax.Array:
    """Output head (tied or not) and final soft-cap; float32 [..., V]."""
    if self.lm_head is None:
      logits = self.embedder.attend(h)
      if self.head_lora is not None and lora_lib.adapters_enabled():
        logits = logits + self.head_lora(h.astype(logits.dtype))
    else:
      logits = self.lm_head(h)
    logits = logits.astype(jnp.float32)
    logits = _softcap(logits, self.config.final_logit_softcap)
    if logits.ndim == 3:
      logits = parallel.constrain(logits, ("activation_batch", "length", "vocab"))
    return logits

  def __call__(self, tokens: jax.Array, positions: jax.Array, attention_mask: jax.Array,
               cache: Cache | None = None, *, return_hidden: bool = False):
    c = self.config
    x = self.embed(tokens)
    end_index = cache["end_index"] if cache is not None else None
    run = _run_block
    if c.remat != "none" and cache is None:
      # Recomputation only pays off when gradients flow: never while decoding.
      policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if c.remat == "dots"
                else None)
      run = functools.partial(layers.checkpointed_call, _run_block, policy=policy)
    new_layers = []
    for i, block in enumerate(self.layers):
      layer_cache = cache["layers"][i] if cache is not None else None
      x, layer_new = run(block, x, positions, attention_mask, layer_cache, end_index)
      new_layers.append(layer_new)
    h = self.final_norm(x)
    new_cache = None
    if cache is not None:
      new_cache = {"end_index": cache["end_index"] + tokens.shape[1], "layers": new_layers}
    if return_hidden:
      return h, new_cache
    return self.logits_from_hidden(h), new_cache


# --- helpers for callers and tests -------------------------------------------

def causal_mask(valid: jax.Array, cache_len: int | None = None) -> jax.Array:
  """[B, T, S] causal+padding mask from a [B, T] validity mask (no cache, S=T)."""
  t = valid.shape[1]
  s = cache_len or t
  causal = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
  key_valid = valid if s == t else jnp.pad(valid, ((0, 0), (0, s - t)))
  return causal[None] & key_valid[:, None, :].astype(bool)


def positions_from_mask(valid: jax.Array) -> jax.Array:
  """Positions counting only valid tokens (left padding gets position 0)."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def hf_linear_names(config: DecoderConfig) -> dict[str, tuple[str, bool]]:
  """Our parameter path -> (HF tensor name, transpose?) for the parts all families share.

  HF torch ``Linear`` weights are [out, in]; our kernels are [in, out].
  """
  names = {"embedder/embedding": ("model.embed_tokens.weight", False),
           "final_norm/scale": ("model.norm.weight", False)}
  if not config.tie_embeddings:
    names["lm_head/kernel"] = ("lm_head.weight", True)
  for i in range(config.num_layers):
    ours, hf = f"layers/{i}", f"model.layers.{i}"
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      names[f"{ours}/attn/{proj}/kernel"] = (f"{hf}.self_attn.{proj}.weight", True)
    for proj in ("gate_proj", "up_proj", "down_proj"):
      names[f"{ours}/mlp/{proj}/kernel"] = (f"{hf}.mlp.{proj}.weight", True)
  return names
