"""Low-rank adapters and the switch that turns them off for the reference model.

An adapter adds ``(x @ A) @ B * alpha / rank`` to a linear layer's output. B
starts at zero, so a freshly adapted model computes exactly the base model.
Adapter weights are ``nnx.LoRAParam`` (a subclass of ``nnx.Param``), which lets
the optimizer train them alone. The reference model of the RL objective is the
same network traced with adapters off (:func:`adapters_off`), so no second copy
of the base weights exists.

:func:`apply_lora` attaches adapters to the named linear layers of a model and
:func:`merge_lora` folds them back into dense kernels (for export).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Sequence

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


LORA_INITS = ("peft", "he_uniform")


def lora_a_bound(fan_in: int, init: str = "peft") -> float:
  """Half-width of the uniform init of A.

  peft: torch's kaiming-uniform with a=sqrt(5), i.e. 1/sqrt(fan_in) (the
  authors' setting); he_uniform: sqrt(6/fan_in), 2.45x wider.
  """
  if init == "peft":
    return 1.0 / fan_in ** 0.5
  if init == "he_uniform":
    return (6.0 / fan_in) ** 0.5
  raise ValueError(f"encoder.lora_init={init!r}: expected one of {', '.join(LORA_INITS)}")


class LoRA(nnx.Module):
  """The adapter of one linear layer: in_features -> rank -> out_features."""

  def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
               dropout: float = 0.0, axes: tuple = (None, None),
               param_dtype=jnp.float32, init: str = "peft", rngs: nnx.Rngs):
    if rank < 1:
      raise ValueError(f"lora.rank={rank}: must be >= 1")
    self.rank = rank
    self.scale = alpha / rank
    bound = lora_a_bound(in_features, init)
    a = jax.random.uniform(rngs.params(), (in_features, rank), param_dtype, -bound, bound)
    self.lora_a = nnx.LoRAParam(a,
                                out_sharding=(axes[0], "lora_rank"))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), param_dtype),
                                out_sharding=("lora_rank", axes[1]))
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.dropout is not None:
      x = self.dropout(x)
    a = self.lora_a[...].astype(x.dtype)
    b = self.lora_b[...].astype(x.dtype)
    return low_rank_product(x, a, b, self.scale)

  def delta(self) -> jax.Array:
    """The dense weight update this adapter represents, [in, out]."""
    return self.lora_a[...] @ self.lora_b[...] * self.scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def low_rank_product(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``(x @ a) @ b * scale`` for x [..., in], a [in, r], b [r, out].

  The gradient is written out by hand so that every product is a plain
  row-major matmul and the scale only ever touches rank-sized tensors. The
  automatic transpose scaled the [..., out] cotangent and contracted over the
  token axis of transposed operands, which on CPU cost a full-size copy and a
  slow fallback matmul per adapter: about 4x the adapter's own work.
  """
  return _low_rank_fwd(x, a, b, scale)[0]


def _low_rank_fwd(x, a, b, scale):
  u = (x @ a) * jnp.asarray(scale, x.dtype)
  return u @ b, (x, u, a, b)


def _low_rank_bwd(scale, residuals, dy):
  x, u, a, b = residuals
  x2 = x.reshape(-1, x.shape[-1])
  u2 = u.reshape(-1, u.shape[-1])
  dy2 = dy.reshape(-1, dy.shape[-1])
  du = (dy2 @ b.T) * jnp.asarray(scale, dy.dtype)  # [tokens, r]
  da = (du.T @ x2).T  # [r, tokens] @ [tokens, in]: both operands row-major
  db = u2.T @ dy2
  dx = (du @ a.T).reshape(x.shape)
  return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


low_rank_product.defvjp(_low_rank_fwd, _low_rank_bwd)


# Target name -> attribute name of the linear layer inside a block.
TARGET_LAYERS = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj", "lm_head": "lm_head",
}


