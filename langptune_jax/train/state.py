"""Train state of one model: the module and its AdamW, split for jitted steps.

Jitted steps are pure functions of ``(state, batch) -> (state, metrics)``: the
module and its optimizer are split once into a static graph definition and a
state pytree whose leaves carry ``NamedSharding``s from the logical axis rules.
Each step merges them back inside jit, updates, and splits again; the state is
donated so parameters and optimizer moments are updated in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from langptune_jax import parallel


def learning_rate_schedule(opt_config, total_steps: int) -> optax.Schedule:
  """constant | linear (decay to 0) | cosine, each after `warmup_steps` of linear warm-up.

  `opt_config`: the ``rl`` or ``cl`` section (:class:`~langptune_jax.settings.OptimizerSettings`
  fields).
  """
  lr, warmup = opt_config.lr, opt_config.warmup_steps
  decay_steps = max(1, total_steps - warmup)
  kind = opt_config.lr_schedule
  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "linear":
    main = optax.linear_schedule(lr, 0.0, decay_steps)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps)
  else:
    raise ValueError(f"lr_schedule={kind!r}: expected constant, linear or cosine")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def adamw(opt_config, total_steps: int) -> optax.GradientTransformation:
  """AdamW with betas, eps and weight decay from the config section, optional clipping.

  The paper's Gemma runs use torch's defaults (0.9, 0.999, wd 0.01), Llama
  (0.9, 0.95, wd 1e-6); eps is 1e-6 in both.
  """
  tx = optax.adamw(learning_rate_schedule(opt_config, total_steps), b1=opt_config.adam_b1,
                   b2=opt_config.adam_b2, eps=opt_config.adam_eps,
                   weight_decay=opt_config.weight_decay)
  if opt_config.max_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt_config.max_grad_norm), tx)
  return tx


@dataclasses.dataclass
class TrainState:
  """A module + optimizer as (graphdef, state); `state` leaves are sharded arrays."""

  graphdef: Any
  state: nnx.State
  shardings: nnx.State
  wrt: Any  # the filter of trainable parameters

  @classmethod
  def create(cls, model: nnx.Module, tx: optax.GradientTransformation, wrt,
             mesh: Mesh, rules=parallel.DEFAULT_RULES) -> "TrainState":
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    graphdef, state = nnx.split((model, optimizer))
    shardings = parallel.state_shardings(state, mesh, rules)
    state = jax.device_put(state, shardings)
    return cls(graphdef, state, shardings, wrt)

  def merge(self) -> tuple[nnx.Module, nnx.Optimizer]:
    return nnx.merge(self.graphdef, self.state)

  @property
  def model(self) -> nnx.Module:
    return self.merge()[0]

  def trainable_state(self) -> dict:
    """Pure dict of what a checkpoint stores: trainable params + optimizer state."""
    model, optimizer = self.merge()
    return {"params": nnx.state(model, self.wrt).to_pure_dict(),
            "optimizer": nnx.state(optimizer).to_pure_dict()}

  def load_trainable_state(self, restored: dict) -> None:
    model, optimizer = self.merge()
    params = nnx.state(model, self.wrt)
    nnx.replace_by_pure_dict(params, restored["params"])
    nnx.update(model, params)
    opt_state = nnx.state(optimizer)
    nnx.replace_by_pure_dict(opt_state, restored["optimizer"])
    nnx.update(optimizer, opt_state)
    self.state = jax.device_put(nnx.state((model, optimizer)), self.shardings)

  def step_count(self) -> int:
    return int(self.merge()[1].step[...])


def split_trainable(model: nnx.Module, wrt):
  """(graphdef, trainable, rest) so that gradients flow only into `trainable`."""
  return nnx.split(model, wrt, ...)


def jit_step(fn: Callable, train_state: TrainState, batch_shardings, *, static_argnames=()):
  """jax.jit of ``fn(state, batch, *rest) -> (state, metrics)`` with explicit shardings.

  The train state is donated: its buffers are reused for the updated state.
  """
  return jax.jit(fn, in_shardings=(train_state.shardings, batch_shardings),
                 out_shardings=(train_state.shardings, None), donate_argnums=(0,),
                 static_argnames=static_argnames)


def tree_mean(trees: list) -> Any:
  return jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *trees)


def accumulate_gradients(grad_fn: Callable, params, micro_batches):
  """Sums ``grad_fn(params, mb) -> (out, grads)`` over the leading axis of `micro_batches`.

  One ``lax.scan``, so XLA keeps the activations of a single micro-batch.
  Returns (summed grads, the outs stacked along a new leading axis).
  """
  def body(acc, mb):
    out, grads = grad_fn(params, mb)
    return jax.tree.map(jnp.add, acc, grads), out

  return jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), micro_batches)


def to_micro_batches(x: jax.Array, num_micro: int, group_size: int = 1) -> jax.Array:
  """[rows, ...] -> [num_micro, rows // num_micro, ...], whole groups per micro-batch.

  Groups are dealt round-robin (micro-batch j gets groups j, j + num_micro, ...)
  so that with the batch sharded in contiguous blocks every micro-batch is
  spread evenly over all devices.
  """
  rows = x.shape[0]
  groups = rows // group_size
  x = x.reshape((groups // num_micro, num_micro, group_size) + x.shape[1:])
  return jnp.swapaxes(x, 0, 1).reshape((num_micro, rows // num_micro) + x.shape[3:])


def from_micro_batches(x: jax.Array, group_size: int = 1) -> jax.Array:
  """Inverse of :func:`to_micro_batches`: [num_micro, rows // num_micro, ...] -> [rows, ...]."""
  num_micro, per_micro = x.shape[:2]
  x = x.reshape((num_micro, per_micro // group_size, group_size) + x.shape[2:])
  return jnp.swapaxes(x, 0, 1).reshape((num_micro * per_micro,) + x.shape[3:])
