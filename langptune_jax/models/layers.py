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

  return jax.checkpoint(pure, policy=policy)(state, *args)
