"""The training set-up, built once from the config and the two models.

`train`, `plan` and the benchmarks all start here, so what `plan` compiles is
what `train` runs. From the config and the models it builds

* the trainable filters (LoRA adapters, the top blocks, or everything),
* the LoRA adapters themselves (added in place when ``encoder.training=lora``),
* the frozen reference policy of the RL objective,
* both train states (module + AdamW, sharded on the mesh), and
* every jitted step: sample, policy/reference log-probs, the RLSO update, the
  CL update, the embedding of a text batch and the rewards of a rollout.

:func:`build` takes loaded models and places real arrays; :func:`build_abstract`
takes model constructors and builds the same set-up from shapes alone
(``ShapeDtypeStruct`` leaves that carry their shardings), which is what the
memory plan compiles from. Both take the typed settings (or a validated config,
converted here) and hand each piece the section it reads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
from flax import nnx

from langptune_jax import parallel
from langptune_jax import settings as settings_lib
from langptune_jax.models import embedder as embedder_lib
from langptune_jax.models import finetune
from langptune_jax.models import lora as lora_lib
from langptune_jax.rec import metrics as metrics_lib
from langptune_jax.rec import retrieval
from langptune_jax.train import contrastive, rlso
from langptune_jax.train import profiles as profiles_lib
from langptune_jax.train import state as state_lib
from langptune_jax.weights import hf as hf_weights


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


def ranker_trainable_filter(embedder: embedder_lib.Embedder, num_layers_unfrozen: int):
  """All parameters (``num_layers_unfrozen < 0``) or those of the top blocks."""
  if num_layers_unfrozen < 0:
    return nnx.Param
  total = embedder.num_layers()
  if num_layers_unfrozen > total:
    raise ValueError(f"decoder.num_layers_unfrozen={num_layers_unfrozen}: the decoder has only "
                     f"{total} layers")
  return TopLayersFilter(total - num_layers_unfrozen)


def writer_trainable_filter(encoder: nnx.Module, writer: settings_lib.ProfileWriterSettings):
  """The trainable filter of ``encoder.training`` (`writer`: the ``encoder`` section)."""
  return finetune.model_trainable_filter(encoder, writer.training, writer.num_layers_unfrozen)


def add_adapters(encoder: nnx.Module, config, seed: int) -> nnx.Module:
  """Adds the LoRA adapters in place when ``encoder.training=lora``; returns the encoder."""
  s = settings_lib.of(config)
  if s.encoder.training == "lora":
    lora = s.lora
    lora_lib.apply_lora(encoder, targets=lora.targets, rank=lora.rank, alpha=lora.alpha,
                        dropout=lora.dropout, init=s.encoder.lora_init, rngs=nnx.Rngs(seed))
  return encoder


def schedule_lengths(config) -> tuple[int, int]:
  """Optimizer steps of the whole run: (encoder, decoder).

  Every RLSO update runs ``rl.num_ppo_epochs`` optimizer steps, so the
  encoder's learning-rate schedule spans all of them.
  """
  s = settings_lib.of(config)
  iterations = s.train.num_iterations
  rl_total = iterations * s.rl.num_lm_updates * s.rl.num_ppo_epochs
  cl_total = iterations * s.cl.num_emb_updates
  return rl_total, cl_total


# --- the two models --------------------------------------------------------------

def load_writer(writer: settings_lib.ProfileWriterSettings, mesh,
                rules=parallel.DEFAULT_RULES) -> nnx.Module:
  """The profile writer (``encoder`` section): a decoder-only LLM, HF directory or GGUF."""
  return hf_weights.load_decoder(writer.path, dtype=writer.dtype,
                                 param_dtype=writer.param_dtype, mesh=mesh, rules=rules,
                                 remat=writer.remat)[0]


def load_recommender(recommender: settings_lib.RecommenderSettings,
                     mesh) -> embedder_lib.Embedder:
  """The recommender (``decoder`` section): a text embedder, BERT or an LLM."""
  return embedder_lib.load_embedder(
      recommender.family, recommender.path, pooling=recommender.pooling,
      normalize=recommender.normalize, dtype=recommender.dtype,
      param_dtype=recommender.param_dtype, mesh=mesh, remat=recommender.remat,
      attention=recommender.attention)


def make_cl_training(decoder: embedder_lib.Embedder, wrt, cl_config, total_steps: int, mesh,
                     rules=parallel.DEFAULT_RULES):
  """The decoder's train state (AdamW from `cl_config`) and its jitted InfoNCE step.

  `cl_config` is the ``cl`` section (:class:`~langptune_jax.settings.CLSettings`, or any
  object with its fields, e.g. the history baseline's variant of it).
  """
  train_state = state_lib.TrainState.create(decoder, state_lib.adamw(cl_config, total_steps), wrt,
                                            mesh, rules)
  return train_state, make_cl_step(train_state, cl_config, mesh, rules)


def make_cl_step(train_state: state_lib.TrainState, cl_config, mesh,
                 rules=parallel.DEFAULT_RULES):
  return contrastive.make_cl_step(
      train_state, mesh, temperature=cl_config.temperature,
      micro_batch_size=cl_config.micro_batch_size, rules=rules,
      group_size=cl_config.group_size if cl_config.negatives == "group" else 0,
      dedupe_negatives=cl_config.dedupe_negatives)


def sampling_settings(config, eos_ids, pad_id: int) -> profiles_lib.SamplingSettings:
  return profiles_lib.SamplingSettings.from_config(settings_lib.of(config), eos_ids, pad_id)


# --- the jitted steps ------------------------------------------------------------

def make_embed(train_state: state_lib.TrainState, mesh, rules=parallel.DEFAULT_RULES):
  """jit ``embed(state, tokens, mask) -> [rows, D]`` of an embedder's train state."""
  graphdef = train_state.graphdef

  @jax.jit
  def embed(state, tokens, mask):
    with parallel.use_mesh(mesh, rules):
      model, _ = nnx.merge(graphdef, state)
      return model(tokens, mask)

  return embed


def make_sample(train_state: state_lib.TrainState, settings: profiles_lib.SamplingSettings,
                mesh, rules=parallel.DEFAULT_RULES):
  """jit ``sample(state, tokens, mask, rng) -> (tokens, response_mask, logprobs)``: a rollout
  traced as one program (prefill, cache and decode loop together)."""
  graphdef = train_state.graphdef

  def sample(state, tokens, mask, rng):
    with parallel.use_mesh(mesh, rules):
      model, _ = nnx.merge(graphdef, state)
      out = profiles_lib.generate(model, tokens, mask, settings, rng)
      return out.tokens, out.response_mask, out.logprobs

  return jax.jit(sample, in_shardings=(train_state.shardings, None, None, None))


def make_rewards(rl_config: settings_lib.RLSettings, mesh, rules=parallel.DEFAULT_RULES):
  """jit ``rewards(profile_emb, item_emb, targets, history, truncated) -> (reward, metrics)``."""
  reward_type = rl_config.reward_type
  penalty = rl_config.penalty_reward

  @jax.jit
  def rewards(profile_emb, item_emb, targets, history, truncated):
    with parallel.use_mesh(mesh, rules):
      reward, ranks = retrieval.profile_rewards(
          profile_emb, item_emb, targets, history, reward_type=reward_type,
          truncated=truncated, penalty_reward=penalty, return_ranks=True)
      return reward, metrics_lib.rank_log_metrics(ranks)

  return rewards


@dataclasses.dataclass(frozen=True)
class Steps:
  """Every jitted step of a run; each takes its train state's ``state`` first."""

  sample: Callable  # (encoder state, tokens, mask, rng) -> (tokens, response_mask, logprobs)
  policy_logprobs: Callable  # (encoder state, reference, batch) -> (logp_old, logp_ref, ...)
  rlso_pass: Callable  # (encoder state, batch) -> (encoder state, metrics)
  cl_step: Callable  # (decoder state, batch) -> (decoder state, metrics)
  embed: Callable  # (decoder state, tokens, mask) -> embeddings
  rewards: Callable  # (profile_emb, item_emb, targets, history, truncated) -> (reward, metrics)


def make_steps(config: settings_lib.Settings, writer_state: state_lib.TrainState,
               ranker_state: state_lib.TrainState, rl_settings: rlso.RLSOSettings,
               sampling: profiles_lib.SamplingSettings, mesh,
               rules=parallel.DEFAULT_RULES) -> Steps:
  return Steps(
      sample=make_sample(writer_state, sampling, mesh, rules),
      policy_logprobs=rlso.make_policy_logprobs(writer_state, mesh, rl_settings, rules),
      rlso_pass=rlso.make_rlso_pass(writer_state, mesh, rl_settings, rules),
      cl_step=make_cl_step(ranker_state, config.cl, mesh, rules),
      embed=make_embed(ranker_state, mesh, rules),
      rewards=make_rewards(config.rl, mesh, rules))


# --- the whole set-up ------------------------------------------------------------

@dataclasses.dataclass
class TrainingSetup:
  """Train states, reference policy, settings and jitted steps of one run."""

  settings: settings_lib.Settings  # the run's typed config, converted once
  writer_state: state_lib.TrainState
  ranker_state: state_lib.TrainState
  reference: finetune.ReferencePolicy
  rl_settings: rlso.RLSOSettings
  sampling: profiles_lib.SamplingSettings
  steps: Steps
  writer_trainable: int  # trainable parameter counts (for FLOPs and reports)
  writer_total: int
  ranker_trainable: int
  ranker_total: int
  writer_config: Any  # the models' architecture configs
  ranker_config: Any
  mesh: Any
  rules: Any


def _count(model: nnx.Module, wrt) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, wrt)))


