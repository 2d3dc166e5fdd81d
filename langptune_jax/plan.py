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
  total fits its HBM with 10% headroom;
* with ``--processes=N`` (or ``distributed.num_processes``) on a multi-host
  mesh: the resident and peak bytes of each host's devices together;
* with ``--chip=v5e``: the largest ``rl.micro_batch_size`` and
  ``cl.micro_batch_size`` whose steps fit that chip (each size compiled).

To plan a mesh larger than the machine, run on CPU with emulated devices,
e.g. ``JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=16``.
XLA's CPU compiler assigns buffers differently from the TPU/GPU ones, so
temporaries there are an estimate; parameter, optimizer and cache numbers are
exact. The abstract models and their bytes are :mod:`langptune_jax.plan_models`,
the steps' abstract arguments and compilation :mod:`langptune_jax.plan_steps`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

from langptune_jax import flops, fs, parallel, plan_models, plan_steps
from langptune_jax import settings as settings_lib
from langptune_jax.models import transformer
from langptune_jax.plan_report import HEADROOM, GiB, Plan, StepPlan  # noqa: F401  (GiB: public)

# The steps' abstract arguments and functions, as the plan builds them.
from langptune_jax.plan_steps import step_arguments, step_functions  # noqa: F401


def num_processes(config, mesh, processes: int | None = None) -> int:
  """Hosts the mesh spans: `processes`, else distributed.num_processes, else JAX's count."""
  n = int(processes or 0) or settings_lib.of(config).distributed.num_processes
  n = n or jax.process_count()
  if n < 1 or mesh.size % n:
    raise ValueError(f"plan: {n} processes do not split the mesh's {mesh.size} devices evenly "
                     "(set --processes or distributed.num_processes to a divisor)")
  return n


