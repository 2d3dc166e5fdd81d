"""Config helpers: validation, loading config files, workdirs and dtype names.

`validate` runs once at start and checks types, ranges and cross-field rules of
an ``ml_collections`` config (schema: configs/base.py). Every field of the
schema has a rule (tests/test_settings.py walks configs/base.py against
:func:`ruled_fields`), and a field the schema lacks is an error. Every failure
is one line ``field=value: rule``; all failures are reported together in one
:class:`ConfigError`. A validated config converts into typed, frozen sections
with :func:`langptune_jax.settings.from_config`.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
from typing import Any, Callable, Iterable

import ml_collections

# jax and langptune_jax.parallel are imported inside functions: loading and
# checking a config (and `langptune-jax --help`) should not start a backend.

ENCODER_FAMILIES = ("llama", "gemma", "gemma2", "gemma3")
DECODER_FAMILIES = ("bert",) + ENCODER_FAMILIES
DTYPES = ("float32", "bfloat16", "float16")
TRAINING_MODES = ("lora", "partial", "full")
REMAT_MODES = ("none", "full", "dots")
# The recommender's blocks are recomputed whole or not at all (models.embedder.REMAT_MODES).
DECODER_REMAT_MODES = ("none", "full")
DECODER_ATTENTIONS = ("einsum", "fused")
POOLINGS = ("cls", "mean", "last")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
LR_SCHEDULES = ("constant", "linear", "cosine")
REWARD_TYPES = ("ndcg", "mrr")
DATA_SOURCES = ("amazon", "movielens")
DOMAINS = ("movies_tv", "books", "movielens")
EVAL_SPLITS = ("val", "test")
# The authors' protocol first; the second value is the deliberate alternative.
CATALOGUES = ("train_items", "all_items")
FILTER_ORDERS = ("authors", "iterative")
PROMPT_ENDINGS = ("authors", "trimmed")
LORA_INITS = ("peft", "he_uniform")
CL_NEGATIVES = ("group", "global")
# Baselines of docs/method.md §9; the evaluation module owns their implementations.
BASELINES = ("reference_query", "zero_shot", "history", "popularity", "random", "sasrec")


class ConfigError(ValueError):
  """A config failed validation; the message has one line per failure."""

  def __init__(self, failures: list[str]):
    self.failures = list(failures)
    super().__init__("\n".join(self.failures))


# --- loading -----------------------------------------------------------------

def load_config(path: str | pathlib.Path, overrides: dict[str, Any] | None = None,
                arg: str | None = None) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a config file and applies dotted-key overrides.

  Args:
    path: a Python file defining ``get_config()`` (or ``get_config(arg)``).
    overrides: e.g. ``{"rl.lr": 1e-6, "mesh.data": 2}``; each key must exist.
    arg: optional string passed to ``get_config`` (the ``path:arg`` form).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {path} not found")
  spec = importlib.util.spec_from_file_location(f"_langptune_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path}: no get_config() function")
  config = module.get_config(arg) if arg is not None else module.get_config()
  for key, value in (overrides or {}).items():
    set_field(config, key, value)
  return config


def set_field(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets a dotted field (``rl.lr``); unknown fields are an error, not a new field."""
  *parents, leaf = key.split(".")
  node = config
  for i, name in enumerate(parents):
    if name not in node:
      raise ValueError(f"{'.'.join(parents[:i + 1])}: no such config section")
    node = node[name]
  if leaf not in node:
    raise ValueError(f"{key}: no such config field")
  node[leaf] = value


def get_field(config: ml_collections.ConfigDict, key: str, default: Any = None) -> Any:
  node = config
  for name in key.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or name not in node:
      return default
    node = node[name]
  return node


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """Dotted key -> leaf value, in the config's order (for printing and logging)."""
  out: dict[str, Any] = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def resolve_workdir(config: ml_collections.ConfigDict, workdir_flag: str | None = None,
                    config_path: str | None = None, create: bool = True):
  """The run directory: --workdir, else config.workdir, else ./runs/<config name>.

  A local path comes back absolute (pathlib.Path); a ``gs://bucket/...`` address
  stays one (an etils.epath.Path), see :mod:`langptune_jax.fs`.
  """
  from langptune_jax import fs
  workdir = workdir_flag or get_field(config, "workdir") or ""
  if not workdir:
    name = pathlib.Path(config_path.split(":")[0]).stem if config_path else "default"
    workdir = pathlib.Path("runs") / name
  workdir = fs.path(workdir)
  if create:
    try:
      workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise ValueError(f"workdir={workdir}: cannot create it ({e.strerror})") from e
  return workdir


