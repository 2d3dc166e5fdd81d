"""CL phase: InfoNCE alignment of the recommender decoder (docs/method.md §6).

A batch pairs each user's current profile with the text of the item the user
chose next. Both sides are embedded by the decoder, L2-normalised, and scored
against each other. With ``cl.negatives="group"`` (the authors' protocol) each
consecutive group of ``cl.group_size`` pairs is its own InfoNCE batch; with
"global" every other target in the *global* batch is a negative.

With micro-batches the negatives are not shrunk: the step first embeds the
whole batch without gradients, takes the loss gradient with respect to the
embeddings, and then back-propagates that gradient through the decoder one
micro-batch at a time (the "gradient cache" construction). The result equals
the full-batch gradient while activations are only held for one micro-batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from langptune_jax import parallel
from langptune_jax.models import embedder as embedder_lib
from langptune_jax.train import losses
from langptune_jax.train import state as state_lib

BATCH_KEYS = ("profile_tokens", "profile_mask", "item_tokens", "item_mask", "item_ids")


def _embed(graphdef, trainable, rest, tokens, mask):
  embedder: embedder_lib.Embedder = nnx.merge(graphdef, trainable, rest)
  return embedder(tokens, mask)


def cl_loss_and_grads(model: embedder_lib.Embedder, wrt, batch: dict, *, temperature: float,
                      micro_batch_size: int = 0, group_size: int = 0,
                      dedupe_negatives: bool = False):
  """InfoNCE loss, metrics and gradients (of the `wrt` parameters) for one batch."""
  graphdef, trainable, rest = nnx.split(model, wrt, ...)
  embed = functools.partial(_embed, graphdef)
  batch_size = batch["profile_tokens"].shape[0]
  num_micro = 1 if micro_batch_size <= 0 else batch_size // micro_batch_size

  def loss_from_embeddings(q, k):
    # With dedupe, two users with the same target do not serve as each other's negatives.
    return losses.info_nce(q, k, temperature, group_size=group_size,
                           key_ids=batch["item_ids"] if dedupe_negatives else None)

  if num_micro == 1:
    def loss_fn(params):
      q = embed(params, rest, batch["profile_tokens"], batch["profile_mask"])
      k = embed(params, rest, batch["item_tokens"], batch["item_mask"])
      return loss_from_embeddings(q, k)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    return loss, metrics, grads

  chunked = {key: state_lib.to_micro_batches(batch[key], num_micro) for key in BATCH_KEYS[:4]}

  # 1) Embeddings of the whole batch, one micro-batch at a time, no gradients.
  def embed_chunk(_, mb):
    q = embed(trainable, rest, mb["profile_tokens"], mb["profile_mask"])
    k = embed(trainable, rest, mb["item_tokens"], mb["item_mask"])
    return None, (q, k)

  _, (q, k) = jax.lax.scan(embed_chunk, None, chunked)
  q = state_lib.from_micro_batches(q)
  k = state_lib.from_micro_batches(k)
  q = parallel.constrain(q, ("batch", None))
  k = parallel.constrain(k, ("batch", None))

  # 2) Loss over the global batch and its gradient w.r.t. the embeddings.
  (loss, metrics), (gq, gk) = jax.value_and_grad(loss_from_embeddings, argnums=(0, 1),
                                                 has_aux=True)(q, k)

  # 3) Back-propagate the embedding gradients micro-batch by micro-batch.
  def backprop_chunk(acc, inputs):
    mb, gq_mb, gk_mb = inputs

    def embeddings(params):
      return (embed(params, rest, mb["profile_tokens"], mb["profile_mask"]),
              embed(params, rest, mb["item_tokens"], mb["item_mask"]))

    _, vjp = jax.vjp(embeddings, trainable)
    (grads,) = vjp((gq_mb, gk_mb))
    return jax.tree.map(jnp.add, acc, grads), None

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  grads, _ = jax.lax.scan(backprop_chunk, zeros,
                          (chunked, state_lib.to_micro_batches(gq, num_micro),
                           state_lib.to_micro_batches(gk, num_micro)))
  return loss, metrics, grads


def make_cl_step(train_state: state_lib.TrainState, mesh, *, temperature: float,
                 micro_batch_size: int = 0, group_size: int = 0, dedupe_negatives: bool = False,
                 rules=parallel.DEFAULT_RULES):
  """The jitted CL update: ``step(state, batch) -> (state, metrics)``."""
  wrt = train_state.wrt
  graphdef = train_state.graphdef

  def step(state, batch):
    with parallel.use_mesh(mesh, rules):
      model, optimizer = nnx.merge(graphdef, state)
      loss, metrics, grads = cl_loss_and_grads(
          model, wrt, batch, temperature=temperature, micro_batch_size=micro_batch_size,
          group_size=group_size, dedupe_negatives=dedupe_negatives)
      optimizer.update(model, grads)
      metrics = dict(metrics, loss=loss, grad_norm=_global_norm(grads))
      return nnx.state((model, optimizer)), metrics

  batch_shardings = {key: parallel.batch_sharding(mesh, 1 if key == "item_ids" else 2, rules)
                     for key in BATCH_KEYS}
  return state_lib.jit_step(step, train_state, batch_shardings)


def _global_norm(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