def _assemble(config: settings_lib.Settings, encoder, decoder, writer_state, ranker_state,
              reference, sampling, mesh, rules) -> TrainingSetup:
  rl_settings = rlso.RLSOSettings.from_config(config.rl)
  return TrainingSetup(
      settings=config, writer_state=writer_state, ranker_state=ranker_state,
      reference=reference, rl_settings=rl_settings, sampling=sampling,
      steps=make_steps(config, writer_state, ranker_state, rl_settings, sampling, mesh, rules),
      writer_trainable=_count(encoder, writer_state.wrt),
      writer_total=_count(encoder, nnx.Param),
      ranker_trainable=_count(decoder, ranker_state.wrt),
      ranker_total=_count(decoder, nnx.Param),
      writer_config=encoder.config, ranker_config=decoder.model.config, mesh=mesh,
      rules=rules)


def build(config, encoder: nnx.Module, decoder: embedder_lib.Embedder, *, eos_ids, pad_id: int,
          mesh, rules=parallel.DEFAULT_RULES) -> TrainingSetup:
  """The set-up of a run on loaded models (LoRA adapters are added to `encoder` in place).

  `config`: :class:`~langptune_jax.settings.Settings` or a validated config.
  """
  config = settings_lib.of(config)
  add_adapters(encoder, config, config.seed)
  mode = config.encoder.training
  reference = finetune.ReferencePolicy.from_model(
      encoder, mode, num_layers_unfrozen=config.encoder.num_layers_unfrozen)
  enc_wrt = writer_trainable_filter(encoder, config.encoder)
  dec_wrt = ranker_trainable_filter(decoder, config.decoder.num_layers_unfrozen)
  rl_total, cl_total = schedule_lengths(config)
  writer_state = state_lib.TrainState.create(
      encoder, state_lib.adamw(config.rl, rl_total), enc_wrt, mesh, rules)
  ranker_state = state_lib.TrainState.create(
      decoder, state_lib.adamw(config.cl, cl_total), dec_wrt, mesh, rules)
  if reference.state is not None:
    ref_shardings = parallel.state_shardings(reference.state, mesh, rules)
    reference = reference.replace(state=jax.device_put(reference.state, ref_shardings))
  return _assemble(config, encoder, decoder, writer_state, ranker_state, reference,
                   sampling_settings(config, eos_ids, pad_id), mesh, rules)