def dtype(name: str):
  """Maps a dtype name from a config (``bfloat16``) to its jnp dtype."""
  if name not in DTYPES:
    raise ValueError(f"dtype {name!r} unknown; known: {', '.join(DTYPES)}")
  import jax.numpy as jnp
  return jnp.dtype(getattr(jnp, name))


def data_parallel_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """Devices that split the batch: the mesh axes the ``batch`` rule maps to."""
  from langptune_jax import parallel
  sizes = parallel.mesh_shape(config.mesh, num_devices)
  rules = parallel.rules_from_config(get_field(config, "mesh.rules"))
  entry = parallel.logical_to_spec(("batch",), rules)[0]
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(sizes[a] for a in axes)


# --- validation --------------------------------------------------------------

_MISSING = object()


class _Checker:
  """Collects one line per failed rule; each check first checks the field's type."""

  def __init__(self, config):
    self.config = config
    self.failures: list[str] = []
    self.ruled: set[str] = set()  # fields a rule looked at (every leaf must be one)

  def get(self, key):
    return get_field(self.config, key, _MISSING)

  def fail(self, key, value, rule):
    shown = "<missing>" if value is _MISSING else repr(value) if isinstance(value, str) else value
    self.failures.append(f"{key}={shown}: {rule}")

  def typed(self, key, kinds, kind_name) -> Any:
    self.ruled.add(key)
    value = self.get(key)
    if value is _MISSING:
      self.fail(key, value, "required field is missing")
      return _MISSING
    # bool is an int subclass; a bool is never a valid number here.
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
      self.fail(key, value, f"must be {kind_name}")
      return _MISSING
    return value

  def integer(self, key, lo=None, hi=None, rule=None):
    value = self.typed(key, (int,), "an integer")
    if value is not _MISSING and not _in_range(value, lo, hi):
      self.fail(key, value, rule or _range_rule(lo, hi))
      return _MISSING
    return value

  def number(self, key, lo=None, hi=None, lo_open=False, hi_open=False, rule=None):
    value = self.typed(key, (int, float), "a number")
    if value is _MISSING:
      return value
    if not math.isfinite(value):
      self.fail(key, value, "must be finite")
      return _MISSING
    if not _in_range(value, lo, hi, lo_open, hi_open):
      self.fail(key, value, rule or _range_rule(lo, hi, lo_open, hi_open))
      return _MISSING
    return value

  def boolean(self, key):
    return self.typed(key, (bool,), "true or false")

  def string(self, key, choices=None, nonempty=False):
    value = self.typed(key, (str,), "a string")
    if value is _MISSING:
      return value
    if choices is not None and value not in choices:
      self.fail(key, value, f"must be one of {', '.join(choices)}")
      return _MISSING
    if nonempty and not value:
      self.fail(key, value, "must not be empty")
      return _MISSING
    return value

  def sequence(self, key, item_ok: Callable[[Any], bool], item_rule, nonempty=True):
    value = self.typed(key, (tuple, list), "a list")
    if value is _MISSING:
      return value
    if nonempty and not value:
      self.fail(key, value, "must not be empty")
      return _MISSING
    bad = [v for v in value if not item_ok(v)]
    if bad:
      self.fail(key, tuple(value), f"{item_rule} (bad: {', '.join(map(repr, bad))})")
      return _MISSING
    return tuple(value)

  def rule(self, ok: bool, key, value, rule):
    if not ok:
      self.fail(key, value, rule)


def _in_range(value, lo, hi, lo_open=False, hi_open=False) -> bool:
  if lo is not None and (value <= lo if lo_open else value < lo):
    return False
  if hi is not None and (value >= hi if hi_open else value > hi):
    return False
  return True