def _linears(model: nnx.Module):
  """(path, module) of every module with a kernel and an ``add_lora`` method."""
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and hasattr(node, "add_lora") and hasattr(node, "kernel"):
      yield path, node


def apply_lora(model: nnx.Module, *,
               targets: Sequence[str] = ("q", "k", "v", "o", "gate", "up", "down", "lm_head"),
               rank: int, alpha: float, dropout: float = 0.0, init: str = "peft",
               rngs: nnx.Rngs) -> list[str]:
  """Adds a LoRA adapter to every linear layer named by `targets`, in place.

  B starts at zero, so the model's outputs are unchanged until training.
  A model with tied embeddings has no ``lm_head`` layer: that target is
  skipped with a warning. Returns the '/'-joined paths of the adapted layers.
  """
  unknown = sorted(set(targets) - set(TARGET_LAYERS))
  if unknown:
    raise ValueError(f"lora.targets: unknown {unknown}; expected names from {sorted(TARGET_LAYERS)}")
  if rank < 1:
    raise ValueError(f"lora.rank={rank}: must be >= 1")
  lora_a_bound(1, init)  # rejects an unknown init before any layer changes
  wanted = {TARGET_LAYERS[t] for t in targets}
  adapted = []
  for path, linear in list(_linears(model)):
    if path and path[-1] in wanted:
      if linear.lora is not None:
        raise ValueError(f"apply_lora: {'/'.join(map(str, path))} already has an adapter")
      linear.add_lora(rank=rank, alpha=alpha, dropout=dropout, init=init, rngs=rngs)
      adapted.append("/".join(map(str, path)))
  if "lm_head" in targets and not any(p == "lm_head" for p in adapted):
    if not hasattr(model, "head_lora"):
      raise ValueError("lora.targets has 'lm_head' but the model has no output head layer")
    if model.head_lora is not None:
      raise ValueError("apply_lora: head_lora already has an adapter")
    # Tied embeddings: the adapter acts on the output projection only.
    table = model.embedder.embedding
    vocab, embed_dim = table.get_value().shape
    model.head_lora = nnx.data(LoRA(embed_dim, vocab, rank=rank, alpha=alpha, dropout=dropout,
                                    axes=("embed", "vocab"),
                                    param_dtype=table.get_value().dtype, init=init,
                                    rngs=rngs))
    adapted.append("head_lora")
  missing = {t for t in targets if t != "lm_head"
             and not any(p.endswith("/" + TARGET_LAYERS[t]) for p in adapted)}
  if missing:
    raise ValueError(f"lora.targets: no layer found for {sorted(missing)}")
  return adapted


def adapter_sites(paths) -> list[str]:
  """'/'-joined paths of the layers holding an adapter, from a model's state paths.

  `paths`: the keys of ``nnx.to_flat_state(nnx.state(model))`` (shapes suffice).
  The names are those :func:`apply_lora` returns, so a report built from shapes
  alone states what training adapts (``head_lora``: the tied output head's).
  """
  sites = []
  for path in paths:
    names = [str(p) for p in path]
    if names and names[-1] == "lora_a":
      sites.append("/".join(names[:-2] if names[-2:-1] == ["lora"] else names[:-1]))
  return sites


def merge_lora(model: nnx.Module) -> int:
  """Folds every adapter into its dense kernel and removes it, in place.

  Returns the number of merged adapters. Afterwards the model computes the
  same function (up to rounding) without any ``nnx.LoRAParam``.
  """
  merged = 0
  for _, linear in list(_linears(model)):
    if linear.lora is None:
      continue
    kernel = linear.kernel.get_value()
    delta = linear.lora.delta().astype(jnp.float32)
    linear.kernel.set_value((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
    linear.lora = nnx.data(None)
    merged += 1
  if getattr(model, "head_lora", None) is not None:
    raise ValueError("merge_lora: the adapter of a tied output head cannot be merged into the "
                     "shared embedding; export writes it as an untied lm_head instead")
  return merged
