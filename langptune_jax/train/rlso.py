"""RL phase: RLSO updates of the profile encoder (docs/method.md §5, REBEL form).

One update:
  1. rollout: G samples per prompt from the current encoder (rows prompt-major:
     prompt i owns rows i*G .. i*G+G-1);
  2. reward: each profile is embedded by the decoder and the target's rank in
     the catalogue gives NDCG or MRR (over-length profiles get the penalty);
  3. logp_old (the policy at rollout time: recomputed, or the sampler's own
     log-probs with rl.reuse_rollout_logprobs) and logp_ref (the reference model);
     total reward = reward - kl_coef * (logp_old - logp_ref), optionally whitened;
  4. ``num_ppo_epochs`` shuffled passes over the rollout batch; each pass
     accumulates the REBEL pairwise regression loss over micro-batches and takes
     one optimizer step.
Steps 2-4 are jitted with explicit shardings; text decoding of the profiles for
the decoder's tokenizer happens on the host between them. With rl.shared_prompt
the scoring and update passes run each prompt once per group and let its G
responses attend to it (``sampling.grouped_sequence_logprobs``): the same
numbers, P + G*R tokens per group instead of G*(P+R).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from langptune_jax import distributed, parallel, sampling
from langptune_jax import settings as settings_lib
from langptune_jax.train import losses
from langptune_jax.train import state as state_lib

PASS_KEYS = ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask",
             "logp_old", "total_reward", "task_reward", "kl")


@dataclasses.dataclass(frozen=True)
class RLSOSettings:
  group_size: int
  eta: float
  kl_coef: float
  whiten: bool
  temperature: float
  micro_batch_size: int  # prompts per micro-batch; 0: the whole batch
  whiten_chunk: int = 0  # whitening scope in rows; 0: the whole batch
  shared_prompt: bool = True  # each prompt run once per group in scoring and update passes
  reuse_rollout_logprobs: bool = False  # logp_old from the sampler instead of a forward pass

  @classmethod
  def from_config(cls, rl: settings_lib.RLSettings) -> "RLSOSettings":
    """What the RLSO steps read of the ``rl`` section."""
    return cls(rl.num_generations, rl.eta, rl.kl_coef, rl.whiten_rewards, rl.temperature,
               rl.micro_batch_size, rl.whiten_chunk, rl.shared_prompt,
               rl.reuse_rollout_logprobs)

  def sequence_logprobs(self):
    """The scoring function of the passes: grouped (shared prompt) or row by row."""
    if self.shared_prompt:
      return functools.partial(sampling.grouped_sequence_logprobs, group_size=self.group_size)
    return sampling.sequence_logprobs


def shaped_rewards(task_reward, logp_old, logp_ref, settings: RLSOSettings):
  """Total reward (KL-shaped, optionally whitened) and the per-sequence KL."""
  total, kl = losses.kl_shaped_reward(task_reward, logp_old, logp_ref, settings.kl_coef)
  if settings.whiten:
    total = losses.whiten_chunks(total, settings.whiten_chunk)
  return total, kl


def _num_micro(rows: int, settings: RLSOSettings) -> int:
  if settings.micro_batch_size <= 0:
    return 1
  per_micro = settings.micro_batch_size * settings.group_size
  if rows % per_micro:
    raise ValueError(f"rl.micro_batch_size={settings.micro_batch_size}: {rows // settings.group_size}"
                     " prompts per update are not divisible by it")
  return rows // per_micro


def rlso_loss_and_grads(model: nnx.Module, wrt, batch: dict, settings: RLSOSettings):
  """REBEL loss over all in-group pairs, accumulated over micro-batches."""
  graphdef, trainable, rest = state_lib.split_trainable(model, wrt)
  rows = batch["prompt_tokens"].shape[0]
  num_micro = _num_micro(rows, settings)

  def micro_loss(params, mb, rest=rest):
    if num_micro > 1:
      # Ties the weights to this micro-batch: XLA then gathers each sharded weight
      # where a layer uses it instead of hoisting every gathered weight out of the loop.
      params, rest, mb = jax.lax.optimization_barrier((params, rest, mb))
    policy = nnx.merge(graphdef, params, rest)
    logp_new, entropy = settings.sequence_logprobs()(
        policy, mb["prompt_tokens"], mb["prompt_mask"], mb["response_tokens"],
        mb["response_mask"], temperature=settings.temperature, return_entropy=True)
    loss = losses.rebel_loss(logp_new, mb["logp_old"], mb["total_reward"],
                             settings.group_size, settings.eta)
    return loss, (logp_new, entropy)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  if num_micro == 1:
    (loss, (logp_new, entropy)), grads = grad_fn(trainable, batch)
  else:
    chunked = {k: state_lib.to_micro_batches(v, num_micro, settings.group_size)
               for k, v in batch.items()}
    grads, (loss, (logp_new, entropy)) = state_lib.accumulate_gradients(grad_fn, trainable,
                                                                        chunked)
    grads = jax.tree.map(lambda g: g / num_micro, grads)
    loss = jnp.mean(loss)
    logp_new = state_lib.from_micro_batches(logp_new, settings.group_size)
    entropy = state_lib.from_micro_batches(entropy, settings.group_size)

  metrics = losses.rl_metrics(task_reward=batch["task_reward"], total_reward=batch["total_reward"],
                              kl=batch["kl"], logp_new=logp_new, logp_old=batch["logp_old"],
                              entropy=entropy, loss=loss)
  return loss, metrics, grads


def make_rlso_pass(train_state: state_lib.TrainState, mesh, settings: RLSOSettings,
                   rules=parallel.DEFAULT_RULES):
  """Jitted ``pass(state, batch) -> (state, metrics)``: one optimizer step per pass."""
  wrt, graphdef = train_state.wrt, train_state.graphdef

  def step(state, batch):
    with parallel.use_mesh(mesh, rules):
      model, optimizer = nnx.merge(graphdef, state)
      loss, metrics, grads = rlso_loss_and_grads(model, wrt, batch, settings)
      optimizer.update(model, grads)
      return nnx.state((model, optimizer)), metrics

  batch_shardings = {k: parallel.batch_sharding(mesh, 2 if k.endswith(("tokens", "mask")) else 1,
                                                rules) for k in PASS_KEYS}
  return state_lib.jit_step(step, train_state, batch_shardings)


def make_policy_logprobs(train_state: state_lib.TrainState, mesh, settings: RLSOSettings,
                         rules=parallel.DEFAULT_RULES):
  """Jitted ``fn(state, reference, batch) -> (logp_old, logp_ref, entropy)``.

  `reference` is a :class:`models.finetune.ReferencePolicy`: with LoRA the same
  network with adapters off, with partial fine-tuning a frozen copy of the top
  blocks merged with the (frozen) rest of the live model.
  """
  graphdef = train_state.graphdef

  def one_chunk(model, reference, chunk):
    args = (chunk["prompt_tokens"], chunk["prompt_mask"], chunk["response_tokens"],
            chunk["response_mask"])
    score = settings.sequence_logprobs()
    logp_ref = reference.apply(score, model, *args, temperature=settings.temperature)
    if settings.reuse_rollout_logprobs:
      logp_old = jnp.sum(jnp.where(chunk["response_mask"], chunk["rollout_logprobs"], 0.0), axis=-1)
      return logp_old, logp_ref, jnp.zeros_like(logp_old)
    logp_old, entropy = score(model, *args, temperature=settings.temperature,
                              return_entropy=True)
    return logp_old, logp_ref, entropy

  def fn(state, reference, batch):
    with parallel.use_mesh(mesh, rules):
      model, _ = nnx.merge(graphdef, state)
      rows = batch["prompt_tokens"].shape[0]
      num_micro = _num_micro(rows, settings)
      if num_micro == 1:
        return one_chunk(model, reference, batch)
      # The update's micro-batches: bounds the activations of a big rollout.
      chunked = {k: state_lib.to_micro_batches(v, num_micro, settings.group_size)
                 for k, v in batch.items()}
      out = jax.lax.map(lambda chunk: one_chunk(model, reference, chunk), chunked)
      return tuple(state_lib.from_micro_batches(x, settings.group_size) for x in out)

  keys = PASS_KEYS[:4] + (("rollout_logprobs",) if settings.reuse_rollout_logprobs else ())
  shardings = {k: parallel.batch_sharding(mesh, 2, rules) for k in keys}
  return jax.jit(fn, in_shardings=(train_state.shardings, None, shardings))


def scoring_batch(batch: dict, rollout: sampling.SampleOutput, settings: RLSOSettings) -> dict:
  """The input of :func:`make_policy_logprobs`: `batch` plus the sampler's log-probs if reused."""
  if not settings.reuse_rollout_logprobs:
    return batch
  return dict(batch, rollout_logprobs=distributed.to_host(rollout.logprobs).astype(np.float32))


def repeat_prompts(batch: dict, group_size: int) -> dict:
  """Prompt-major repetition: every row becomes `group_size` consecutive rows."""
  return {k: np.repeat(np.asarray(v), group_size, axis=0) for k, v in batch.items()}


def shuffle_groups(batch: dict, group_size: int, rng: np.random.Generator) -> dict:
  """Permutes whole groups (never splits a prompt's samples) for one pass."""
  rows = len(next(iter(batch.values())))
  order = rng.permutation(rows // group_size)
  index = (order[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1)
  return {k: np.asarray(v)[index] for k, v in batch.items()}
