"""Which encoder parameters train, and the frozen reference policy of the RL loss.

Three modes (``config.encoder.training``):

* ``lora``: only adapter weights (``nnx.LoRAParam``) train. The reference policy
  is the same network with adapters switched off, so it costs no memory.
* ``partial``: the top ``num_layers_unfrozen`` blocks, the final norm and the
  untied LM head train; everything else is frozen. The reference policy keeps
  a frozen copy of just those trainable parts and borrows the rest from the
  live model (they are frozen, hence identical).
* ``full``: every parameter trains; the reference keeps a copy of all of them.

:func:`trainable_filter` returns an NNX filter usable as
``nnx.Optimizer(model, tx, wrt=...)`` and with ``nnx.split`` / ``nnx.state``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from langptune_jax.models import lora as lora_lib

MODES = ("lora", "partial", "full")
_TOP_LEVEL_HEAD = ("final_norm", "lm_head")


@dataclasses.dataclass(frozen=True)
class PartialFilter:
  """NNX filter: plain parameters of blocks >= first_layer, the final norm and lm_head.

  Hashable, so it can be a static jit argument or pytree metadata.
  """
  first_layer: int

  def __call__(self, path: tuple, variable: Any) -> bool:
    if not isinstance(variable, nnx.Param) or isinstance(variable, nnx.LoRAParam):
      return False
    if path and path[0] in _TOP_LEVEL_HEAD:
      return True
    return len(path) > 1 and path[0] == "layers" and int(path[1]) >= self.first_layer


def trainable_filter(mode: str, *, num_layers_unfrozen: int = 0, num_layers: int | None = None):
  """The NNX filter selecting the parameters that train in `mode`.

  Args:
    mode: 'lora' | 'partial' | 'full'.
    num_layers_unfrozen: with 'partial', how many top blocks train.
    num_layers: with 'partial', the model's number of blocks.
  """
  if mode == "lora":
    return nnx.LoRAParam
  if mode == "full":
    return nnx.Param
  if mode == "partial":
    if num_layers is None:
      raise ValueError("trainable_filter('partial') needs num_layers (the model's block count)")
    if not 0 <= num_layers_unfrozen <= num_layers:
      raise ValueError(f"encoder.num_layers_unfrozen={num_layers_unfrozen}: must be in "
                       f"[0, {num_layers}]")
    return PartialFilter(first_layer=num_layers - num_layers_unfrozen)
  raise ValueError(f"encoder.training={mode!r}: expected one of {MODES}")


def model_trainable_filter(model: nnx.Module, mode: str, num_layers_unfrozen: int = 0):
  """:func:`trainable_filter` with the block count taken from `model.config`."""
  return trainable_filter(mode, num_layers_unfrozen=num_layers_unfrozen,
                          num_layers=model.config.num_layers)


def count_params(model: nnx.Module, wrt=nnx.Param) -> int:
  """Number of scalars in the parameters `wrt` selects."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, wrt)))


def _copy(tree):
  # A real copy: the live parameters are donated/updated by the optimizer.
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


@flax.struct.dataclass
class ReferencePolicy:
  """The frozen policy log p_ref of the RL objective.

  A pytree: pass it into a jitted train step next to the model. With LoRA it
  holds nothing; otherwise it holds the frozen copy of the trainable part.
  """
  mode: str = flax.struct.field(pytree_node=False)
  wrt: Any = flax.struct.field(pytree_node=False)
  state: Any = None

  @classmethod
  def from_model(cls, model: nnx.Module, mode: str, *, num_layers_unfrozen: int = 0
                 ) -> "ReferencePolicy":
    """Snapshots the reference from the model as it is now (before training)."""
    wrt = model_trainable_filter(model, mode, num_layers_unfrozen)
    if mode == "lora":
      return cls(mode=mode, wrt=wrt, state=None)
    return cls(mode=mode, wrt=wrt, state=_copy(nnx.state(model, wrt)))

  def model(self, model: nnx.Module) -> nnx.Module:
    """The reference network built on `model` (LoRA: `model` itself; call it with
    :func:`lora_lib.adapters_off`, which :meth:`apply` does)."""
    if self.mode == "lora":
      return model
    graphdef, _, rest = nnx.split(model, self.wrt, ...)
    return nnx.merge(graphdef, self.state, rest)

  def apply(self, fn, model: nnx.Module, *args, **kwargs):
    """fn(reference network, *args, **kwargs), with no gradient flowing out.

    E.g. ``ref.apply(sampling.sequence_logprobs, model, prompt, prompt_mask,
    response, response_mask, temperature=t)`` inside a jitted train step.
    """
    with lora_lib.adapters_off():
      out = fn(self.model(model), *args, **kwargs)
    return jax.lax.stop_gradient(out)
