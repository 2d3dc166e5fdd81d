"""Low-rank adapters and the switch that turns them off for the reference model.

An adapter adds ``(x @ A) @ B * alpha / rank`` to a linear layer's output. B
starts at zero, so a freshly adapted model computes exactly the base model.
Adapter weights are ``nnx.LoRAParam`` (a subclass of ``nnx.Param``), which lets
the optimizer train them alone. The reference model of the RL objective is the
same network traced with adapters off (:func:`adapters_off`), so no second copy
of the base weights exists.
"""

from __future__ import annotations

import contextlib
import threading

import jax
import jax.numpy as jnp
from flax import nnx

_STATE = threading.local()


def adapters_enabled() -> bool:
  return getattr(_STATE, "enabled", True)


@contextlib.contextmanager
def adapters_off():
  """Within this block (at trace time) every adapter contributes nothing."""
  previous = adapters_enabled()
  _STATE.enabled = False
  try:
    yield
  finally:
    _STATE.enabled = previous


class LoRA(nnx.Module):
  """The adapter of one linear layer: in_features -> rank -> out_features."""

  def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
               dropout: float = 0.0, axes: tuple = (None, None),
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if rank < 1:
      raise ValueError(f"lora.rank={rank}: must be >= 1")
    self.rank = rank
    self.scale = alpha / rank
    init = jax.nn.initializers.he_uniform()  # kaiming-uniform as in common LoRA code
    self.lora_a = nnx.LoRAParam(init(rngs.params(), (in_features, rank), param_dtype),
                                out_sharding=(axes[0], "lora_rank"))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), param_dtype),
                                out_sharding=("lora_rank", axes[1]))
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.dropout is not None:
      x = self.dropout(x)
    a = self.lora_a[...].astype(x.dtype)
    b = self.lora_b[...].astype(x.dtype)
    return (x @ a) @ b * jnp.asarray(self.scale, x.dtype)

  def delta(self) -> jax.Array:
    """The dense weight update this adapter represents, [in, out]."""
    return self.lora_a[...] @ self.lora_b[...] * self.scale