def plan_config(config, mesh=None, *, compile_steps: bool = True,
                log: Callable[[str], Any] = logging.info, processes: int | None = None,
                only: tuple[str, ...] = ()) -> Plan:
  """Builds the memory plan of `config` on `mesh` (default: from config.mesh and all devices).

  With ``compile_steps=False`` only the analytic parts are computed (state,
  KV cache, batches): fast, but without XLA's temporaries. `processes` (else
  ``distributed.num_processes``, else JAX's process count) adds per-host
  totals; `only` names the steps to compile (default: all).
  """
  from langptune_jax import sampling  # pylint: disable=g-import-not-at-top

  settings = settings_lib.of(config)
  rules = parallel.rules_from_config(settings.mesh.rules)
  mesh = mesh if mesh is not None else parallel.make_mesh(settings.mesh)
  hosts = num_processes(settings, mesh, processes)
  dp = parallel.data_parallel_size(mesh, rules)
  s = plan_models.abstract_setup(settings, mesh, rules)
  enc, dec = plan_models.abstract_models(s)
  ecfg: transformer.DecoderConfig = enc.config

  enc_frozen, enc_train, enc_opt = plan_models.split_state_bytes(enc)
  dec_frozen, dec_train, dec_opt = plan_models.split_state_bytes(dec)
  resident = {
      "encoder params (frozen)": enc_frozen,
      f"encoder params (trainable: {settings.encoder.training})": enc_train,
      "encoder optimizer (AdamW)": enc_opt,
      "decoder params (frozen)": dec_frozen,
      "decoder params (trainable)": dec_train,
      "decoder optimizer (AdamW)": dec_opt,
  }
  notes = [] if compile_steps else ["analytic only (no compilation): temporaries not counted"]
  if compile_steps and jax.default_backend() == "cpu":
    notes.append("temporaries come from XLA's CPU compiler, which widens bfloat16 math to "
                 "float32 and schedules differently: an upper estimate for TPU/GPU")
  ref_bytes = 0
  if s.reference.state is not None:
    ref_bytes = plan_models.struct_bytes(s.reference.state)
    resident["reference copy (frozen)"] = ref_bytes
  notes += plan_models.lora_notes(settings, enc)
  state_bytes_enc = enc_frozen + enc_train + enc_opt
  state_bytes_dec = dec_frozen + dec_train + dec_opt

  args = step_arguments(settings, s, mesh, rules)
  functions = step_functions(s)
  g = settings.rl.num_generations
  rows, p_len = args["sample"][1].shape
  n_new = settings.rl.response_length
  cache_len = settings.encoder.cache_size or (sampling.bucket_length(p_len)
                                                 + sampling.bucket_length(n_new))
  kv = plan_models.kv_cache_bytes(ecfg, rows, cache_len, mesh, rules,
                                  jnp.dtype(settings.encoder.dtype))
  micro, cl_micro = settings.rl.micro_batch_size, settings.cl.micro_batch_size
  cl_rows = args["cl/update"][1]["item_ids"].shape[0]
  d_len = settings.data.decoder_max_len
  e_rows = args["embed"][1].shape[0]
  seq_shape = f"{rows} x ({p_len} + {n_new})"
  struct_bytes = plan_models.struct_bytes
  steps = [
      # The rollout traced as one program: its peak covers the prompt pass, the KV
      # cache and the decode loop together.
      StepPlan("sample", f"{seq_shape}, cache {cache_len}", kv_cache=kv,
               io=kv + struct_bytes(args["sample"][1:3]) + 3 * struct_bytes(
                   plan_steps.batch_struct(mesh, rules, (rows, n_new), jnp.float32))),
      StepPlan("rlso/logprobs", seq_shape, io=struct_bytes(args["rlso/logprobs"][2])),
      StepPlan("rlso/update", seq_shape + (f", micro {micro * g}" if micro else ""),
               io=struct_bytes(args["rlso/update"][1])),
      StepPlan("cl/update", f"{cl_rows} x 2 x {d_len}" + (f", micro {cl_micro}" if cl_micro
                                                           else ""),
               io=struct_bytes(args["cl/update"][1])),
      StepPlan("embed", f"{e_rows} x {d_len}", io=struct_bytes(args["embed"][1:])),
  ]
  resident_in = {"sample": state_bytes_enc, "rlso/logprobs": state_bytes_enc + ref_bytes,
                 "rlso/update": state_bytes_enc, "cl/update": state_bytes_dec,
                 "embed": state_bytes_dec}
  steps = [step for step in steps if not only or step.name in only]
  for step in steps:
    fn, step_args = functions[step.name], args[step.name]
    plan_steps.compile_step(step, lambda: fn.lower(*step_args), resident_in[step.name], compile_steps, log)
  rollout = steps[0]
  # XLA's analysis counts the cache among the temporaries; keep the columns apart.
  if (rollout.name == "sample" and rollout.temporaries is not None
      and rollout.temporaries >= kv):
    rollout.temporaries -= kv
    rollout.io += kv

  models = [
      f"encoder: {ecfg.family} {ecfg.num_layers} layers, d={ecfg.embed_dim}, "
      f"{enc.total_params / 1e6:.1f}M params + {enc.trainable_params / 1e6:.2f}M trainable "
      f"({settings.encoder.training}), compute {settings.encoder.dtype}, "
      f"params {settings.encoder.param_dtype}, remat {settings.encoder.remat}",
      f"decoder: {settings.decoder.family} {dec.config.num_layers} layers, "
      f"{dec.total_params / 1e6:.1f}M params, compute {settings.decoder.dtype}",
      f"rollout: {rows} sequences ({settings.rl.prompts_per_update} prompts x {g}), "
      f"prompt {p_len} + response {n_new}; CL batch {cl_rows}; data-parallel {dp}",
  ]
  return Plan(mesh=dict(mesh.shape), num_devices=mesh.size, backend=jax.default_backend(),
              models=models, resident=resident, steps=steps, notes=notes, processes=hosts)


# --- the largest micro-batch for a chip -------------------------------------------

# Micro-batch field -> (batch field, rows per unit, the steps whose memory it bounds).
MICRO_BATCHES = {
    "rl.micro_batch_size": ("rl.prompts_per_update", "rl.num_generations",
                            ("rlso/logprobs", "rlso/update")),
    "cl.micro_batch_size": ("cl.batch_size", None, ("cl/update",)),
}


def _field(settings: settings_lib.Settings, dotted: str):
  section, name = dotted.split(".")
  return getattr(getattr(settings, section), name)


def _with_field(settings: settings_lib.Settings, dotted: str, value) -> settings_lib.Settings:
  section, name = dotted.split(".")
  changed = dataclasses.replace(getattr(settings, section), **{name: value})
  return dataclasses.replace(settings, **{section: changed})


