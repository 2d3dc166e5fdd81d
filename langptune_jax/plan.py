"""Ahead-of-time memory plan: will a config fit the chips it is meant for?

``langptune-jax plan --config=...`` builds both models from shapes alone (no
weights: ``nnx.eval_shape``), places every parameter and optimizer moment in
its sharding on the configured mesh, and compiles each jitted step ahead of
time from ``ShapeDtypeStruct`` arguments: the rollout's prefill and decode,
the log-probabilities of policy and reference, the RLSO update, the CL update
and the catalogue embedding. It prints, per device:

* resident state: parameters and optimizer state of both models (counted
  from each leaf's shard shape), and the frozen reference copy if any;
* per step: the KV cache (analytic), XLA's temporaries and the step's other
  inputs/outputs (from ``compiled.memory_analysis()``), and the total;
* for each chip (v4, v5e, v5p, v6e, A100, H100, H200): whether the largest
  total fits its HBM with 10% headroom.

To plan a mesh larger than the machine, run on CPU with emulated devices,
e.g. ``JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=16``.
XLA's CPU compiler assigns buffers differently from the TPU/GPU ones, so
temporaries there are an estimate; parameter, optimizer and cache numbers are
exact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import sys
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from langptune_jax import flops, parallel
from langptune_jax.models import layers, presets, transformer

GiB = 1024 ** 3
HEADROOM = 0.9  # usable fraction of HBM (runtime, fragmentation, XLA's own buffers)
VERDICT_CHIPS = ("v4", "v5e", "v5p", "v6e", "a100", "h100", "h200")

# LoRA target name -> the Linear attribute it adapts.
_LORA_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                 "gate": "gate_proj", "up": "up_proj", "down": "down_proj", "lm_head": "lm_head"}


@dataclasses.dataclass
class StepPlan:
  """Per-device bytes of one jitted step (what is not resident state)."""
  name: str
  shape: str  # human-readable batch shape
  kv_cache: int = 0
  temporaries: int | None = None  # None: the backend gave no memory analysis
  io: int = 0  # arguments + outputs - aliased, minus the resident state passed in
  compile_s: float = 0.0
  error: str | None = None

  def extra(self) -> int:
    """Bytes this step needs on top of the resident state."""
    return self.io + (self.temporaries or 0)


@dataclasses.dataclass
class Plan:
  mesh: dict[str, int]
  num_devices: int
  backend: str
  models: list[str]
  resident: dict[str, int]  # per-device bytes of state that lives through training
  steps: list[StepPlan]
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def resident_bytes(self) -> int:
    return sum(self.resident.values())

  def total(self, step: StepPlan) -> int:
    return self.resident_bytes + step.extra()

  @property
  def peak_bytes(self) -> int:
    return max([self.total(s) for s in self.steps if s.error is None] or [self.resident_bytes])

  @property
  def peak_step(self) -> str:
    ok = [s for s in self.steps if s.error is None]
    return max(ok, key=self.total).name if ok else "-"

  def fits(self, chip: flops.Chip, headroom: float = HEADROOM) -> bool:
    return self.peak_bytes <= chip.hbm_gib * GiB * headroom

  def to_dict(self) -> dict:
    return {"mesh": self.mesh, "num_devices": self.num_devices, "backend": self.backend,
            "models": self.models, "resident": self.resident,
            "resident_bytes": self.resident_bytes,
            "steps": [dict(dataclasses.asdict(s), total=self.total(s)) for s in self.steps],
            "peak_bytes": self.peak_bytes, "peak_step": self.peak_step,
            "fits": {flops.CHIPS[c].name: self.fits(flops.CHIPS[c]) for c in VERDICT_CHIPS},
            "headroom": HEADROOM, "notes": self.notes}

  def format(self) -> str:
    mesh = " x ".join(f"{a}={s}" for a, s in self.mesh.items())
    lines = [f"Memory plan per device: mesh {mesh} ({self.num_devices} {self.backend} devices)"]
    lines += [f"  {m}" for m in self.models]
    lines.append("")
    lines.append("resident state (lives through training):")
    for name, b in self.resident.items():
      lines.append(f"  {name:<28s} {_gib(b):>10s}")
    lines.append(f"  {'total':<28s} {_gib(self.resident_bytes):>10s}")
    lines.append("")
    header = (f"{'step':<18s} {'batch':<26s} {'kv cache':>10s} {'temporaries':>12s} "
              f"{'other i/o':>10s} {'total':>10s}")
    lines += [header, "-" * len(header)]
    for s in self.steps:
      if s.error is not None:
        lines.append(f"{s.name:<18s} {s.shape:<26s} failed to compile: {s.error}")
        continue
      temp = "n/a" if s.temporaries is None else _gib(s.temporaries)
      lines.append(f"{s.name:<18s} {s.shape:<26s} {_gib(s.kv_cache):>10s} {temp:>12s} "
                   f"{_gib(max(s.io - s.kv_cache, 0)):>10s} {_gib(self.total(s)):>10s}")
    lines.append("")
    lines.append(f"peak per device: {_gib(self.peak_bytes)} ({self.peak_step})")
    partial = any(s.temporaries is None for s in self.steps if s.error is None)
    for key in VERDICT_CHIPS:
      chip = flops.CHIPS[key]
      verdict = "fits" if self.fits(chip) else "does NOT fit"
      lines.append(f"  {verdict} on {chip.name} ({chip.hbm_gib:g} GiB, {HEADROOM:.0%} usable)"
                   + (" - without temporaries" if partial else ""))
    lines += [f"note: {n}" for n in self.notes]
    return "\n".join(lines)


def _gib(b: int | float) -> str:
  return f"{b / GiB:.3f} GiB" if b >= GiB / 100 else f"{b / 2 ** 20:.2f} MiB"


# --- per-device bytes ----------------------------------------------------------

def _leaf_bytes(value, sharding) -> int:
  """Bytes one device holds of an array (abstract or not) with `sharding`."""
  shape = tuple(value.shape)
  local = sharding.shard_shape(shape) if sharding is not None else shape
  return int(math.prod(local)) * jnp.dtype(value.dtype).itemsize


def tree_bytes(state, shardings) -> int:
  """Per-device bytes of an (abstract) state with its shardings."""
  return sum(_leaf_bytes(v, s) for v, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))


def kv_cache_bytes(cfg: transformer.DecoderConfig, batch: int, cache_len: int, mesh,
                   rules=parallel.DEFAULT_RULES, dtype=None) -> int:
  """Per-device bytes of the KV cache: 2 x layers x [batch, kv_heads, len, head_dim]."""
  shape = (batch, cfg.num_kv_heads, cache_len, cfg.head_dim)
  spec = parallel.logical_to_spec(transformer.KV_AXES, rules, mesh)
  sharding = NamedSharding(mesh, parallel.fit_spec(spec, shape, mesh))
  item = jnp.dtype(dtype or cfg.compute_dtype).itemsize
  return 2 * cfg.num_layers * int(math.prod(sharding.shard_shape(shape))) * item


# --- abstract models -----------------------------------------------------------

def add_lora(model: nnx.Module, targets, *, rank: int, alpha: float, dropout: float = 0.0,
             rngs: nnx.Rngs) -> int:
  """Adds adapters to the Linear layers named by `targets`; returns how many."""
  wanted = {_LORA_MODULES[t] for t in targets if t in _LORA_MODULES}
  count = 0
  for path, module in nnx.iter_graph(model):
    if isinstance(module, layers.Linear) and path and path[-1] in wanted:
      module.add_lora(rank=rank, alpha=alpha, dropout=dropout, rngs=rngs)
      count += 1
  return count


@dataclasses.dataclass
class AbstractModel:
  """A model + optimizer from shapes alone, with shardings (a train state without arrays)."""
  train_state: Any  # train.state.TrainState with ShapeDtypeStruct leaves
  model_graphdef: Any
  model_state: Any  # abstract, model only
  model_shardings: Any
  config: Any
  trainable_params: int
  total_params: int
  model: Any = None  # the abstract module itself
  mesh: Any = None
  rules: Any = parallel.DEFAULT_RULES

  def trainable_state(self):
    """Abstract state of the trainable parameters, with shardings."""
    state = nnx.state(self.model, self.train_state.wrt)
    return with_shardings(state, parallel.state_shardings(state, self.mesh, self.rules))

  @property
  def state(self):
    return self.train_state.state

  @property
  def shardings(self):
    return self.train_state.shardings


def _abstract(build: Callable[[], tuple[nnx.Module, nnx.Optimizer]], wrt, mesh, rules, cfg):
  from langptune_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  model, optimizer = nnx.eval_shape(build)
  graphdef, state = nnx.split((model, optimizer))
  shardings = parallel.state_shardings(state, mesh, rules)
  model_graphdef, model_state = nnx.split(model)
  model_shardings = parallel.state_shardings(model_state, mesh, rules)
  trainable = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, wrt)))
  total = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  ts = state_lib.TrainState(graphdef, with_shardings(state, shardings), shardings, wrt)
  return AbstractModel(ts, model_graphdef, with_shardings(model_state, model_shardings),
                       model_shardings, cfg, trainable, total, model, mesh, rules)


def with_shardings(state, shardings):
  """ShapeDtypeStructs carrying their shardings (what ``.lower`` needs)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def encoder_model(config, mesh, rules=parallel.DEFAULT_RULES) -> AbstractModel:
  """The profile encoder (LLM) with LoRA / partial / full training and its AdamW."""
  from langptune_jax.models import finetune  # pylint: disable=g-import-not-at-top
  from langptune_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  e = config.encoder
  cfg = presets.decoder_config(e.get("preset", ""), e.path, section="encoder",
                               dtype=e.dtype, param_dtype=e.param_dtype, remat=e.remat)
  mode = e.training
  wrt = finetune.trainable_filter(mode, num_layers_unfrozen=int(e.num_layers_unfrozen),
                                  num_layers=cfg.num_layers)
  total_steps = int(config.rl.num_lm_updates) * int(config.train.num_iterations)
  tx = state_lib.adamw(config.rl, max(total_steps, 1))

  def build():
    model = transformer.Decoder(cfg, rngs=nnx.Rngs(0))
    if mode == "lora":
      add_lora(model, tuple(config.lora.targets), rank=int(config.lora.rank),
               alpha=float(config.lora.alpha), rngs=nnx.Rngs(1))
    return model, nnx.Optimizer(model, tx, wrt=wrt)

  return _abstract(build, wrt, mesh, rules, cfg)


