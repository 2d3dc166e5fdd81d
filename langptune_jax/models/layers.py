"""Building blocks shared by every model family, with logical axis names.

Kernels are stored ``[in, out]`` so that ``y = x @ W``. Logical axis names on
every parameter let :mod:`langptune_jax.parallel` shard them.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from langptune_jax import parallel
from langptune_jax.models import lora as lora_lib

Initializer = Callable[..., jax.Array]


def default_init(stddev: float = 0.02) -> Initializer:
  return jax.nn.initializers.normal(stddev)


class Linear(nnx.Module):
  """y = x @ W (+ b), with an optional LoRA adapter (see :mod:`models.lora`)."""

  def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
               use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
               init: Initializer | None = None, rngs: nnx.Rngs):
    init = init or default_init()
    self.in_features, self.out_features = in_features, out_features
    self.axes = tuple(axes)
    self.dtype = dtype
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype),
                            out_sharding=self.axes)
    self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), out_sharding=(self.axes[1],))
                 if use_bias else None)
    self.lora: lora_lib.LoRA | None = nnx.data(None)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = x @ self.kernel[...].astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora is not None and lora_lib.adapters_enabled():
      y = y + self.lora(x)
    return y

  def add_lora(self, *, rank: int, alpha: float, dropout: float = 0.0, init: str = "peft",
               rngs: nnx.Rngs):
    self.lora = nnx.data(lora_lib.LoRA(self.in_features, self.out_features, rank=rank, alpha=alpha,
                              dropout=dropout, axes=self.axes, init=init,
                              param_dtype=self.kernel.get_value().dtype, rngs=rngs))


class Embed(nnx.Module):
  """Token embedding table [vocab, embed]; `attend` reuses it as a tied output head."""

  def __init__(self, num_embeddings: int, features: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, init: Initializer | None = None, rngs: nnx.Rngs):
    init = init or default_init()
    self.dtype = dtype
    self.embedding = nnx.Param(init(rngs.params(), (num_embeddings, features), param_dtype),
                               out_sharding=("vocab", "embed"))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    table = self.embedding[...].astype(self.dtype)
    return parallel.constrain(jnp.take(table, tokens, axis=0),
                              ("activation_batch", "length", "embed"))

  def attend(self, x: jax.Array) -> jax.Array:
    return x.astype(self.dtype) @ self.embedding[...].astype(self.dtype).T


class RMSNorm(nnx.Module):
  """RMSNorm; Gemma stores the scale as ``w`` and multiplies by ``1 + w``."""

  def __init__(self, features: int, *, eps: float = 1e-6, one_plus: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs
    self.eps, self.one_plus, self.dtype = eps, one_plus, dtype
    init = jnp.zeros if one_plus else jnp.ones
    self.scale = nnx.Param(init((features,), param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    # Normalise in float32 whatever the compute dtype, as the references do.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    if self.one_plus:
      scale = 1.0 + scale
    return (xf * scale).astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias (BERT)."""

  def __init__(self, features: int, *, eps: float = 1e-12, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs
    self.eps, self.dtype = eps, dtype
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def checkpointed_call(fn: Callable, module: nnx.Module, *args, policy=None):
  """``fn(module, *args)`` whose activations are recomputed in the backward pass.

  The module is split into a graph definition and a state and the call runs
  under ``jax.checkpoint`` as a pure function of that state. Unlike
  ``nnx.remat`` this writes nothing back into the module, so it also works
  when the module's parameters are tracers of an enclosing transformation
  (e.g. a model merged inside ``jax.grad``). Modules called this way must
  not mutate their state (no dropout RNG streams).
  """
  graphdef, state = nnx.split(module)

  def pure(state, *args):
    return fn(nnx.merge(graphdef, state), *args)

  if policy is not None:
    return jax.checkpoint(pure, policy=policy)(state, *args)
  return _recompute_after_cotangent(pure)(state, *args)


def _recompute_after_cotangent(pure: Callable) -> Callable:
  """`pure` saving only its inputs; the backward pass recomputes it once its cotangent exists.

  ``jax.checkpoint`` leaves the order of recomputation to the compiler, and one
  that is not memory-aware (XLA:CPU) recomputes every layer before the first
  backward step, keeping all activations alive at once. Tying the inputs to the
  incoming cotangent with an optimization barrier makes each layer's
  recomputation wait for its own backward step on every backend.
  """
  def forward(state, *args):
    # The layer's weights are gathered once its input exists, not all at the start.
    if _weights_sharded():
      state = _after(state, args[:1])
    return pure(state, *args)

  @jax.custom_vjp
  def call(*primals):
    return forward(*primals)

  def fwd(*primals):
    return forward(*primals), primals

  def bwd(primals, cotangent):
    primals, cotangent = jax.lax.optimization_barrier((primals, cotangent))
    primals = _after(primals, cotangent)
    _, vjp = jax.vjp(pure, *primals)
    return vjp(cotangent)

  call.defvjp(fwd, bwd)
  return call


def _after(tree, other):
  """`tree` unchanged in value, but computed after `other`.

  On TPU/GPU an optimization barrier does this. XLA:CPU drops barriers before
  it schedules, so there (where `plan` compiles) a true data dependency
  stands in: zero times one element of `other`, added to every float leaf
  (NaN only if `other` is already non-finite).
  """
  if jax.default_backend() != "cpu":
    return jax.lax.optimization_barrier((tree, other))[0]
  leaves = [x for x in jax.tree.leaves(other) if jnp.issubdtype(x.dtype, jnp.floating)]
  if not leaves:
    return tree
  zero = jnp.zeros((), jnp.float32) * leaves[0].reshape(-1)[0].astype(jnp.float32)

  def tie(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return x + zero.astype(x.dtype)

  return jax.tree.map(tie, tree)


def ordered_call(fn: Callable, module: nnx.Module, *args):
  """``fn(module, *args)`` with the module's weights read only once ``args[0]`` exists.

  With sharded weights this keeps XLA from gathering (or hoisting out of a
  loop) every layer's weights at once: each layer's are gathered when its
  input arrives, so one layer's full weights are live at a time.
  """
  if not _weights_sharded():
    return fn(module, *args)
  graphdef, state = nnx.split(module)
  return fn(nnx.merge(graphdef, _after(state, args[:1])), *args)


def _weights_sharded() -> bool:
  """Whether the trace runs on a multi-device mesh (where weights may need gathering)."""
  active = parallel.active_mesh()
  return active is not None and active[0].size > 1