def micro_batch_candidates(batch: int, per_unit: int, dp: int) -> list[int]:
  """Valid micro-batch sizes, largest first: 0 (the whole batch), then divisors of `batch`
  whose rows (x `per_unit`) split evenly over `dp` devices (the config's rule)."""
  sizes = [m for m in range(batch - 1, 0, -1) if batch % m == 0 and (m * per_unit) % dp == 0]
  return [0] + sizes


@dataclasses.dataclass
class MicroBatchChoice:
  field: str
  value: int | None  # None: not even the smallest fits
  total: int  # peak bytes per device with it (of the steps it bounds), or of the smallest tried
  tried: dict[int, int]  # size -> peak bytes per device


def largest_micro_batches(config, chip: flops.Chip, mesh=None, *,
                          log: Callable[[str], Any] = logging.info,
                          headroom: float = HEADROOM,
                          fields: tuple[str, ...] = tuple(MICRO_BATCHES)) -> list[MicroBatchChoice]:
  """For each micro-batch field, the largest size whose steps fit `chip` (compiled, per device).

  Sizes are tried from the largest down; each try compiles the steps that
  size bounds. The resident state does not depend on it.
  """
  settings = settings_lib.of(config)
  rules = parallel.rules_from_config(settings.mesh.rules)
  mesh = mesh if mesh is not None else parallel.make_mesh(settings.mesh)
  dp = parallel.data_parallel_size(mesh, rules)
  budget = chip.hbm_gib * GiB * headroom
  choices = []
  for field in fields:
    batch_field, per_unit_field, names = MICRO_BATCHES[field]
    per_unit = _field(settings, per_unit_field) if per_unit_field else 1
    batch = _field(settings, batch_field)
    tried: dict[int, int] = {}
    choice = MicroBatchChoice(field, None, 0, tried)
    for size in micro_batch_candidates(batch, per_unit, dp):
      p = plan_config(_with_field(settings, field, size), mesh, log=log, only=names, processes=1)
      failed = [s.name for s in p.steps if s.error]
      total = p.peak_bytes if not failed else None
      log(f"plan: {field}={size}: " + (f"{total / GiB:.3f} GiB per device" if total is not None
                                       else f"failed to compile {failed}"))
      if total is None:
        continue
      tried[size] = choice.total = total
      if total <= budget:
        choice.value = size
        break
    choices.append(choice)
  return choices


def format_choices(choices: list[MicroBatchChoice], chip: flops.Chip,
                   headroom: float = HEADROOM) -> str:
  lines = [f"largest micro-batches that fit {chip.name} ({chip.hbm_gib:g} GiB, "
           f"{headroom:.0%} usable):"]
  for c in choices:
    if c.value is None:
      lines.append(f"  {c.field}: none fits (smallest tried: {c.total / GiB:.3f} GiB)")
    else:
      what = "the whole batch" if c.value == 0 else str(c.value)
      lines.append(f"  --config.{c.field}={c.value}  ({what}: {c.total / GiB:.3f} GiB "
                   "per device)")
  return "\n".join(lines)


def _write_atomic(path, text: str) -> None:
  fs.write_text(path, text)


def _flag(name: str):
  from absl import flags  # pylint: disable=g-import-not-at-top
  return flags.FLAGS[name].value if name in flags.FLAGS and flags.FLAGS.is_parsed() else None


def run(config, workdir, *, chip: str | None = None, processes: int | None = None) -> int:
  """CLI: prints the plan and writes plan.txt / plan.json into `workdir`.

  With `chip` (``--chip``) also the largest micro-batches that fit it.
  Returns 0 when every step compiled, 1 when some step failed to compile.
  """
  chip = chip if chip is not None else _flag("chip")
  processes = processes if processes is not None else _flag("processes")
  target = flops.chip(chip) if chip else None  # an unknown name fails before compiling
  log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
  plan = plan_config(config, log=log, processes=processes)
  text = plan.format()
  if target is not None:
    choices = largest_micro_batches(config, target, log=log)
    text += "\n\n" + format_choices(choices, target)
    plan.micro_batches = {c.field: c.value for c in choices}
  print(text)
  if workdir:
    workdir = fs.as_path(workdir)
    _write_atomic(workdir / "plan.txt", text + "\n")
    _write_atomic(workdir / "plan.json", json.dumps(plan.to_dict(), indent=2, default=str) + "\n")
  return 1 if any(s.error for s in plan.steps) else 0
