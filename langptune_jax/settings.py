"""Typed settings: a validated config converted once into frozen dataclasses.

`config.validate` checks the ``ml_collections`` config (schema and defaults:
configs/base.py); :func:`from_config` then turns it into a :class:`Settings`
with one frozen dataclass per section, and each function receives the section
it reads. Attribute names mirror the config's (``settings.rl.lr`` is
``--config.rl.lr``), so a section reads the same whichever form a caller holds.

The config keeps the paper's role words (docs/method.md §1); the classes name
the roles: the ``encoder`` section is :class:`ProfileWriterSettings` (the LLM
that writes profiles), the ``decoder`` section :class:`RecommenderSettings`
(the text embedder that ranks items).

Defaults live only in configs/base.py: every field is required here, and a
config section with a field these classes do not know is an error, so the
typed layer and the schema cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """``data``: the raw source, the filters and the split (docs/method.md §2)."""

  source: str
  domain: str
  reviews: str
  meta: str
  movielens_dir: str
  dataset_dir: str
  instruction: str
  k_core: int
  history_len: int
  decoder_max_len: int
  prompt_max_len: int
  test_fraction: float
  min_test_interactions: int
  max_users: int
  num_workers: int
  scan_workers: int
  catalogue: str
  keep_duplicate_reviews: bool
  filter_order: str
  prompt_ending: str


@dataclasses.dataclass(frozen=True)
class ProfileWriterSettings:
  """``encoder``: the LLM that writes a profile from a user's history."""

  family: str
  path: str
  dtype: str
  param_dtype: str
  training: str
  num_layers_unfrozen: int
  remat: str
  cache_size: int
  preset: str
  lora_init: str


@dataclasses.dataclass(frozen=True)
class RecommenderSettings:
  """``decoder``: the text embedder that ranks items by similarity to a profile."""

  family: str
  path: str
  dtype: str
  param_dtype: str
  pooling: str
  normalize: bool
  num_layers_unfrozen: int
  embed_batch_size: int
  remat: str
  attention: str
  preset: str


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  rank: int
  alpha: float
  dropout: float
  targets: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """AdamW and its learning-rate schedule (the shared part of ``rl`` and ``cl``)."""

  lr: float
  lr_schedule: str
  warmup_steps: int
  weight_decay: float
  adam_b1: float
  adam_b2: float
  adam_eps: float
  max_grad_norm: float


@dataclasses.dataclass(frozen=True)
class RLSettings(OptimizerSettings):
  """``rl``: RLSO updates of the profile writer (docs/method.md §5)."""

  num_lm_updates: int
  prompts_per_update: int
  num_generations: int
  micro_batch_size: int
  shared_prompt: bool
  reuse_rollout_logprobs: bool
  num_ppo_epochs: int
  eta: float
  kl_coef: float
  whiten_rewards: bool
  whiten_chunk: int
  reward_type: str
  penalty_reward: float
  response_length: int
  temperature: float
  top_k: int
  top_p: float
  stop_at_eos: bool


@dataclasses.dataclass(frozen=True)
class CLSettings(OptimizerSettings):
  """``cl``: InfoNCE alignment of the recommender (docs/method.md §6)."""

  num_emb_updates: int
  batch_size: int
  negatives: str
  group_size: int
  dedupe_negatives: bool
  micro_batch_size: int
  temperature: float

  @property
  def infonce_group_size(self) -> int:
    """Rows of one InfoNCE batch; 0: the whole batch (``negatives='global'``)."""
    return self.group_size if self.negatives == "group" else 0


@dataclasses.dataclass(frozen=True)
class ScheduleSettings:
  """``train``: the alternating schedule (docs/method.md §8)."""

  num_iterations: int
  eval_every_iterations: int
  profile_batch_size: int
  stop_after_steps: int
  cl_users: int


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  ks: tuple[int, ...]
  split: str
  final_split: str
  bootstrap_samples: int
  confidence: float
  temperature: float
  max_users: int
  greedy: bool
  baselines: tuple[str, ...]
  sasrec_steps: int
  reference_perplexity: bool


