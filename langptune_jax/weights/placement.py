"""Builds a module from named host tensors, each put straight into its sharding.

Shared by the safetensors (:mod:`~langptune_jax.weights.hf`) and GGUF
(:mod:`~langptune_jax.weights.gguf`) readers, so neither imports the other's
internals.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from langptune_jax import parallel


def build_module(make: Callable[[], nnx.Module], tensors: Iterable[tuple[str, np.ndarray]], *,
                 source: str, param_dtype=None, mesh: Mesh | None = None,
                 rules: Sequence[tuple[str, Any]] = parallel.DEFAULT_RULES) -> nnx.Module:
  """Creates ``make()`` without allocating it, then fills it from `tensors`.

  `tensors` yields (our parameter path like 'layers/0/attn/q_proj/kernel', array
  already in our layout). Every parameter must be provided exactly once; with
  a mesh each array goes straight into its sharding.
  """
  abstract = nnx.eval_shape(make)
  graphdef, state = nnx.split(abstract)
  shardings = parallel.state_shardings(state, mesh, rules) if mesh is not None else None
  variables = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
  targets = ({"/".join(map(str, p)): v for p, v in nnx.to_flat_state(shardings)}
             if shardings is not None else {})
  filled: set[str] = set()
  for key, array in tensors:
    var = variables.get(key)
    if var is None:
      raise ValueError(f"{source}: tensor for {key!r} has no matching parameter")
    expected = var.get_value()
    if tuple(np.shape(array)) != tuple(expected.shape):
      raise ValueError(f"{source}: tensor for {key} has shape {tuple(np.shape(array))}, "
                       f"expected {tuple(expected.shape)}")
    dtype = param_dtype or expected.dtype
    host = np.asarray(array).astype(dtype)
    if mesh is not None:
      sharding = targets[key].get_value()
      value = jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
    else:
      value = jnp.asarray(host)
    var.set_value(value)
    filled.add(key)
  missing = sorted(set(variables) - filled)
  if missing:
    raise ValueError(f"{source}: no tensor for parameter {missing[0]}"
                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  return nnx.merge(graphdef, state)
