"""The abstract arguments of each jitted training step, and compiling them ahead of time.

The arguments have the shapes, dtypes and shardings ``train`` passes (a test
compares them with a real run), so ``plan`` compiles the very programs
``train`` runs.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from langptune_jax import parallel
from langptune_jax import settings as settings_lib
from langptune_jax.plan_report import StepPlan


def batch_struct(mesh, rules, shape, dtype) -> jax.ShapeDtypeStruct:
  sharding = parallel.batch_sharding(mesh, len(shape), rules)
  sharding = NamedSharding(mesh, parallel.fit_spec(sharding.spec, shape, mesh))
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def compile_step(step: StepPlan, lower: Callable[[], Any], state_bytes: int,
                 enabled: bool = True, log: Callable[[str], Any] = logging.info):
  """Compiles `lower()`; fills temporaries and i/o of `step`; returns the compiled object.

  Before compiling, `step.io` holds an analytic estimate (the batch); XLA's
  memory analysis replaces it. With `enabled=False` nothing is compiled.
  """
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


def step_arguments(config, s, mesh, rules=parallel.DEFAULT_RULES) -> dict[str, tuple]:
  """Abstract arguments of each jitted step of set-up `s`, with the shapes `train` passes.

  Rows are rounded up to the data-parallel size; prompts have the dataset's
  width (``data.prompt_max_len``, the sampler buckets them itself); embedder
  masks are int32 as the tokenizer writes them, prompt masks bool.
  """
  settings = settings_lib.of(config)
  dp = parallel.data_parallel_size(mesh, rules)
  rows = -(-settings.rl.prompts_per_update * settings.rl.num_generations // dp) * dp
  p_len, n_new = settings.data.prompt_max_len, settings.rl.response_length
  d_len = settings.data.decoder_max_len
  prompt = {"prompt_tokens": batch_struct(mesh, rules, (rows, p_len), jnp.int32),
            "prompt_mask": batch_struct(mesh, rules, (rows, p_len), jnp.bool_)}
  seq = dict(prompt, response_tokens=batch_struct(mesh, rules, (rows, n_new), jnp.int32),
             response_mask=batch_struct(mesh, rules, (rows, n_new), jnp.bool_))
  per_row = batch_struct(mesh, rules, (rows,), jnp.float32)
  rollout = dict(seq, logp_old=per_row, total_reward=per_row, task_reward=per_row, kl=per_row)
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
  cl_rows = -(-settings.cl.batch_size // dp) * dp
  text = lambda n: (batch_struct(mesh, rules, (n, d_len), jnp.int32),  # noqa: E731
                    batch_struct(mesh, rules, (n, d_len), jnp.int32))
  profile, item = text(cl_rows), text(cl_rows)
  cl_batch = {"profile_tokens": profile[0], "profile_mask": profile[1], "item_tokens": item[0],
              "item_mask": item[1], "item_ids": batch_struct(mesh, rules, (cl_rows,), jnp.int32)}
  e_rows = -(-settings.decoder.embed_batch_size // dp) * dp
  return {
      "sample": (s.writer_state.state, prompt["prompt_tokens"], prompt["prompt_mask"], key),
      "rlso/logprobs": (s.writer_state.state, s.reference, seq),
      "rlso/update": (s.writer_state.state, rollout),
      "cl/update": (s.ranker_state.state, cl_batch),
      "embed": (s.ranker_state.state, *text(e_rows)),
  }


def step_functions(s) -> dict[str, Callable]:
  """The jitted steps of set-up `s`, under the names of :func:`step_arguments`."""
  return {"sample": s.steps.sample, "rlso/logprobs": s.steps.policy_logprobs,
          "rlso/update": s.steps.rlso_pass, "cl/update": s.steps.cl_step,
          "embed": s.steps.embed}