def _range_rule(lo, hi, lo_open=False, hi_open=False) -> str:
  if lo is not None and hi is not None:
    return f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  if lo is not None:
    return f"must be {'>' if lo_open else '>='} {lo}"
  return f"must be {'<' if hi_open else '<='} {hi}"


def _ok(*values) -> bool:
  return all(v is not _MISSING for v in values)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None, *,
             require_data: bool = False, check_paths: bool = False) -> ml_collections.ConfigDict:
  """Checks a config; raises ConfigError listing every failure, one per line.

  Args:
    config: the run config (schema: configs/base.py).
    num_devices: devices the mesh spans; default ``jax.device_count()``.
    require_data: the command reads raw data (prepare/train): Amazon runs need
      data.reviews and data.meta.
    check_paths: also check that non-empty model/data paths exist.

  Returns:
    `config`, unchanged, for chaining.
  """
  if num_devices is None:
    import jax  # a late import keeps config loading free of backend start-up
    num_devices = jax.device_count()
  c = _check(config, num_devices, require_data, check_paths)
  if c.failures:
    raise ConfigError(c.failures)
  return config


def ruled_fields(config: ml_collections.ConfigDict, num_devices: int = 1) -> set[str]:
  """The dotted fields `validate` applies a rule to (each leaf of the schema must be one)."""
  return _check(config, num_devices, require_data=False, check_paths=False).ruled


def _check(config, num_devices: int, require_data: bool, check_paths: bool) -> _Checker:
  c = _Checker(config)
  c.integer("seed", lo=0)
  c.string("workdir")

  _validate_data(c, require_data)
  _validate_models(c)
  _validate_lora(c)
  dp = _validate_mesh(c, num_devices)
  _validate_rl(c, dp)
  _validate_cl(c, dp)
  _validate_schedule_and_eval(c)
  _validate_runtime(c)
  _validate_serving(c)
  if check_paths:
    _validate_paths(c)
  _validate_known_fields(c)
  return c


def _validate_known_fields(c: _Checker) -> None:
  """A field configs/base.py does not have (a typo, a retired field) is an error, not ignored."""
  from langptune_jax import settings
  known = set(settings.field_names())
  for key, value in flatten(c.config).items():
    if key not in known:
      c.fail(key, value, "no such config field (configs/base.py lists every field)")


def _validate_data(c: _Checker, require_data: bool) -> None:
  source = c.string("data.source", DATA_SOURCES)
  c.string("data.domain", DOMAINS)
  for key in ("data.reviews", "data.meta", "data.movielens_dir", "data.dataset_dir"):
    c.string(key)
  if require_data and source == "amazon":
    for key in ("data.reviews", "data.meta"):
      value = c.get(key)
      c.rule(not isinstance(value, str) or bool(value), key, value,
             "data.source='amazon' needs the Amazon Reviews 2023 JSONL path")
  c.string("data.instruction", nonempty=True)
  c.integer("data.k_core", lo=1)
  c.integer("data.history_len", lo=1)
  c.integer("data.decoder_max_len", lo=2)
  c.integer("data.prompt_max_len", lo=1)
  c.number("data.test_fraction", lo=0, hi=1, lo_open=True, hi_open=True)
  c.integer("data.min_test_interactions", lo=1)
  c.integer("data.max_users", lo=0, rule="must be >= 0 (0: all users)")
  c.integer("data.num_workers", lo=0)
  c.integer("data.scan_workers", lo=0)
  c.string("data.catalogue", CATALOGUES)
  c.boolean("data.keep_duplicate_reviews")
  c.string("data.filter_order", FILTER_ORDERS)
  c.string("data.prompt_ending", PROMPT_ENDINGS)


