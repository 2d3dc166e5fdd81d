"""The alternating LangPTune schedule (design §1): CL phase, RL phase, evaluation.

``Trainer`` owns the two models (encoder = profile-writing LLM, decoder = text
embedder), their train states and jitted steps, the checkpointer and the metrics
writer. One iteration is

  CL phase  write a profile for every train and validation user with the current
            encoder, then ``cl.num_emb_updates`` InfoNCE steps on the decoder;
  RL phase  re-embed the whole catalogue with the current decoder, then
            ``rl.num_lm_updates`` RLSO updates of the encoder.

Every random draw (batch order, sampling keys) is derived from (seed, iteration,
phase, step), so the loop position saved in a checkpoint is all that is needed
to continue a run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from langptune_jax import flops as flops_lib
from langptune_jax import observability, parallel
from langptune_jax.models import embedder as embedder_lib
from langptune_jax.models import finetune
from langptune_jax.models import lora as lora_lib
from langptune_jax.rec import metrics as metrics_lib
from langptune_jax.rec import retrieval
from langptune_jax.train import checkpoint as ckpt_lib
from langptune_jax.train import contrastive, rlso
from langptune_jax.train import profiles as profiles_lib
from langptune_jax.train import state as state_lib
from langptune_jax.train.run_data import RunData, UserSplit

PHASES = ("cl", "rl")


class NonFiniteLossError(FloatingPointError):
  """A loss became NaN or inf; the run stops and keeps its last good checkpoint."""


class StopRequested(Exception):
  """Raised internally once ``train.stop_after_steps`` updates have run."""


@dataclasses.dataclass(frozen=True)
class TopLayersFilter:
  """NNX filter: parameters of blocks >= first_layer (the decoder's partial training)."""

  first_layer: int

  def __call__(self, path: tuple, variable: Any) -> bool:
    if not isinstance(variable, nnx.Param):
      return False
    for i, key in enumerate(path[:-1]):
      if key == "layers":
        return int(path[i + 1]) >= self.first_layer
    return False


def decoder_trainable_filter(embedder: embedder_lib.Embedder, num_layers_unfrozen: int):
  if num_layers_unfrozen < 0:
    return nnx.Param
  total = embedder.num_layers()
  if num_layers_unfrozen > total:
    raise ValueError(f"decoder.num_layers_unfrozen={num_layers_unfrozen}: the decoder has only "
                     f"{total} layers")
  return TopLayersFilter(total - num_layers_unfrozen)


def make_cl_training(decoder: embedder_lib.Embedder, wrt, cl_config, total_steps: int, mesh,
                     rules=parallel.DEFAULT_RULES):
  """The decoder's train state (AdamW from `cl_config`) and its jitted InfoNCE step."""
  train_state = state_lib.TrainState.create(decoder, state_lib.adamw(cl_config, total_steps), wrt,
                                            mesh, rules)
  step = contrastive.make_cl_step(train_state, mesh, temperature=float(cl_config.temperature),
                                  micro_batch_size=int(cl_config.micro_batch_size), rules=rules)
  return train_state, step


def _rng_for(seed: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng([seed, *keys])


def _key_for(seed: int, *keys: int) -> jax.Array:
  key = jax.random.key(seed)
  for k in keys:
    key = jax.random.fold_in(key, k)
  return key


def _scalars(metrics: dict) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


class Trainer:
  """Runs (and resumes) one LangPTune training job."""

  def __init__(self, config, workdir: str, *, data: RunData, encoder: nnx.Module,
               decoder: embedder_lib.Embedder, encoder_tokenizer, decoder_tokenizer,
               writer=None, mesh=None):
    self.config = config
    self.workdir = workdir
    self.data = data
    self.encoder_tokenizer = encoder_tokenizer
    self.decoder_tokenizer = decoder_tokenizer
    self.writer = writer
    self.mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    self.rules = parallel.rules_from_config(config.mesh.rules)
    self.seed = int(config.seed)
    os.makedirs(workdir, exist_ok=True)

    enc_cfg = config.encoder
    if enc_cfg.training == "lora":
      lora_lib.apply_lora(encoder, targets=tuple(config.lora.targets), rank=int(config.lora.rank),
                          alpha=float(config.lora.alpha), dropout=float(config.lora.dropout),
                          rngs=nnx.Rngs(self.seed))
    self.reference = finetune.ReferencePolicy.from_model(
        encoder, enc_cfg.training, num_layers_unfrozen=int(enc_cfg.num_layers_unfrozen))
    enc_wrt = finetune.model_trainable_filter(encoder, enc_cfg.training,
                                              int(enc_cfg.num_layers_unfrozen))
    dec_wrt = decoder_trainable_filter(decoder, int(config.decoder.num_layers_unfrozen))

    iters = int(config.train.num_iterations)
    rl_total = iters * int(config.rl.num_lm_updates) * int(config.rl.num_ppo_epochs)
    cl_total = iters * int(config.cl.num_emb_updates)
    self.encoder_state = state_lib.TrainState.create(
        encoder, state_lib.adamw(config.rl, rl_total), enc_wrt, self.mesh, self.rules)
    self.decoder_state, self.cl_step = make_cl_training(decoder, dec_wrt, config.cl, cl_total,
                                                        self.mesh, self.rules)
    if self.reference.state is not None:
      ref_shardings = parallel.state_shardings(self.reference.state, self.mesh, self.rules)
      self.reference = self.reference.replace(
          state=jax.device_put(self.reference.state, ref_shardings))

    self.rl_settings = rlso.RLSOSettings.from_config(config.rl)
    self.sampling = profiles_lib.SamplingSettings.from_config(
        config, _eos_ids(encoder_tokenizer, encoder), _pad_id(encoder_tokenizer))
    self.rlso_pass = rlso.make_rlso_pass(self.encoder_state, self.mesh, self.rl_settings,
                                         self.rules)
    self.policy_logprobs = rlso.make_policy_logprobs(self.encoder_state, self.mesh,
                                                     self.rl_settings, self.rules)
    self._embed = self._make_embed_fn()
    self._rewards = self._make_reward_fn()
    # Step time apart from compile time, tokens/s and MFU in the metrics; the
    # optional XLA trace of a window of steps (config.profile).
    peak = flops_lib.peak_tflops(float(config.profile.peak_tflops))
    self.rl_timer = flops_lib.StepTimer("rl", num_devices=self.mesh.size,
                                        peak_tflops_per_device=peak)
    self.cl_timer = flops_lib.StepTimer("cl", num_devices=self.mesh.size,
                                        peak_tflops_per_device=peak)
    self.rlso_pass = self.rl_timer.wrap(self.rlso_pass)
    self.cl_step = self.cl_timer.wrap(self.cl_step)
    self.profile_window = observability.ProfileWindow(config.profile,
                                                      os.path.join(workdir, "profile"))
    self._encoder_config = encoder.config
    self._decoder_config = decoder.model.config
    self._encoder_trainable = finetune.count_params(encoder, enc_wrt)
    self._decoder_trainable = finetune.count_params(decoder, dec_wrt)

    self.position = {"iteration": 0, "phase": "cl", "step": 0}
    self.profiles: profiles_lib.Profiles | None = None  # of train + val users, this iteration
    self.item_embeddings: np.ndarray | None = None
    self.history: list[dict] = []  # evaluation results, in order
    self.curves: list[dict] = []  # per-step training scalars, for the report's plots
    self._steps_this_run = 0  # updates since this process started (train.stop_after_steps)
    self.checkpointer = (ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                               max_to_keep=int(config.checkpoint.max_to_keep))
                         if config.checkpoint.enabled else None)
    self.fingerprint = ckpt_lib.config_fingerprint(config)

  # --- jitted helpers --------------------------------------------------------

  def _make_embed_fn(self):
    graphdef = self.decoder_state.graphdef
    mesh, rules = self.mesh, self.rules

    @jax.jit
    def embed(state, tokens, mask):
      with parallel.use_mesh(mesh, rules):
        model, _ = nnx.merge(graphdef, state)
        return model(tokens, mask)

    return lambda tokens, mask: embed(self.decoder_state.state, tokens, mask)

  def _make_reward_fn(self):
    reward_type = self.config.rl.reward_type
    penalty = float(self.config.rl.penalty_reward)
    mesh, rules = self.mesh, self.rules

    @jax.jit
    def rewards(profile_emb, item_emb, targets, history, truncated):
      with parallel.use_mesh(mesh, rules):
        reward, ranks = retrieval.profile_rewards(
            profile_emb, item_emb, targets, history, reward_type=reward_type,
            truncated=truncated, penalty_reward=penalty, return_ranks=True)
        return reward, metrics_lib.rank_log_metrics(ranks)

    return rewards

  def embed_texts(self, tokens: np.ndarray, mask: np.ndarray, desc: str) -> np.ndarray:
    return retrieval.embed_catalogue(self._embed, tokens, mask,
                                     int(self.config.decoder.embed_batch_size), mesh=self.mesh,
                                     desc=desc)

  # --- profiles --------------------------------------------------------------

  def write_profiles(self, users: UserSplit, key: jax.Array, *, greedy: bool = False,
                     desc: str = "writing profiles") -> profiles_lib.Profiles:
    return profiles_lib.write_profiles(
        self.encoder_state.model, users.prompt_tokens, users.prompt_mask,
        settings=self.sampling, encoder_tokenizer=self.encoder_tokenizer,
        decoder_tokenizer=self.decoder_tokenizer,
        decoder_max_len=int(self.config.data.decoder_max_len),
        batch_size=int(self.config.train.profile_batch_size), rng=key, greedy=greedy,
        mesh=self.mesh, rules=self.rules, desc=desc)

  def _cl_users(self) -> UserSplit:
    """The users whose profiles and targets the CL phase trains on: train + val."""
    tr, va = self.data.train, self.data.val
    return UserSplit(*(np.concatenate([getattr(tr, f), getattr(va, f)])
                       for f in ("user", "prompt_tokens", "prompt_mask", "history", "target")))

  # --- phases ----------------------------------------------------------------

  def cl_phase(self, iteration: int, start_step: int = 0) -> None:
    cfg = self.config.cl
    users = self._cl_users()
    cap = int(self.config.train.cl_users)
    if 0 < cap < len(users):  # a seeded subset: the same again on resume
      users = users.take(np.sort(_rng_for(self.seed, iteration, 5).permutation(len(users))[:cap]))
    if self.profiles is None:
      self.profiles = self.write_profiles(users, _key_for(self.seed, iteration, 0),
                                          desc=f"iteration {iteration}: profiles")
      self._save(iteration, "cl", 0)
    batch_size = int(cfg.batch_size)
    if len(users) < batch_size:
      raise ValueError(f"cl.batch_size={batch_size}: only {len(users)} train+val users")
    for step in self._steps("cl", iteration, start_step, int(cfg.num_emb_updates)):
      index = self._batch_rows(len(users), batch_size, step, iteration, 1)
      batch = {
          "profile_tokens": self.profiles.decoder_tokens[index],
          "profile_mask": self.profiles.decoder_mask[index],
          "item_tokens": self.data.item_tokens[users.target[index]],
          "item_mask": self.data.item_mask[users.target[index]],
          "item_ids": users.target[index],
      }
      batch = parallel.global_batch(batch, self.mesh, self.rules)
      self.decoder_state.state, metrics = self.cl_step(self.decoder_state.state, batch)
      width = self.profiles.decoder_tokens.shape[1]
      metrics = dict(metrics, **self.cl_timer.metrics(
          tokens=2 * batch_size * width,
          flops=flops_lib.cl_step_flops(self._decoder_config, batch_size, width,
                                        trainable_params=self._decoder_trainable)))
      self._after_step(metrics, "cl", iteration, step)

  def rl_phase(self, iteration: int, start_step: int = 0) -> None:
    cfg = self.config.rl
    self.item_embeddings = self.embed_texts(self.data.item_tokens, self.data.item_mask,
                                            desc=f"iteration {iteration}: embedding items")
    item_emb = parallel.put(self.item_embeddings, self.mesh, ("items", None), self.rules)
    users = self.data.train
    num_prompts = int(cfg.prompts_per_update)
    if len(users) < num_prompts:
      raise ValueError(f"rl.prompts_per_update={num_prompts}: only {len(users)} train users")
    for step in self._steps("rl", iteration, start_step, int(cfg.num_lm_updates)):
      prompts = users.take(self._batch_rows(len(users), num_prompts, step, iteration, 2))
      metrics = self.rlso_update(prompts, item_emb, _key_for(self.seed, iteration, 3, step),
                                 _rng_for(self.seed, iteration, 4, step))
      self._after_step(metrics, "rl", iteration, step)

  def rlso_update(self, prompts: UserSplit, item_emb, key: jax.Array,
                  shuffle_rng: np.random.Generator) -> dict[str, float]:
    """One RLSO update: rollout, rewards, reference log-probs, num_ppo_epochs passes."""
    group = self.rl_settings.group_size
    rows = rlso.repeat_prompts({"prompt_tokens": prompts.prompt_tokens,
                                "prompt_mask": prompts.prompt_mask,
                                "target": prompts.target, "history": prompts.history}, group)
    with parallel.use_mesh(self.mesh, self.rules):
      out = profiles_lib.generate(self.encoder_state.model, rows["prompt_tokens"],
                                  rows["prompt_mask"], self.sampling, key)
    response_tokens = np.asarray(jax.device_get(out.tokens))
    response_mask = np.asarray(jax.device_get(out.response_mask))
    texts = profiles_lib.decode_responses(self.encoder_tokenizer, response_tokens, response_mask)
    dec_tokens, dec_mask, truncated = profiles_lib.to_decoder_inputs(
        texts, self.decoder_tokenizer, int(self.config.data.decoder_max_len))
    profile_emb = self._embed(*(parallel.global_batch(
        {"t": dec_tokens, "m": dec_mask}, self.mesh, self.rules).values()))
    task_reward, rank_metrics = self._rewards(profile_emb, item_emb, rows["target"],
                                              rows["history"], truncated)
    batch = {"prompt_tokens": rows["prompt_tokens"], "prompt_mask": rows["prompt_mask"],
             "response_tokens": response_tokens, "response_mask": response_mask}
    logp_old, logp_ref, _ = self.policy_logprobs(
        self.encoder_state.state, self.reference,
        parallel.global_batch(rlso.scoring_batch(batch, out, self.rl_settings), self.mesh,
                              self.rules))
    total_reward, kl = rlso.shaped_rewards(task_reward, logp_old, logp_ref, self.rl_settings)
    batch.update(logp_old=logp_old, total_reward=total_reward, task_reward=task_reward, kl=kl)
    batch = {k: np.asarray(jax.device_get(v)) for k, v in batch.items()}
    pass_metrics = []
    for _ in range(int(self.config.rl.num_ppo_epochs)):
      shuffled = rlso.shuffle_groups(batch, group, shuffle_rng)
      self.encoder_state.state, m = self.rlso_pass(
          self.encoder_state.state, parallel.global_batch(shuffled, self.mesh, self.rules))
      pass_metrics.append(m)
    metrics = _scalars(pass_metrics[0])  # reward/KL metrics are those of the rollout
    metrics["loss"] = float(np.mean([float(m["loss"]) for m in pass_metrics]))
    last = _scalars(pass_metrics[-1])
    metrics.update(ratio=last["ratio"], approx_kl=last["approx_kl"])
    metrics.update({f"batch_{k}": v for k, v in _scalars(rank_metrics).items()})
    metrics["truncated_fraction"] = float(np.mean(truncated))
    metrics["response_length"] = float(response_mask.sum(axis=1).mean())
    rows, prompt_len = batch["prompt_tokens"].shape
    metrics.update(self.rl_timer.metrics(
        tokens=rows * (prompt_len + response_tokens.shape[1]),
        flops=flops_lib.rlso_pass_flops(self._encoder_config, rows, prompt_len,
                                        response_tokens.shape[1],
                                        trainable_params=self._encoder_trainable),
        prefix="rl_pass"))
    return metrics

  # --- evaluation ------------------------------------------------------------

  def evaluate(self, tag: str, *, split: str | None = None, baselines: bool = False,
               write_records: bool = True) -> dict[str, dict[str, float]]:
    """Profiles for held-out users, ranked over the full catalogue, plus baselines."""
    cfg = self.config.eval
    users = self.data.split(split or cfg.split).head(int(cfg.max_users))
    ks = tuple(int(k) for k in cfg.ks)
    item_emb = self.embed_texts(self.data.item_tokens, self.data.item_mask,
                                desc=f"{tag}: embedding items")
    profiles = self.write_profiles(users, _key_for(self.seed, 10_000, len(self.history)),
                                   greedy=bool(cfg.greedy), desc=f"{tag}: profiles")
    profile_emb = self.embed_texts(profiles.decoder_tokens, profiles.decoder_mask,
                                   desc=f"{tag}: embedding profiles")
    ranks = retrieval.rank_users(profile_emb, item_emb, users.target, users.history,
                                 mesh=self.mesh)
    results = {tag: _metrics_from_ranks(ranks, ks, self.data.num_items)}
    if baselines:
      results.update(self.baselines(users, item_emb, ks))
    if write_records:
      self._write_records(tag, users, profiles, ranks)
    entry = {"tag": tag, "position": dict(self.position), "results": results}
    self.history.append(entry)
    if self.writer is not None:
      for name, values in results.items():
        self.writer.write(self._global_step(), values, prefix=f"eval/{name}/")
    return results

  def baselines(self, users: UserSplit, item_emb: np.ndarray, ks) -> dict:
    from langptune_jax.rec import baselines as baselines_lib  # pylint: disable=g-import-not-at-top
    out = {}
    names = tuple(self.config.eval.baselines)
    n = self.data.num_items
    if "reference_query" in names:
      last = users.last_history_item()
      query = item_emb[last]
      out["reference_query"] = _metrics_from_ranks(
          retrieval.rank_users(query, item_emb, users.target, users.history, mesh=self.mesh),
          ks, n)
    if "popularity" in names:
      scores = np.asarray(baselines_lib.popularity_scores(self.data.train_item_counts(), n))
      out["popularity"] = _metrics_from_scores(np.broadcast_to(scores, (len(users), n)), users, ks)
    if "random" in names:
      scores = np.asarray(baselines_lib.random_scores(jax.random.key(self.seed), len(users), n))
      out["random"] = _metrics_from_scores(scores, users, ks)
    if "sasrec" in names:
      sequences = [np.append(h[h >= 0], t) for h, t in zip(self.data.train.history,
                                                            self.data.train.target)]
      model = baselines_lib.train_sasrec(sequences, n, steps=int(self.config.eval.sasrec_steps),
                                         seed=self.seed, max_len=self.data.train.history.shape[1])
      histories = [h[h >= 0] for h in users.history]
      out["sasrec"] = _metrics_from_scores(baselines_lib.sasrec_scores(model, histories), users,
                                           ks)
    if "history" in names and users.prompt_text and self.data.train.prompt_text:
      out["history"] = self.history_baseline(users, ks)
    return out

  def history_baseline(self, users: UserSplit, ks) -> dict[str, float]:
    """Raw prompts as queries, embedded by a copy of the decoder fine-tuned on them.

    The copy starts from the current decoder weights and runs
    ``eval.history_baseline_steps`` InfoNCE steps on (train prompt, target item)
    pairs; the decoder of the run itself is left untouched.
    """
    max_len = int(self.config.data.decoder_max_len)

    def tokens_of(split: UserSplit):
      return embedder_lib.tokenize_texts(self.decoder_tokenizer, split.prompt_text, max_len)

    graphdef, params = nnx.split(self.decoder_state.model)
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, params))  # the CL step donates its state
    copy, step = make_cl_training(model, self.decoder_state.wrt, self.config.cl, 1, self.mesh,
                                  self.rules)
    train = self.data.train
    q_tokens, q_mask = tokens_of(train)
    batch_size = min(int(self.config.cl.batch_size), len(train))
    batch_size -= batch_size % parallel.data_parallel_size(self.mesh, self.rules)
    for i in range(int(self.config.eval.history_baseline_steps)):
      index = _rng_for(self.seed, 20_000, i).permutation(len(train))[:batch_size]
      batch = {"profile_tokens": q_tokens[index], "profile_mask": q_mask[index],
               "item_tokens": self.data.item_tokens[train.target[index]],
               "item_mask": self.data.item_mask[train.target[index]],
               "item_ids": train.target[index]}
      copy.state, _ = step(copy.state, parallel.global_batch(batch, self.mesh, self.rules))
    graphdef = copy.graphdef

    @jax.jit
    def embed(state, tokens, mask):
      with parallel.use_mesh(self.mesh, self.rules):
        return nnx.merge(graphdef, state)[0](tokens, mask)

    embed_fn = lambda t, m: embed(copy.state, t, m)
    batch = int(self.config.decoder.embed_batch_size)
    item_emb = retrieval.embed_catalogue(embed_fn, self.data.item_tokens, self.data.item_mask,
                                         batch, mesh=self.mesh, desc="history baseline: items")
    query_emb = retrieval.embed_catalogue(embed_fn, *tokens_of(users), batch, mesh=self.mesh,
                                          desc="history baseline: prompts")
    ranks = retrieval.rank_users(query_emb, item_emb, users.target, users.history, mesh=self.mesh)
    return _metrics_from_ranks(ranks, ks, self.data.num_items)

  def _write_records(self, tag: str, users: UserSplit, profiles, ranks) -> None:
    path = os.path.join(self.workdir, "profiles", f"{tag}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for i in range(len(users)):
        f.write(json.dumps({
            "user": int(users.user[i]),
            "prompt": users.prompt_text[i] if users.prompt_text else None,
            "profile": profiles.texts[i],
            "target": int(users.target[i]),
            "target_text": self.data.item_text[int(users.target[i])] if self.data.item_text
            else None,
            "rank": int(ranks[i]),
        }, ensure_ascii=False) + "\n")
    os.replace(tmp, path)

  # --- bookkeeping -----------------------------------------------------------

  def _global_step(self) -> int:
    cfg = self.config
    per_iter = int(cfg.cl.num_emb_updates) + int(cfg.rl.num_lm_updates)
    offset = 0 if self.position["phase"] == "cl" else int(cfg.cl.num_emb_updates)
    return self.position["iteration"] * per_iter + offset + self.position["step"]

  def _batch_rows(self, num_rows: int, batch_size: int, step: int, iteration: int,
                  stream: int) -> np.ndarray:
    """Rows of batch `step`: a seeded permutation per epoch, so any step is reproducible."""
    epoch, offset = divmod(step, num_rows // batch_size)
    order = _rng_for(self.seed, iteration, stream, epoch).permutation(num_rows)
    return order[offset * batch_size:(offset + 1) * batch_size]

  def _steps(self, phase: str, iteration: int, start: int, stop: int):
    """The step indices of a phase, with a progress bar and the profiling window."""
    desc = f"iteration {iteration}: {'CL (decoder)' if phase == 'cl' else 'RL (encoder)'} updates"
    for step in observability.progress(range(start, stop), desc=desc, total=stop - start):
      self.position = {"iteration": iteration, "phase": phase, "step": step}
      self.profile_window.step(self._global_step())
      yield step

  def _after_step(self, metrics, phase: str, iteration: int, step: int) -> None:
    metrics = _scalars(metrics)
    if not math.isfinite(metrics.get("loss", 0.0)):
      raise NonFiniteLossError(
          f"{phase} step {step} of iteration {iteration}: loss is {metrics['loss']}; the run "
          "stops here and keeps its last good checkpoint (lower the learning rate?)")
    self.position = {"iteration": iteration, "phase": phase, "step": step + 1}
    gstep = self._global_step()
    if self.writer is not None and (step + 1) % int(self.config.logging.every_steps) == 0:
      self.writer.write(gstep, metrics, prefix=f"{phase}/")
    self.curves.append({"phase": phase, "step": gstep, **metrics})
    self._steps_this_run += 1
    every = int(self.config.checkpoint.every_steps)
    stop = 0 < int(self.config.train.stop_after_steps) <= self._steps_this_run
    if (every > 0 and (step + 1) % every == 0) or stop:
      self._save(iteration, phase, step + 1)
    if stop:
      raise StopRequested()

  def _save(self, iteration: int, phase: str, step: int) -> None:
    if self.checkpointer is None:
      return
    self.position = {"iteration": iteration, "phase": phase, "step": step}
    loop = {"position": self.position, "fingerprint": self.fingerprint,
            "history": self.history, "curves": self.curves, "seed": self.seed}
    profiles = ({"texts": self.profiles.texts} if self.profiles is not None else {})
    latest = self.checkpointer.latest_step()
    self.checkpointer.save(0 if latest is None else latest + 1,
                           encoder=self.encoder_state.trainable_state(),
                           decoder=self.decoder_state.trainable_state(), loop=loop,
                           profiles=profiles)

  def restore(self) -> bool:
    """Restores the latest checkpoint if there is one; True when it did."""
    if self.checkpointer is None or self.checkpointer.latest_step() is None:
      return False
    step = self.checkpointer.latest_step()
    enc_target = ckpt_lib.abstract_like(self.encoder_state.trainable_state())
    dec_target = ckpt_lib.abstract_like(self.decoder_state.trainable_state())
    enc, dec, loop, profiles = self.checkpointer.restore(step, encoder_target=enc_target,
                                                         decoder_target=dec_target)
    ckpt_lib.check_compatible(loop["fingerprint"], self.fingerprint,
                              str(self.checkpointer.directory))
    self.encoder_state.load_trainable_state(enc)
    self.decoder_state.load_trainable_state(dec)
    self.position = dict(loop["position"])
    self.history = list(loop.get("history", []))
    self.curves = list(loop.get("curves", []))
    if profiles.get("texts"):
      tokens, mask, truncated = profiles_lib.to_decoder_inputs(
          profiles["texts"], self.decoder_tokenizer, int(self.config.data.decoder_max_len))
      self.profiles = profiles_lib.Profiles(profiles["texts"], tokens, mask, truncated)
    logging.info("resumed from checkpoint %d at %s", step, self.position)
    return True

  # --- the schedule ----------------------------------------------------------

  def run(self) -> list[dict]:
    """Runs (or resumes) the whole schedule; returns the evaluation history.

    With ``train.stop_after_steps`` the run checkpoints and returns early once
    that many updates ran in this process; calling it again resumes.
    """
    try:
      return self._run()
    except StopRequested:
      logging.info("stopped after %d updates at %s", self._steps_this_run, self.position)
      return self.history

  @property
  def finished(self) -> bool:
    return self.position["iteration"] >= int(self.config.train.num_iterations)

  def _run(self) -> list[dict]:
    cfg = self.config
    resumed = bool(cfg.checkpoint.resume) and self.restore()
    if not resumed:
      self.evaluate("zero_shot", baselines=True)
    start = dict(self.position)
    for iteration in range(start["iteration"], int(cfg.train.num_iterations)):
      resuming_here = iteration == start["iteration"]
      if not resuming_here or start["phase"] == "cl":
        if not resuming_here:
          self.profiles = None  # profiles belong to one CL phase
        self.cl_phase(iteration, start["step"] if resuming_here else 0)
        self.profiles = None
        self._save(iteration, "rl", 0)
      self.rl_phase(iteration, start["step"] if resuming_here and start["phase"] == "rl" else 0)
      done = iteration + 1
      self.position = {"iteration": done, "phase": "cl", "step": 0}
      every = int(cfg.train.eval_every_iterations)
      if (every > 0 and done % every == 0) or done == int(cfg.train.num_iterations):
        self.evaluate(f"iteration_{done}")
      self._save(done, "cl", 0)
    return self.history

  def close(self):
    self.profile_window.close()
    if self.checkpointer is not None:
      self.checkpointer.close()
    if self.writer is not None:
      self.writer.close()


def _metrics_from_ranks(ranks, ks, num_items) -> dict[str, float]:
  out = metrics_lib.metrics_at_k(jnp.asarray(ranks), tuple(ks), num_items)
  return {k: float(v) for k, v in out.items()}


def _metrics_from_scores(scores, users: UserSplit, ks) -> dict[str, float]:
  ranks = metrics_lib.target_ranks(jnp.asarray(scores, jnp.float32), jnp.asarray(users.target),
                                   jnp.asarray(users.history))
  return _metrics_from_ranks(ranks, ks, scores.shape[1])


def _eos_ids(tokenizer, model) -> tuple[int, ...]:
  ids = set()
  for source in (getattr(model.config, "eos_ids", None), ):
    if source:
      ids.update(int(i) for i in (source if isinstance(source, (list, tuple)) else [source]))
  if getattr(tokenizer, "eos_token_id", None) is not None:
    ids.add(int(tokenizer.eos_token_id))
  if not ids:
    raise ValueError("the encoder has no EOS token id (neither its config nor its tokenizer)")
  return tuple(sorted(ids))


def _pad_id(tokenizer) -> int:
  for attr in ("pad_token_id", "eos_token_id"):
    value = getattr(tokenizer, attr, None)
    if value is not None:
      return int(value)
  return 0
