"""One RLSO update of the writer (docs/method.md §4-5).

Rollout of ``rl.num_generations`` profiles per prompt, their rewards from the
ranker as it is now, the policy and reference log-probabilities, then
``rl.num_ppo_epochs`` passes of the REBEL regression over shuffled groups.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from langptune_jax import distributed, parallel
from langptune_jax import flops as flops_lib
from langptune_jax.train import profiles as profiles_lib
from langptune_jax.train import rlso
from langptune_jax.train import setup as setup_lib
from langptune_jax.train.run_data import UserSplit


class RlsoUpdate:
  """``update(prompts, item_emb, key, shuffle_rng)`` runs one RLSO update in place.

  The writer's train state (``setup.writer_state``) is updated; `embed`
  embeds profile tokens with the current ranker. The jitted steps are
  attributes (``policy_logprobs``, ``rlso_pass``) so a test can wrap them.
  """

  def __init__(self, setup: setup_lib.TrainingSetup, *, writer_tokenizer, ranker_tokenizer,
               embed: Callable, mesh, rules, timer: flops_lib.StepTimer):
    self.setup = setup
    self.settings = setup.settings
    self.writer_tokenizer = writer_tokenizer
    self.ranker_tokenizer = ranker_tokenizer
    self.embed = embed
    self.mesh, self.rules = mesh, rules
    self.timer = timer
    self.policy_logprobs = setup.steps.policy_logprobs
    self.rlso_pass = timer.wrap(setup.steps.rlso_pass)

  def _global(self, batch):
    return parallel.global_batch(batch, self.mesh, self.rules)

  def __call__(self, prompts: UserSplit, item_emb, key: jax.Array,
               shuffle_rng: np.random.Generator) -> dict[str, float]:
    writer_state, rl_settings = self.setup.writer_state, self.setup.rl_settings
    group = rl_settings.group_size
    rows = rlso.repeat_prompts({"prompt_tokens": prompts.prompt_tokens,
                                "prompt_mask": prompts.prompt_mask,
                                "target": prompts.target, "history": prompts.history}, group)
    with parallel.use_mesh(self.mesh, self.rules):
      out = profiles_lib.generate(writer_state.model, rows["prompt_tokens"],
                                  rows["prompt_mask"], self.setup.sampling, key)
    response_tokens, response_mask = distributed.to_host((out.tokens, out.response_mask))
    texts = profiles_lib.decode_responses(self.writer_tokenizer, response_tokens, response_mask)
    ranker_tokens, ranker_mask, truncated = profiles_lib.to_ranker_inputs(
        texts, self.ranker_tokenizer, self.settings.data.decoder_max_len)
    profile_emb = self.embed(*self._global({"t": ranker_tokens, "m": ranker_mask}).values())
    task_reward, rank_metrics = self.setup.steps.rewards(profile_emb, item_emb, rows["target"],
                                                         rows["history"], truncated)
    batch = {"prompt_tokens": rows["prompt_tokens"], "prompt_mask": rows["prompt_mask"],
             "response_tokens": response_tokens, "response_mask": response_mask}
    logp_old, logp_ref, _ = self.policy_logprobs(
        writer_state.state, self.setup.reference,
        self._global(rlso.scoring_batch(batch, out, rl_settings)))
    total_reward, kl = rlso.shaped_rewards(task_reward, logp_old, logp_ref, rl_settings)
    batch.update(logp_old=logp_old, total_reward=total_reward, task_reward=task_reward, kl=kl)
    batch = distributed.to_host(batch)
    pass_metrics = []
    for _ in range(self.settings.rl.num_ppo_epochs):
      shuffled = rlso.shuffle_groups(batch, group, shuffle_rng)
      writer_state.state, m = self.rlso_pass(writer_state.state, self._global(shuffled))
      pass_metrics.append(m)
    metrics = distributed.host_scalars(pass_metrics[0])  # reward/KL metrics are those of the rollout
    metrics["loss"] = float(np.mean([float(m["loss"]) for m in pass_metrics]))
    last = distributed.host_scalars(pass_metrics[-1])
    metrics.update(ratio=last["ratio"], approx_kl=last["approx_kl"])
    metrics.update({f"batch_{k}": v for k, v in distributed.host_scalars(rank_metrics).items()})
    metrics["truncated_fraction"] = float(np.mean(truncated))
    metrics["response_length"] = float(response_mask.sum(axis=1).mean())
    num_rows, prompt_len = batch["prompt_tokens"].shape
    metrics.update(self.timer.metrics(
        tokens=num_rows * (prompt_len + response_tokens.shape[1]),
        flops=flops_lib.rlso_pass_flops(self.setup.writer_config, num_rows, prompt_len,
                                        response_tokens.shape[1],
                                        trainable_params=self.setup.writer_trainable),
        prefix="rl_pass"))
    return metrics