def _validate_models(c: _Checker) -> None:
  c.string("encoder.family", ENCODER_FAMILIES)
  c.string("decoder.family", DECODER_FAMILIES)
  for section in ("encoder", "decoder"):
    c.string(f"{section}.path")
    c.string(f"{section}.dtype", DTYPES)
    c.string(f"{section}.param_dtype", DTYPES)
  training = c.string("encoder.training", TRAINING_MODES)
  unfrozen = c.integer("encoder.num_layers_unfrozen", lo=0)
  if training == "partial" and unfrozen is not _MISSING:
    c.rule(unfrozen >= 1, "encoder.num_layers_unfrozen", unfrozen,
           "must be >= 1 when encoder.training='partial'")
  c.string("encoder.remat", REMAT_MODES)
  c.string("encoder.lora_init", LORA_INITS)
  cache = c.integer("encoder.cache_size", lo=0, rule="must be >= 0 (0: prompt + response)")
  prompt, response = c.get("data.prompt_max_len"), c.get("rl.response_length")
  if _ok(cache, prompt, response) and cache > 0 and all(
      isinstance(v, int) for v in (prompt, response)):
    c.rule(prompt + response <= cache, "encoder.cache_size", cache,
           f"must hold data.prompt_max_len + rl.response_length = {prompt} + {response} "
           f"= {prompt + response} tokens")
  c.string("decoder.pooling", POOLINGS)
  c.boolean("decoder.normalize")
  c.integer("decoder.num_layers_unfrozen", lo=-1, rule="must be -1 (all layers) or >= 0")
  c.integer("decoder.embed_batch_size", lo=1)
  c.string("decoder.remat", DECODER_REMAT_MODES)
  c.string("decoder.attention", DECODER_ATTENTIONS)
  _check_preset(c, "encoder", bert=False)
  _check_preset(c, "decoder", bert=c.get("decoder.family") == "bert")


def _check_preset(c: _Checker, section: str, bert: bool) -> None:
  preset = c.string(f"{section}.preset")
  if _ok(preset) and preset:
    from langptune_jax.models import presets
    table = presets.ENCODERS if bert else presets.DECODERS
    c.rule(presets.is_known(preset, table), f"{section}.preset", preset,
           f"must be empty (the shape from {section}.path) or one of {', '.join(table)}")


def _validate_lora(c: _Checker) -> None:
  training = c.get("encoder.training")
  rank = c.integer("lora.rank", lo=0)
  if training == "lora" and rank is not _MISSING:
    c.rule(rank >= 1, "lora.rank", rank, "must be >= 1 when encoder.training='lora'")
  c.number("lora.alpha", lo=0, lo_open=True)
  c.number("lora.dropout", lo=0, hi=1, hi_open=True)
  c.sequence("lora.targets", lambda t: t in LORA_TARGETS,
             f"each target must be one of {', '.join(LORA_TARGETS)}",
             nonempty=training == "lora")


def _validate_mesh(c: _Checker, num_devices: int) -> int | None:
  """Checks the mesh and rules; returns the data-parallel size (None if invalid)."""
  from langptune_jax import parallel
  sizes_ok = True
  for axis in parallel.MESH_AXES:
    sizes_ok &= c.integer(f"mesh.{axis}") is not _MISSING
  rules = c.get("mesh.rules")
  c.ruled.add("mesh.rules")
  rules_ok = True
  if rules is not None and rules is not _MISSING:
    try:
      resolved = parallel.rules_from_config(rules)
      bad = [axes for _, axes in resolved
             for a in ((axes,) if isinstance(axes, str) else axes or ())
             if a not in parallel.MESH_AXES]
      if bad:
        c.fail("mesh.rules", rules, f"mesh axes must be among {', '.join(parallel.MESH_AXES)}")
        rules_ok = False
    except (TypeError, ValueError):
      c.fail("mesh.rules", rules, "must be a list of [logical_name, mesh_axis_or_list_or_None]")
      rules_ok = False
  if not sizes_ok:
    return None
  try:
    parallel.mesh_shape(c.config.mesh, num_devices)
  except parallel.ShardingError as e:
    c.failures.append(str(e))
    return None
  if not rules_ok:
    return None
  return data_parallel_size(c.config, num_devices)


def _validate_optimizer(c: _Checker, section: str) -> None:
  c.number(f"{section}.lr", lo=0, lo_open=True)
  c.string(f"{section}.lr_schedule", LR_SCHEDULES)
  c.integer(f"{section}.warmup_steps", lo=0)
  c.number(f"{section}.weight_decay", lo=0)
  c.number(f"{section}.adam_b1", lo=0, hi=1, hi_open=True)
  c.number(f"{section}.adam_b2", lo=0, hi=1, hi_open=True)
  c.number(f"{section}.adam_eps", lo=0, lo_open=True)
  c.number(f"{section}.max_grad_norm", lo=0, rule="must be >= 0 (0: no clipping)")