@dataclasses.dataclass(frozen=True)
class _TopLayers:
  """NNX filter: parameters of blocks >= first (under any ``layers`` list) and after them."""
  first: int

  def __call__(self, path, variable) -> bool:
    if not isinstance(variable, nnx.Param):
      return False
    for i, key in enumerate(path[:-1]):
      if key == "layers" and isinstance(path[i + 1], int):
        return path[i + 1] >= self.first
    return False


def decoder_model(config, mesh, rules=parallel.DEFAULT_RULES) -> AbstractModel:
  """The recommender decoder (text embedder) and its AdamW."""
  from langptune_jax.models import bert  # pylint: disable=g-import-not-at-top
  from langptune_jax.models import embedder as embedder_lib  # pylint: disable=g-import-not-at-top
  from langptune_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  r = config.decoder
  dtype, param_dtype = jnp.dtype(r.dtype), jnp.dtype(r.param_dtype)
  remat = r.get("remat", "none")
  if r.family == "bert":
    cfg = presets.bert_config(r.get("preset", ""), r.path, dtype=dtype, param_dtype=param_dtype,
                              remat=remat not in ("none", False, ""))
    make = lambda: bert.Bert(cfg, rngs=nnx.Rngs(0))
  else:
    cfg = presets.decoder_config(r.get("preset", ""), r.path, section="decoder", dtype=r.dtype,
                                 param_dtype=r.param_dtype,
                                 remat=remat if isinstance(remat, str) else "none")
    make = lambda: transformer.Decoder(cfg, rngs=nnx.Rngs(0))
  unfrozen = int(r.num_layers_unfrozen)
  wrt = nnx.Param if unfrozen < 0 else _TopLayers(cfg.num_layers - unfrozen)
  total_steps = int(config.cl.num_emb_updates) * int(config.train.num_iterations)
  tx = state_lib.adamw(config.cl, max(total_steps, 1))

  def build():
    model = embedder_lib.Embedder(make(), family=r.family, pooling=r.pooling,
                                  normalize=bool(r.normalize))
    return model, nnx.Optimizer(model, tx, wrt=wrt)

  return _abstract(build, wrt, mesh, rules, cfg)


