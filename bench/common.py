"""Helpers shared by the benchmarks: timing, workers in fresh processes, results files,
the random workloads and the torch LoRA used as the reference side.

Each benchmark is a script run from the repository root (``python bench/x.py``),
so this directory is on ``sys.path`` and ``import common`` finds this module.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def use_project() -> None:
  """Makes ``langptune_jax`` importable from a checkout that is not installed."""
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  # Ordinary (non-special) tokens: SmolLM2's specials live at the low ids.
  return rng.integers(100, vocab, size=(batch, length), dtype=np.int64)


def jax_matmul_flops(n: int) -> float:
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  reps, start = 5, time.perf_counter()
  for _ in range(reps):
    f(a, a).block_until_ready()
  return 2.0 * n ** 3 * reps / (time.perf_counter() - start)


def torch_device(args):
  import torch
  return torch.device("cuda" if args.device == "gpu" else "cpu")


def sync(device) -> None:
  # CUDA kernels run asynchronously: wait for them before reading the clock.
  if device.type == "cuda":
    import torch
    torch.cuda.synchronize()


def torch_matmul_flops(n: int, device=None) -> float:
  import torch
  device = device or torch.device("cpu")
  a = torch.ones(n, n, device=device)
  a @ a
  sync(device)
  reps, start = 5, time.perf_counter()
  for _ in range(reps):
    a @ a
  sync(device)
  return 2.0 * n ** 3 * reps / (time.perf_counter() - start)


def greedy_sample(model, config, prompts, new_tokens: int):
  """Our sampler, greedy, exactly `new_tokens` new tokens per row; returns once it is done."""
  import jax
  import numpy as np

  from langptune_jax import sampling
  out = sampling.sample(model, prompts, np.ones_like(prompts, bool), rng=jax.random.key(0),
                        max_new_tokens=new_tokens, min_new_tokens=new_tokens, greedy=True,
                        eos_ids=config.eos_ids, pad_id=config.pad_id or 0)
  jax.block_until_ready(out.tokens)
  return out


def timed(fn, reps: int) -> list[float]:
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def alternate(ours, theirs, reps: int) -> tuple[float, list[float], list[float]]:
  """Times two steps in one process, call by call: (our first call, our times, their times).

  Each side first gets a warm-up call (ours is timed: it includes compilation),
  then `reps` calls each, alternating, so both see the same drift of a shared
  machine.
  """
  first = timed(ours, 1)[0]
  theirs()  # warm-up
  ours_times, their_times = [], []
  for _ in range(reps):
    ours_times += timed(ours, 1)
    their_times += timed(theirs, 1)
  return first, ours_times, their_times


def jax_lora_step(args):
  """Our LoRA training step on a fixed batch: (step, flops); step() runs one and returns the loss.

  With ``--train_micro_batches`` the batch is split and the gradients are
  accumulated inside the one jitted step (a scan), as the trainers do.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from langptune_jax import flops, sampling
  from langptune_jax.models import finetune, lora
  from langptune_jax.train import state as state_lib
  from langptune_jax.weights import hf
  model, config = hf.load_decoder(args.model, dtype="float32", param_dtype="float32")
  lora.apply_lora(model, targets=LORA_TARGETS, rank=args.lora_rank, alpha=2.0 * args.lora_rank,
                  rngs=nnx.Rngs(0))
  wrt = finetune.trainable_filter("lora")
  optimizer = nnx.Optimizer(model, optax.adamw(1e-4, eps=1e-6), wrt=wrt)
  b, p, n = args.train_batch, args.prompt_len, args.new_tokens
  micro = args.train_micro_batches
  tokens = random_prompts(b, p + n, config.vocab_size, seed=1).astype(np.int32)
  # [micro-batches, rows per micro-batch, length]
  prompt = jnp.asarray(tokens[:, :p].reshape(micro, b // micro, p))
  response = jnp.asarray(tokens[:, p:].reshape(micro, b // micro, n))

  @nnx.jit
  def train_step(model, optimizer, prompt, response):
    graphdef, params, rest = state_lib.split_trainable(model, wrt)

    def loss_fn(params, mb):
      prompt_mb, response_mb = mb
      logp = sampling.sequence_logprobs(
          nnx.merge(graphdef, params, rest), prompt_mb, jnp.ones(prompt_mb.shape, bool),
          response_mb, jnp.ones(response_mb.shape, bool))
      return -jnp.sum(logp) / b  # summed over micro-batches: the batch mean

    grads, losses = state_lib.accumulate_gradients(jax.value_and_grad(loss_fn), params,
                                                   (prompt, response))
    optimizer.update(model, grads)
    return jnp.sum(losses)

  def step() -> float:
    return float(train_step(model, optimizer, prompt, response))  # float() waits for it

  per_token = flops.train_flops_per_token(config, p + n, lora_rank=args.lora_rank,
                                          lora_targets=LORA_TARGETS)
  return step, per_token * b * (p + n)


def torch_lora(model, rank: int, alpha: float, device=None):
  """Wraps q/k/v/o/gate/up/down in LoRA (B = 0 at init); returns a switch for the adapters."""
  import torch

  switch = {"on": True}

  class LoRALinear(torch.nn.Module):
    """base(x) + (x @ A) @ B * alpha / r while the switch is on."""

    def __init__(self, base):
      super().__init__()
      self.base = base
      self.a = torch.nn.Parameter(
          torch.randn(base.in_features, rank, device=device) / base.in_features ** 0.5)
      self.b = torch.nn.Parameter(torch.zeros(rank, base.out_features, device=device))
      self.scale = alpha / rank

    def forward(self, x):
      y = self.base(x)
      return y + (x @ self.a) @ self.b * self.scale if switch["on"] else y

  names = {f"{t}_proj" for t in LORA_TARGETS}
  for module in list(model.modules()):
    for name, child in list(module.named_children()):
      if name in names and isinstance(child, torch.nn.Linear):
        setattr(module, name, LoRALinear(child))
  return switch


def torch_sequence_logprobs(lm, tokens, prompt_len: int, with_entropy: bool = False):
  """Sum of response-token log-probs [B]; only response positions go through the head.

  With `with_entropy`, also the mean token entropy over each response (else None).
  """
  import torch
  p, n = prompt_len, tokens.shape[1] - prompt_len
  hidden = lm.model(input_ids=tokens).last_hidden_state[:, p - 1:p + n - 1]
  logp = torch.log_softmax(lm.lm_head(hidden).float(), dim=-1)  # temperature 1
  picked = logp.gather(-1, tokens[:, p:, None])[..., 0].sum(-1)
  if not with_entropy:
    return picked, None
  return picked, -(logp.exp() * logp).sum(-1).mean(-1)


def run_worker(worker, args) -> None:
  """Runs one worker in this (fresh) process and prints its result as one JSON line.

  Both frameworks get the host-memory setting `langptune-jax` would run with
  (``LANGPTUNE_MALLOC``, :mod:`langptune_jax.host_memory`), applied before
  either starts a thread.
  """
  sys.path.insert(0, str(ROOT))
  from langptune_jax import host_memory
  applied = host_memory.apply_env_setting()
  result = worker(args)
  result["host_memory"] = ("LANGPTUNE_MALLOC=reuse (one arena, no mmap, no trim)" if applied
                           else "glibc defaults")
  print(json.dumps(result))


def run_worker_process(name: str, argv: list[str], *, script: str,
                env: dict | None = None) -> dict:
  """Runs `script --worker name argv` in a fresh process (extra `env` on top); its JSON result."""
  print(f"[bench] {name} ...", file=sys.stderr, flush=True)
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", **(env or {}))
  if "--device=gpu" not in argv:
    env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, script, "--worker", name] + argv, env=env,
                        capture_output=True, text=True, cwd=ROOT)
  if proc.returncode:
    sys.stderr.write(proc.stderr[-4000:])
    raise SystemExit(f"bench worker {name} failed (exit {proc.returncode})")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def write_results(out: str | os.PathLike, table: str, results: dict | None = None) -> None:
  """Writes the markdown table atomically (never a half-written file), then the raw JSON."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".tmp")
  tmp.write_text(table)
  tmp.replace(out)
  if results is not None:
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))


def best_of(fn, reps: int) -> float:
  """Seconds of the fastest of `reps` calls, after one untimed warm-up call."""
  fn()  # warm-up (and compilation on the JAX side)
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best