def _check_batch(c: _Checker, key: str, batch, micro_key: str, dp: int | None,
                 per_prompt: int = 1, factor_key: str = "") -> None:
  """Global batch and micro-batch rows must split evenly over data-parallel devices."""
  micro = c.integer(micro_key, lo=0, rule="must be >= 0 (0: the whole batch)")
  if batch is _MISSING:
    return
  rows = f"{key} x {factor_key} = {batch * per_prompt} " if factor_key else ""
  if dp is not None and (batch * per_prompt) % dp:
    c.fail(key, batch, f"{rows}must be divisible by the data-parallel size {dp} "
           "(the mesh axes the batch is split over)")
  if micro is _MISSING or micro == 0:
    return
  if batch % micro:
    c.fail(micro_key, micro, f"must divide {key}={batch}")
  elif dp is not None and (micro * per_prompt) % dp:
    c.fail(micro_key, micro, f"micro-batch rows {micro * per_prompt} must be divisible by "
           f"the data-parallel size {dp}")


def _validate_rl(c: _Checker, dp: int | None) -> None:
  _validate_optimizer(c, "rl")
  c.integer("rl.num_lm_updates", lo=0)
  prompts = c.integer("rl.prompts_per_update", lo=1)
  gens = c.integer("rl.num_generations", lo=2, rule="must be >= 2 (rewards are compared in pairs)")
  if gens is not _MISSING:
    _check_batch(c, "rl.prompts_per_update", prompts, "rl.micro_batch_size", dp, gens,
                 factor_key="rl.num_generations")
  c.integer("rl.num_ppo_epochs", lo=1)
  c.number("rl.eta", lo=0, lo_open=True)
  c.number("rl.kl_coef", lo=0)
  whiten = c.boolean("rl.whiten_rewards")
  chunk = c.integer("rl.whiten_chunk", lo=0, rule="must be >= 0 (0: the whole batch)")
  if whiten is True and _ok(chunk, prompts, gens) and 0 < chunk < prompts * gens:
    c.rule(chunk % gens == 0 and (prompts * gens) % chunk == 0, "rl.whiten_chunk", chunk,
           f"must be a multiple of rl.num_generations={gens} that divides the "
           f"{prompts * gens} rewards of an update (or >= them, or 0: one chunk)")
  c.string("rl.reward_type", REWARD_TYPES)
  c.number("rl.penalty_reward")
  c.integer("rl.response_length", lo=1)
  c.number("rl.temperature", lo=0, lo_open=True)
  c.integer("rl.top_k", lo=0, rule="must be >= 0 (0: no top-k)")
  c.number("rl.top_p", lo=0, hi=1, lo_open=True)
  c.boolean("rl.stop_at_eos")
  c.boolean("rl.shared_prompt")
  c.boolean("rl.reuse_rollout_logprobs")


def _validate_cl(c: _Checker, dp: int | None) -> None:
  _validate_optimizer(c, "cl")
  c.integer("cl.num_emb_updates", lo=0)
  batch = c.integer("cl.batch_size", lo=2, rule="must be >= 2 (in-batch negatives)")
  _check_batch(c, "cl.batch_size", batch, "cl.micro_batch_size", dp)
  c.number("cl.temperature", lo=0, lo_open=True)
  negatives = c.string("cl.negatives", CL_NEGATIVES)
  group = c.integer("cl.group_size", lo=2, rule="must be >= 2 (in-group negatives)")
  if negatives == "group" and _ok(batch, group):
    c.rule(batch % group == 0, "cl.batch_size", batch,
           f"must be a multiple of cl.group_size={group} with cl.negatives='group'")
  c.boolean("cl.dedupe_negatives")