def _split_state_bytes(m: AbstractModel) -> tuple[int, int, int]:
  """(frozen params, trainable params, optimizer state) per device."""
  flat_state = dict(nnx.to_flat_state(m.state))
  flat_shard = dict(nnx.to_flat_state(m.shardings))
  is_trainable = nnx.filterlib.to_predicate(m.train_state.wrt)
  frozen = trainable = opt = 0
  for path, var in flat_state.items():
    b = _leaf_bytes(var.get_value(), flat_shard[path].get_value())
    if path[0] == 1:  # (model, optimizer) was split as a pair
      opt += b
    elif is_trainable(path[1:], var):
      trainable += b
    else:
      frozen += b
  return frozen, trainable, opt


# --- compiling the steps ---------------------------------------------------------

def _batch(mesh, rules, shape, dtype) -> jax.ShapeDtypeStruct:
  sharding = parallel.batch_sharding(mesh, len(shape), rules)
  sharding = NamedSharding(mesh, parallel.fit_spec(sharding.spec, shape, mesh))
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _replicated(mesh, shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _compile(step: StepPlan, lower: Callable[[], Any], state_bytes: int, enabled: bool = True,
             log: Callable[[str], Any] = logging.info):
  """Compiles `lower()`; fills temporaries and i/o of `step`; returns the compiled object.

  Before compiling, `step.io` holds an analytic estimate (the batch); XLA's
  memory analysis replaces it. With `enabled=False` nothing is compiled.
  """
  import time  # pylint: disable=g-import-not-at-top
  if not enabled:
    return None
  log(f"plan: compiling {step.name} ({step.shape})")
  start = time.perf_counter()
  try:
    compiled = lower().compile()
  except Exception as e:  # one failing step should not hide the others
    logging.debug("plan: %s failed", step.name, exc_info=True)
    step.error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return None
  step.compile_s = time.perf_counter() - start
  log(f"plan: {step.name} compiled in {step.compile_s:.1f}s")
  analysis = compiled.memory_analysis()
  if analysis is None:
    step.temporaries = None
  else:
    args = int(analysis.argument_size_in_bytes)
    outs = int(analysis.output_size_in_bytes)
    alias = int(getattr(analysis, "alias_size_in_bytes", 0) or 0)
    step.temporaries = int(analysis.temp_size_in_bytes)
    step.io = max(args + outs - alias - state_bytes, 0)
  return compiled


def _struct_bytes(*structs) -> int:
  return sum(_leaf_bytes(x, x.sharding) for x in jax.tree.leaves(structs))


def plan_config(config, mesh=None, *, compile_steps: bool = True,
                log: Callable[[str], Any] = logging.info) -> Plan:
  """Builds the memory plan of `config` on `mesh` (default: from config.mesh and all devices).

  With ``compile_steps=False`` only the analytic parts are computed (state,
  KV cache, batches): fast, but without XLA's temporaries.
  """
  from langptune_jax import sampling  # pylint: disable=g-import-not-at-top
  from langptune_jax.models import finetune  # pylint: disable=g-import-not-at-top
  from langptune_jax.train import contrastive, rlso  # pylint: disable=g-import-not-at-top

  rules = parallel.rules_from_config(config.mesh.get("rules", None))
  mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
  dp = parallel.data_parallel_size(mesh, rules)
  enc = encoder_model(config, mesh, rules)
  dec = decoder_model(config, mesh, rules)
  ecfg: transformer.DecoderConfig = enc.config

  enc_frozen, enc_train, enc_opt = _split_state_bytes(enc)
  dec_frozen, dec_train, dec_opt = _split_state_bytes(dec)
  resident = {
      "encoder params (frozen)": enc_frozen,
      f"encoder params (trainable: {config.encoder.training})": enc_train,
      "encoder optimizer (AdamW)": enc_opt,
      "decoder params (frozen)": dec_frozen,
      "decoder params (trainable)": dec_train,
      "decoder optimizer (AdamW)": dec_opt,
  }
  notes = [] if compile_steps else ["analytic only (no compilation): temporaries not counted"]
  if compile_steps and jax.default_backend() == "cpu":
    notes.append("temporaries come from XLA's CPU compiler, which widens bfloat16 math to "
                 "float32 and schedules differently: an upper estimate for TPU/GPU")
  if config.encoder.training != "lora":
    resident["reference copy (frozen)"] = enc_train  # the trainable part, snapshotted
  if (config.encoder.training == "lora" and "lm_head" in tuple(config.lora.targets)
      and ecfg.tie_embeddings):
    notes.append("lora.targets has lm_head but the encoder ties its embeddings: no adapter there")
  state_bytes_enc = enc_frozen + enc_train + enc_opt
  model_bytes_enc = tree_bytes(enc.model_state, enc.model_shardings)
  state_bytes_dec = dec_frozen + dec_train + dec_opt

  g = int(config.rl.num_generations)
  rows = int(config.rl.prompts_per_update) * g
  rows = -(-rows // dp) * dp
  p_len = sampling.bucket_length(int(config.data.prompt_max_len))
  n_new = int(config.rl.response_length)
  n_b = sampling.bucket_length(n_new)
  cache_len = int(config.encoder.cache_size) or (p_len + n_b)
  cache_dtype = jnp.dtype(config.encoder.dtype)
  d_len = int(config.data.decoder_max_len)
  steps: list[StepPlan] = []

  # 1. Rollout: the public sampler (prefill + decode loop) traced as one program,
  # so its peak covers the prompt pass, the KV cache and the decode loop together.
  tokens = _batch(mesh, rules, (rows, p_len), jnp.int32)
  mask = _batch(mesh, rules, (rows, p_len), jnp.bool_)
  key = _replicated(mesh, (2,), jnp.uint32)
  enc_graphdef = enc.model_graphdef
  eos = tuple(ecfg.eos_ids) or (1,)

  def sample_fn(state, tokens, mask, rng):
    with parallel.use_mesh(mesh, rules):
      out = sampling.sample(nnx.merge(enc_graphdef, state), tokens, mask, rng=rng,
                            max_new_tokens=n_new, temperature=float(config.rl.temperature),
                            top_k=int(config.rl.top_k), top_p=float(config.rl.top_p),
                            eos_ids=eos, stop_at_eos=bool(config.rl.stop_at_eos),
                            cache_size=cache_len, cache_dtype=cache_dtype)
      return out.tokens, out.response_mask, out.logprobs

  kv = kv_cache_bytes(ecfg, rows, cache_len, mesh, rules, cache_dtype)
  rollout = StepPlan("sample", f"{rows} x ({p_len} + {n_new}), cache {cache_len}", kv_cache=kv,
                     io=kv + _struct_bytes(tokens, mask) + 3 * _struct_bytes(
                         _batch(mesh, rules, (rows, n_new), jnp.float32)))
  _compile(rollout, lambda: jax.jit(sample_fn, in_shardings=(
      enc.model_shardings, tokens.sharding, mask.sharding, key.sharding)).lower(
          enc.model_state, tokens, mask, key), model_bytes_enc, compile_steps, log)
  # XLA's analysis counts the cache among the temporaries; keep the columns apart.
  if rollout.temporaries is not None and rollout.temporaries >= kv:
    rollout.temporaries -= kv
    rollout.io += kv
  steps.append(rollout)

  # 2. Log-probabilities of the rollout under the policy and the reference.
  settings = rlso.RLSOSettings.from_config(config.rl)
  seq = {"prompt_tokens": tokens, "prompt_mask": mask,
         "response_tokens": _batch(mesh, rules, (rows, n_new), jnp.int32),
         "response_mask": _batch(mesh, rules, (rows, n_new), jnp.bool_)}

  mode = config.encoder.training
  reference = finetune.ReferencePolicy(
      mode=mode, wrt=enc.train_state.wrt,
      state=None if mode == "lora" else enc.trainable_state())
  ref_bytes = 0 if mode == "lora" else _struct_bytes(reference.state)
  logps = StepPlan("rlso/logprobs", f"{rows} x ({p_len} + {n_new})", io=_struct_bytes(seq))
  _compile(logps, lambda: rlso.make_policy_logprobs(enc.train_state, mesh, settings,
                                                    rules).lower(enc.state, reference, seq),
           state_bytes_enc + ref_bytes, compile_steps, log)
  steps.append(logps)

  # 3. One RLSO pass (an optimizer step over the rollout batch).
  batch = {k: seq[k] if k in seq else _batch(mesh, rules, (rows,), jnp.float32)
           for k in rlso.PASS_KEYS}
  micro = int(config.rl.micro_batch_size)
  update = StepPlan("rlso/update", f"{rows} x ({p_len} + {n_new})"
                    + (f", micro {micro * g}" if micro else ""), io=_struct_bytes(batch))
  _compile(update, lambda: rlso.make_rlso_pass(enc.train_state, mesh, settings, rules).lower(
      enc.state, batch), state_bytes_enc, compile_steps, log)
  steps.append(update)

  # 4. One CL update on the decoder.
  cl_rows = -(-int(config.cl.batch_size) // dp) * dp
  # [rows, length] tokens and masks; [rows] ids (e.g. which item each row targets).
  cl_batch = {k: _batch(mesh, rules, (cl_rows,) if k.endswith("_ids") else (cl_rows, d_len),
                        jnp.bool_ if k.endswith("mask") else jnp.int32)
              for k in contrastive.BATCH_KEYS}
  cl_micro = int(config.cl.micro_batch_size)
  cl = StepPlan("cl/update", f"{cl_rows} x 2 x {d_len}" + (f", micro {cl_micro}" if cl_micro
                                                            else ""),
                io=_struct_bytes(cl_batch))
  _compile(cl, lambda: contrastive.make_cl_step(
      dec.train_state, mesh, temperature=float(config.cl.temperature),
      micro_batch_size=cl_micro, rules=rules).lower(dec.state, cl_batch), state_bytes_dec,
           compile_steps, log)
  steps.append(cl)

  # 5. Embedding the catalogue (one batch of items).
  e_rows = -(-int(config.decoder.embed_batch_size) // dp) * dp
  e_tokens = _batch(mesh, rules, (e_rows, d_len), jnp.int32)
  e_mask = _batch(mesh, rules, (e_rows, d_len), jnp.bool_)
  dec_graphdef = dec.model_graphdef

  def embed_fn(state, tokens, mask):
    with parallel.use_mesh(mesh, rules):
      return nnx.merge(dec_graphdef, state)(tokens, mask)

  embed = StepPlan("embed", f"{e_rows} x {d_len}", io=_struct_bytes(e_tokens, e_mask))
  dec_model_bytes = tree_bytes(dec.model_state, dec.model_shardings)
  _compile(embed, lambda: jax.jit(embed_fn, in_shardings=(
      dec.model_shardings, e_tokens.sharding, e_mask.sharding)).lower(
          dec.model_state, e_tokens, e_mask), dec_model_bytes, compile_steps, log)
  steps.append(embed)

  models = [
      f"encoder: {ecfg.family} {ecfg.num_layers} layers, d={ecfg.embed_dim}, "
      f"{enc.total_params / 1e6:.1f}M params + {enc.trainable_params / 1e6:.2f}M trainable "
      f"({config.encoder.training}), compute {config.encoder.dtype}, "
      f"params {config.encoder.param_dtype}, remat {config.encoder.remat}",
      f"decoder: {config.decoder.family} {dec.config.num_layers} layers, "
      f"{dec.total_params / 1e6:.1f}M params, compute {config.decoder.dtype}",
      f"rollout: {rows} sequences ({config.rl.prompts_per_update} prompts x {g}), "
      f"prompt {p_len} + response {n_new}; CL batch {cl_rows}; data-parallel {dp}",
  ]
  return Plan(mesh=dict(mesh.shape), num_devices=mesh.size, backend=jax.default_backend(),
              models=models, resident=resident, steps=steps, notes=notes)


def _write_atomic(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def run(config, workdir) -> int:
  """CLI: prints the plan and writes plan.txt / plan.json into `workdir`.

  Returns 0 when every step compiled, 1 when some step failed to compile.
  """
  plan = plan_config(config, log=lambda line: print(line, file=sys.stderr, flush=True))
  text = plan.format()
  print(text)
  if workdir:
    workdir = pathlib.Path(workdir)
    _write_atomic(workdir / "plan.txt", text + "\n")
    _write_atomic(workdir / "plan.json", json.dumps(plan.to_dict(), indent=2, default=str) + "\n")
  return 1 if any(s.error for s in plan.steps) else 0
