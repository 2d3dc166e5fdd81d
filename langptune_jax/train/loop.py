"""The alternating LangPTune schedule (docs/method.md §8): CL phase, RL phase, evaluation.

``Trainer`` runs one job on the set-up of :mod:`langptune_jax.train.setup`
(train states, reference policy, jitted steps). Read top-down, it follows the
schedule:

  run       evaluate zero-shot (with baselines), then per iteration:
  CL phase  write a profile for every train user with the current encoder, then
            ``cl.num_emb_updates`` InfoNCE steps on the decoder (held-out users are
            never trained on, by any phase or baseline);
  RL phase  re-embed the whole catalogue with the current decoder, then
            ``rl.num_lm_updates`` RLSO updates of the encoder;
  evaluate  every ``train.eval_every_iterations`` and after the last iteration
            (none with 0), then the final table on ``eval.final_split``.

Every random draw (batch order, sampling keys) is derived from (seed, iteration,
phase, step), so the loop position saved in a checkpoint is all that is needed
to continue a run exactly. One RLSO update is :mod:`langptune_jax.train.rl_update`;
evaluation and baselines live in :mod:`langptune_jax.train.evaluation`.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import jax
import numpy as np
from absl import logging
from flax import nnx

from langptune_jax import distributed, fs, observability, parallel, preemption
from langptune_jax import flops as flops_lib
from langptune_jax.models import embedder as embedder_lib
from langptune_jax.rec import retrieval
from langptune_jax.train import checkpoint as ckpt_lib
from langptune_jax.train import evaluation, rl_update
from langptune_jax.train import profiles as profiles_lib
from langptune_jax.train import setup as setup_lib
from langptune_jax.train.batches import batch_rows, cl_batch, key_for, rng_for
from langptune_jax.train.position import LoopPosition, NonFiniteLossError, Preempted, StopRequested
from langptune_jax.train.run_data import RunData, UserSplit
from langptune_jax.weights import tokenizer as tok_lib


class Trainer:
  """Runs (and resumes) one LangPTune training job."""

  def __init__(self, config, workdir: str, *, data: RunData, encoder: nnx.Module,
               decoder: embedder_lib.Embedder, writer_tokenizer, ranker_tokenizer,
               writer=None, mesh=None):
    self.config = config
    self.workdir = workdir
    self.data = data
    self.writer_tokenizer = writer_tokenizer
    self.ranker_tokenizer = ranker_tokenizer
    self.writer = writer
    self.mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    self.rules = parallel.rules_from_config(config.mesh.rules)
    self.seed = int(config.seed)
    fs.makedirs(workdir)

    self.setup = setup_lib.build(config, encoder, decoder,
                                 eos_ids=profiles_lib.eos_ids(writer_tokenizer, encoder),
                                 pad_id=tok_lib.pad_id(writer_tokenizer),
                                 mesh=self.mesh, rules=self.rules)
    self.settings = self.setup.settings  # typed; `config` stays for the checkpoint fingerprint
    self.writer_state = self.setup.writer_state
    self.ranker_state = self.setup.ranker_state
    self.reference = self.setup.reference
    self.rl_settings = self.setup.rl_settings
    self.sampling = self.setup.sampling
    self.steps = self.setup.steps
    # Step time apart from compile time, tokens/s and MFU in the metrics; the
    # optional XLA trace of a window of steps (config.profile).
    peak = flops_lib.peak_tflops(self.settings.profile.peak_tflops)
    self.rl_timer = flops_lib.StepTimer("rl", num_devices=self.mesh.size,
                                        peak_tflops_per_device=peak)
    self.cl_timer = flops_lib.StepTimer("cl", num_devices=self.mesh.size,
                                        peak_tflops_per_device=peak)
    self.cl_step = self.cl_timer.wrap(self.steps.cl_step)
    self.rlso_update = rl_update.RlsoUpdate(
        self.setup, writer_tokenizer=writer_tokenizer, ranker_tokenizer=ranker_tokenizer,
        embed=self._embed, mesh=self.mesh, rules=self.rules, timer=self.rl_timer)
    # The jitted RL steps, for callers that run them directly.
    self.policy_logprobs = self.rlso_update.policy_logprobs
    self.rlso_pass = self.rlso_update.rlso_pass
    self.profile_window = observability.ProfileWindow(config.profile,
                                                      fs.join(workdir, "profile"))
    self.evaluator = evaluation.Evaluator(
        self.settings, data, workdir, embed_texts=self.embed_texts,
        embed_items=self.item_embeddings_now, write_profiles=self.write_profiles,
        ranker_state=lambda: self.ranker_state, ranker_tokenizer=ranker_tokenizer,
        mesh=self.mesh, rules=self.rules, writer_tokenizer=writer_tokenizer,
        sampling=dataclasses.replace(self.sampling, temperature=self.settings.eval.temperature),
        note_fit=self._note_fit, reference_logprobs=self.reference_logprobs)

    self.position = LoopPosition()
    self.profiles: profiles_lib.Profiles | None = None  # of the CL users, this iteration
    # The catalogue embedded by the decoder, reused until the decoder next moves (a CL step
    # or a restore): RL phases and the evaluations after them share one pass.
    self.item_embeddings: np.ndarray | None = None
    self._decoder_moves = 0
    self._items_embedded_at = -1  # the `_decoder_moves` of `item_embeddings`
    self.history: list[dict] = []  # evaluation results, in order
    self.curves: list[dict] = []  # per-step training scalars, for the report's plots
    # Users each training phase and baseline fit has seen, by name (the leakage check).
    self.fitted_users: dict[str, set[int]] = collections.defaultdict(set)
    self._steps_this_run = 0  # updates since this process started (train.stop_after_steps)
    self.preemption = preemption.Watch()
    self.preempted = False  # stopped by a SIGTERM (checkpointed at a step boundary)
    self.checkpointer = (ckpt_lib.Checkpointer(fs.join(workdir, "checkpoints"),
                                               max_to_keep=self.settings.checkpoint.max_to_keep)
                         if self.settings.checkpoint.enabled else None)
    self.fingerprint = ckpt_lib.config_fingerprint(config)

  # --- the schedule ----------------------------------------------------------

  def run(self) -> list[dict]:
    """Runs (or resumes) the whole schedule; returns the evaluation history.

    With ``train.stop_after_steps`` the run checkpoints and returns early once
    that many updates ran in this process, and after a SIGTERM at the first step
    boundary every process agrees on (``self.preempted``); calling it again resumes.
    """
    try:
      with self.preemption:
        return self._run()
    except StopRequested as e:
      self.preempted = isinstance(e, Preempted)
      logging.info("stopped after %d updates at %s", self._steps_this_run, self.position)
      return self.history

  @property
  def finished(self) -> bool:
    return self.position.iteration >= self.settings.train.num_iterations

  def _run(self) -> list[dict]:
    cfg = self.settings
    resumed = cfg.checkpoint.resume and self.restore()
    every = cfg.train.eval_every_iterations  # 0: the final table only, no validation
    if not resumed:
      # Baselines and zero-shot profiles once per split, before any training.
      splits = (cfg.eval.split, cfg.eval.final_split) if every > 0 else (cfg.eval.final_split,)
      for split in dict.fromkeys(splits):
        self.evaluate("zero_shot", split=split, baselines=True)
      self.evaluator.forget_fits()
    start = self.position
    for iteration in range(start.iteration, cfg.train.num_iterations):
      resuming_here = iteration == start.iteration
      if not resuming_here or start.phase == "cl":
        if not resuming_here:
          self.profiles = None  # profiles belong to one CL phase
        self.cl_phase(iteration, start.step if resuming_here else 0)
        self.profiles = None
        self._save(LoopPosition(iteration, "rl", 0))
      self.rl_phase(iteration, start.step if resuming_here and start.phase == "rl" else 0)
      done = iteration + 1
      self.position = LoopPosition(done, "cl", 0)
      if every > 0 and (done % every == 0 or done == cfg.train.num_iterations):
        self.evaluate(f"iteration_{done}")
      self._save(self.position)
    if not any(e["tag"] == "final" for e in self.history):
      self.evaluate("final", split=cfg.eval.final_split)  # the final table
      self._save(self.position)
    return self.history

  # --- CL phase ----------------------------------------------------------------

  def _cl_users(self) -> UserSplit:
    """The users whose profiles and targets the CL phase trains on: train users only."""
    return self.data.train

  def _note_fit(self, name: str, users) -> None:
    self.fitted_users[name].update(int(u) for u in np.asarray(users).reshape(-1))

  def cl_phase(self, iteration: int, start_step: int = 0) -> None:
    cfg = self.settings.cl
    users = self._cl_users()
    cap = self.settings.train.cl_users
    if 0 < cap < len(users):  # a seeded subset: the same again on resume
      users = users.take(np.sort(rng_for(self.seed, iteration, 5).permutation(len(users))[:cap]))
    if self.profiles is None:
      self.profiles = self.write_profiles(users, key_for(self.seed, iteration, 0),
                                          desc=f"iteration {iteration}: profiles")
      self._save(LoopPosition(iteration, "cl", 0))
    batch_size = cfg.batch_size
    if len(users) < batch_size:
      raise ValueError(f"cl.batch_size={batch_size}: only {len(users)} train users")
    for step in self._steps("cl", iteration, start_step, cfg.num_emb_updates):
      index = batch_rows(self.seed, len(users), batch_size, step, iteration, 1)
      self._note_fit("cl", users.user[index])
      batch = cl_batch(self.profiles.ranker_tokens[index], self.profiles.ranker_mask[index],
                       self.data, users.target[index])
      batch = parallel.global_batch(batch, self.mesh, self.rules)
      self.ranker_state.state, metrics = self.cl_step(self.ranker_state.state, batch)
      self._decoder_moves += 1
      width = self.profiles.ranker_tokens.shape[1]
      metrics = dict(metrics, **self.cl_timer.metrics(
          tokens=2 * batch_size * width,
          flops=flops_lib.cl_step_flops(self.setup.ranker_config, batch_size, width,
                                        trainable_params=self.setup.ranker_trainable)))
      self._after_step(metrics, "cl", iteration, step)

  # --- RL phase ----------------------------------------------------------------

  def rl_phase(self, iteration: int, start_step: int = 0) -> None:
    cfg = self.settings.rl
    item_emb = self.item_embeddings_now(f"iteration {iteration}: embedding items")
    item_emb = parallel.put(item_emb, self.mesh, ("items", None), self.rules)
    users = self.data.train
    num_prompts = cfg.prompts_per_update
    if len(users) < num_prompts:
      raise ValueError(f"rl.prompts_per_update={num_prompts}: only {len(users)} train users")
    for step in self._steps("rl", iteration, start_step, cfg.num_lm_updates):
      prompts = users.take(batch_rows(self.seed, len(users), num_prompts, step, iteration, 2))
      self._note_fit("rl", prompts.user)
      metrics = self.rlso_update(prompts, item_emb, key_for(self.seed, iteration, 3, step),
                                 rng_for(self.seed, iteration, 4, step))
      self._after_step(metrics, "rl", iteration, step)

  # --- models as they are now ------------------------------------------------

  def _embed(self, tokens, mask):
    return self.steps.embed(self.ranker_state.state, tokens, mask)

  def embed_texts(self, tokens: np.ndarray, mask: np.ndarray, desc: str) -> np.ndarray:
    return retrieval.embed_catalogue(self._embed, tokens, mask,
                                     self.settings.decoder.embed_batch_size, mesh=self.mesh,
                                     desc=desc)

  def item_embeddings_now(self, desc: str) -> np.ndarray:
    """The catalogue embedded by the decoder as it is now, [items, D] on the host."""
    if self._items_embedded_at != self._decoder_moves:
      self.item_embeddings = self.embed_texts(self.data.item_tokens, self.data.item_mask, desc)
      self._items_embedded_at = self._decoder_moves
    return self.item_embeddings

  def write_profiles(self, users: UserSplit, key: jax.Array, *, greedy: bool = False,
                     desc: str = "writing profiles", settings=None,
                     keep_tokens: bool = False) -> profiles_lib.Profiles:
    return profiles_lib.write_profiles(
        self.writer_state.model, users.prompt_tokens, users.prompt_mask,
        settings=settings or self.sampling, writer_tokenizer=self.writer_tokenizer,
        ranker_tokenizer=self.ranker_tokenizer,
        decoder_max_len=self.settings.data.decoder_max_len,
        batch_size=self.settings.train.profile_batch_size, rng=key, greedy=greedy,
        mesh=self.mesh, rules=self.rules, desc=desc, keep_tokens=keep_tokens)

  def reference_logprobs(self, prompt_tokens, prompt_mask, response_tokens,
                         response_mask) -> np.ndarray:
    """Each profile's log-prob under the frozen reference writer (its perplexity readout)."""
    return profiles_lib.reference_logprobs(
        self.writer_state.model, self.reference, prompt_tokens, prompt_mask, response_tokens,
        response_mask, batch_size=self.settings.train.profile_batch_size, mesh=self.mesh,
        rules=self.rules, desc="scoring profiles under the reference writer")

  # --- evaluation --------------------------------------------------------------

  def evaluate(self, tag: str, *, split: str | None = None, baselines: bool = False,
               write_records: bool = True) -> dict[str, dict[str, float]]:
    """Evaluates the models as they are now; the results join the run's history."""
    entry = self.evaluator.evaluate(tag, key_for(self.seed, 10_000, len(self.history)),
                                    split=split, baselines=baselines,
                                    write_records=write_records)
    self.history.append(dict(entry, position=dataclasses.asdict(self.position)))
    if self.writer is not None:
      for name, values in entry["results"].items():
        self.writer.write(self.position.global_step(self.settings), values,
                          prefix=f"eval/{entry['split']}/{name}")
    return entry["results"]

  # --- bookkeeping -------------------------------------------------------------

  def _steps(self, phase: str, iteration: int, start: int, stop: int):
    """The step indices of a phase, with a progress bar and the profiling window."""
    desc = f"iteration {iteration}: {'CL (decoder)' if phase == 'cl' else 'RL (encoder)'} updates"
    for step in observability.progress(range(start, stop), desc=desc, total=stop - start):
      self.position = LoopPosition(iteration, phase, step)
      self.profile_window.step(self.position.global_step(self.settings))
      yield step

  def _after_step(self, metrics, phase: str, iteration: int, step: int) -> None:
    metrics = distributed.host_scalars(metrics)
    if not math.isfinite(metrics.get("loss", 0.0)):
      raise NonFiniteLossError(
          f"{phase} step {step} of iteration {iteration}: loss is {metrics['loss']}; the run "
          "stops here and keeps its last good checkpoint (lower the learning rate?)")
    self.position = LoopPosition(iteration, phase, step + 1)
    gstep = self.position.global_step(self.settings)
    if self.writer is not None and (step + 1) % self.settings.logging.every_steps == 0:
      self.writer.write(gstep, metrics, prefix=phase)
    self.curves.append({"phase": phase, "step": gstep, **metrics})
    self._steps_this_run += 1
    every = self.settings.checkpoint.every_steps
    # Every process asks at every step (JAX's sync point needs that), so before any `or`.
    preempted = self.preemption.reached(gstep)
    stop = 0 < self.settings.train.stop_after_steps <= self._steps_this_run
    if (every > 0 and (step + 1) % every == 0) or stop or preempted:
      self._save(self.position)
    if preempted:
      raise Preempted()
    if stop:
      raise StopRequested()

  def _save(self, position: LoopPosition) -> None:
    if self.checkpointer is None:
      return
    self.position = position
    loop = {"position": dataclasses.asdict(position), "fingerprint": self.fingerprint,
            "history": self.history, "curves": self.curves, "seed": self.seed,
            "reference_ranks": self.evaluator.reference_ranks,
            "zero_shot_texts": self.evaluator.zero_shot_texts,
            "zero_shot_readability": self.evaluator.zero_shot_readability}
    profiles = ({"texts": self.profiles.texts} if self.profiles is not None else {})
    latest = self.checkpointer.latest_step()
    self.checkpointer.save(0 if latest is None else latest + 1,
                           encoder=self.writer_state.trainable_state(),
                           decoder=self.ranker_state.trainable_state(), loop=loop,
                           profiles=profiles)

  def restore(self) -> bool:
    """Restores the latest checkpoint if there is one; True when it did."""
    if self.checkpointer is None or self.checkpointer.latest_step() is None:
      return False
    enc_target = ckpt_lib.abstract_like(self.writer_state.trainable_state())
    dec_target = ckpt_lib.abstract_like(self.ranker_state.trainable_state())
    restored = self.checkpointer.restore_latest(
        encoder_target=enc_target, decoder_target=dec_target,
        check=lambda loop: ckpt_lib.check_compatible(loop["fingerprint"], self.fingerprint,
                                                     str(self.checkpointer.directory)))
    if restored is None:
      return False
    step, enc, dec, loop, profiles = restored
    self.writer_state.load_trainable_state(enc)
    self.ranker_state.load_trainable_state(dec)
    self._decoder_moves += 1
    self.position = LoopPosition(**loop["position"])
    self.history = list(loop.get("history", []))
    self.curves = list(loop.get("curves", []))
    self.evaluator.reference_ranks = dict(loop.get("reference_ranks", {}))
    self.evaluator.zero_shot_texts = dict(loop.get("zero_shot_texts", {}))
    self.evaluator.zero_shot_readability = dict(loop.get("zero_shot_readability", {}))
    if profiles.get("texts"):
      tokens, mask, truncated = profiles_lib.to_ranker_inputs(
          profiles["texts"], self.ranker_tokenizer, self.settings.data.decoder_max_len)
      self.profiles = profiles_lib.Profiles(profiles["texts"], tokens, mask, truncated)
    logging.info("resumed from checkpoint %d at %s", step, self.position)
    return True

  def close(self):
    self.profile_window.close()
    if self.checkpointer is not None:
      self.checkpointer.close()
    if self.writer is not None:
      self.writer.close()