@dataclasses.dataclass(frozen=True)
class BaselineSettings:
  """``baselines``: the raw-history baseline's own recipe."""

  history_pad_len: int
  history_max_len: int
  history_lr: float
  history_batch_size: int
  history_rounds: int
  history_steps: int


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  data: int
  fsdp: int
  tensor: int
  rules: Any  # None (parallel.DEFAULT_RULES) or ((logical name, mesh axes), ...)


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  enabled: bool
  every_steps: int
  max_to_keep: int
  resume: bool


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
  every_steps: int
  tensorboard: bool
  jsonl: bool
  num_sample_profiles: int


@dataclasses.dataclass(frozen=True)
class ProfileSettings:
  """``profile``: the XLA trace of a window of steps."""

  enabled: bool
  start_step: int
  num_steps: int
  peak_tflops: float


@dataclasses.dataclass(frozen=True)
class ServeSettings:
  host: str
  port: int
  top_k: int
  export_dir: str


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
  path: str
  endpoint: str
  model: str
  num_candidates: int
  max_users: int
  seed: int


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  initialize: bool
  coordinator_address: str
  num_processes: int
  process_id: int
  heartbeat_timeout_seconds: int
  initialization_timeout_seconds: int


@dataclasses.dataclass(frozen=True)
class Settings:
  """The whole run config, typed; section names are the config's."""

  seed: int
  workdir: str
  data: DataSettings
  encoder: ProfileWriterSettings
  decoder: RecommenderSettings
  lora: LoraSettings
  rl: RLSettings
  cl: CLSettings
  train: ScheduleSettings
  eval: EvalSettings
  baselines: BaselineSettings
  mesh: MeshSettings
  checkpoint: CheckpointSettings
  logging: LoggingSettings
  profile: ProfileSettings
  serve: ServeSettings
  judge: JudgeSettings
  distributed: DistributedSettings


class SettingsError(ValueError):
  """A config does not convert: one line naming the field and its value."""


def from_config(config: ml_collections.ConfigDict) -> Settings:
  """Converts a validated config (`config.validate`) into :class:`Settings`."""
  return _convert(Settings, config, "")


def of(config: Settings | ml_collections.ConfigDict) -> Settings:
  """`config` as :class:`Settings`: converted when it is still a ConfigDict."""
  return config if isinstance(config, Settings) else from_config(config)


def field_names(cls=Settings, prefix: str = "") -> list[str]:
  """The dotted names of every leaf setting (``rl.lr``, ...): the config's schema."""
  out = []
  for name, kind in _hints(cls).items():
    if dataclasses.is_dataclass(kind):
      out += field_names(kind, f"{prefix}{name}.")
    else:
      out.append(f"{prefix}{name}")
  return out


@functools.cache
def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _convert(cls, node, prefix: str):
  if not hasattr(node, "keys"):
    raise SettingsError(f"{prefix.rstrip('.')}={node!r}: must be a config section")
  known = [f.name for f in dataclasses.fields(cls)]
  unknown = [k for k in node.keys() if k not in known]
  if unknown:
    raise SettingsError(f"{prefix}{unknown[0]}: config field without a typed setting "
                        f"(langptune_jax/settings.py {cls.__name__})")
  values = {}
  for name, kind in _hints(cls).items():
    key = f"{prefix}{name}"
    if name not in node:
      raise SettingsError(f"{key}: required field is missing")
    if dataclasses.is_dataclass(kind):
      values[name] = _convert(kind, node[name], key + ".")
    else:
      values[name] = _leaf(key, node[name], kind)
  return cls(**values)


def _leaf(key: str, value, kind):
  if kind is Any:
    return _frozen(value)
  if kind is bool:
    ok = isinstance(value, bool)
  elif kind is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif kind is float:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))
  elif kind is str:
    ok = isinstance(value, str)
  else:  # tuple[item, ...]
    item = typing.get_args(kind)[0]
    ok = isinstance(value, (tuple, list)) and all(
        isinstance(v, item) and not isinstance(v, bool) for v in value)
    if ok:
      return tuple(value)
  if not ok:
    shown = repr(value) if isinstance(value, str) else value
    raise SettingsError(f"{key}={shown}: must be {_KIND_NAMES[kind]}")
  return float(value) if kind is float else value


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a finite number",
               str: "a string", tuple[int, ...]: "a list of integers",
               tuple[str, ...]: "a list of strings"}


def _frozen(value):
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  return value