def _validate_schedule_and_eval(c: _Checker) -> None:
  c.integer("train.num_iterations", lo=0)
  c.integer("train.eval_every_iterations", lo=0, rule="must be >= 0 (0: no evaluation)")
  c.integer("train.profile_batch_size", lo=1)
  c.integer("train.stop_after_steps", lo=0, rule="must be >= 0 (0: run to the end)")
  cl_users = c.integer("train.cl_users", lo=0, rule="must be >= 0 (0: every train user)")
  batch = c.get("cl.batch_size")
  if cl_users is not _MISSING and cl_users > 0 and isinstance(batch, int):
    c.rule(cl_users >= batch, "train.cl_users", cl_users,
           f"must be >= cl.batch_size={batch} (each CL step draws a batch from these users)")
  c.sequence("eval.ks", lambda k: isinstance(k, int) and not isinstance(k, bool) and k >= 1,
             "each k must be a positive integer")
  c.string("eval.split", EVAL_SPLITS)
  c.string("eval.final_split", EVAL_SPLITS)
  c.integer("eval.bootstrap_samples", lo=0, rule="must be >= 0 (0: no confidence intervals)")
  c.number("eval.confidence", lo=0, hi=1, lo_open=True, hi_open=True)
  c.number("eval.temperature", lo=0, lo_open=True)
  pad = c.integer("baselines.history_pad_len", lo=2)
  keep = c.integer("baselines.history_max_len", lo=2)
  if _ok(pad, keep):
    c.rule(keep <= pad, "baselines.history_max_len", keep,
           f"must be <= baselines.history_pad_len={pad} (the last tokens of the padded text)")
  c.number("baselines.history_lr", lo=0, lo_open=True)
  c.integer("baselines.history_batch_size", lo=2, rule="must be >= 2 (in-batch negatives)")
  c.integer("baselines.history_rounds", lo=0)
  c.integer("baselines.history_steps", lo=0)
  c.integer("eval.max_users", lo=0, rule="must be >= 0 (0: the whole split)")
  c.boolean("eval.greedy")
  c.boolean("eval.reference_perplexity")
  c.integer("eval.sasrec_steps", lo=1)
  c.sequence("eval.baselines", lambda b: b in BASELINES,
             f"each baseline must be one of {', '.join(BASELINES)}", nonempty=False)


def _validate_runtime(c: _Checker) -> None:
  c.boolean("checkpoint.enabled")
  c.integer("checkpoint.every_steps", lo=1)
  c.integer("checkpoint.max_to_keep", lo=1)
  c.boolean("checkpoint.resume")
  c.integer("logging.every_steps", lo=1)
  c.boolean("logging.tensorboard")
  c.boolean("logging.jsonl")
  c.integer("logging.num_sample_profiles", lo=0)
  c.boolean("profile.enabled")
  c.integer("profile.start_step", lo=0)
  c.integer("profile.num_steps", lo=1)
  c.number("profile.peak_tflops", lo=0, rule="must be >= 0 (0: look up the chip)")
  c.boolean("distributed.initialize")
  c.string("distributed.coordinator_address")
  procs = c.integer("distributed.num_processes", lo=0, rule="must be >= 0 (0: from the environment)")
  pid = c.integer("distributed.process_id", lo=-1, rule="must be >= -1 (-1: from the environment)")
  if _ok(procs, pid) and procs > 0 and pid >= procs:
    c.fail("distributed.process_id", pid, f"must be < distributed.num_processes={procs}")
  c.integer("distributed.heartbeat_timeout_seconds", lo=1)
  c.integer("distributed.initialization_timeout_seconds", lo=1)


def _validate_serving(c: _Checker) -> None:
  c.string("serve.host", nonempty=True)
  c.integer("serve.port", lo=1, hi=65535)
  c.integer("serve.top_k", lo=1)
  c.string("serve.export_dir")
  c.string("judge.path")
  endpoint = c.string("judge.endpoint")
  c.rule(not _ok(endpoint) or not endpoint or endpoint.startswith(("http://", "https://")),
         "judge.endpoint", endpoint, "must be empty or an http(s):// URL")
  c.string("judge.model")
  c.integer("judge.num_candidates", lo=2)
  c.integer("judge.max_users", lo=0, rule="must be >= 0 (0: all)")
  c.integer("judge.seed", lo=0)


def _validate_paths(c: _Checker) -> None:
  keys: Iterable[str] = ("encoder.path", "decoder.path", "data.movielens_dir")
  if c.get("data.source") == "amazon":
    keys = tuple(keys) + ("data.reviews", "data.meta")
  for key in keys:
    value = c.get(key)
    if isinstance(value, str) and value and not pathlib.Path(value).expanduser().exists():
      c.fail(key, value, "path does not exist")