def with_shardings(state, shardings):
  """ShapeDtypeStructs carrying their shardings (what ``.lower`` needs)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def _abstract_state(build_model: Callable[[], nnx.Module], make_wrt: Callable, tx, mesh, rules):
  """(abstract model, TrainState with ShapeDtypeStruct leaves) from a model constructor."""
  def build_both():
    model = build_model()
    return model, nnx.Optimizer(model, tx, wrt=make_wrt(model))

  model, optimizer = nnx.eval_shape(build_both)
  graphdef, state = nnx.split((model, optimizer))
  shardings = parallel.state_shardings(state, mesh, rules)
  return model, state_lib.TrainState(graphdef, with_shardings(state, shardings), shardings,
                                     make_wrt(model))


def build_abstract(config, make_encoder: Callable[[], nnx.Module],
                   make_decoder: Callable[[], embedder_lib.Embedder], *, eos_ids, pad_id: int,
                   mesh, rules=parallel.DEFAULT_RULES) -> TrainingSetup:
  """:func:`build` from shapes alone: no weights are loaded or allocated."""
  config = settings_lib.of(config)
  rl_total, cl_total = schedule_lengths(config)
  encoder, writer_state = _abstract_state(
      lambda: add_adapters(make_encoder(), config, config.seed),
      lambda m: writer_trainable_filter(m, config.encoder),
      state_lib.adamw(config.rl, rl_total), mesh, rules)
  decoder, ranker_state = _abstract_state(
      make_decoder, lambda m: ranker_trainable_filter(m, config.decoder.num_layers_unfrozen),
      state_lib.adamw(config.cl, cl_total), mesh, rules)
  mode = config.encoder.training
  state = None
  if mode != "lora":  # the frozen copy of the trainable part
    state = nnx.state(encoder, writer_state.wrt)
    state = with_shardings(state, parallel.state_shardings(state, mesh, rules))
  reference = finetune.ReferencePolicy(mode=mode, wrt=writer_state.wrt, state=state)
  return _assemble(config, encoder, decoder, writer_state, ranker_state, reference,
                   sampling_settings(config, eos_ids, pad_id), mesh, rules)
