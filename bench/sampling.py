"""Sampling and LoRA-training throughput: our JAX code vs HF transformers (torch, CPU).

On SmolLM2-135M-Instruct (float32, greedy, exactly ``--new_tokens`` new tokens
after ``--prompt_len``-token prompts) it measures, for each batch size:

* tokens/s of :func:`langptune_jax.sampling.sample` and of HF ``generate``;
* forward + backward + AdamW time of one LoRA (rank ``--lora_rank``) step on a
  sequence log-prob loss, ours vs a plain LoRA wrapper on the torch model, both
  accumulating gradients over ``--train_micro_batches`` micro-batches;
* a large float32 matmul's FLOP/s in each framework, and each step's achieved
  FLOP/s as a fraction of it;
* peak RSS: each side's sampling in its own subprocess, so peaks don't mix.

The LoRA step lasts seconds, less than a shared VM's speed drifts between
processes, so both sides' steps run in one process, alternating call by call,
``--train_reps`` calls each (median kept); its peak RSS covers both.

Compile time (our first call) is reported separately and excluded from speeds.
Writes a markdown table to ``--out`` (default bench/results/sampling.md).

  .venv/bin/python bench/sampling.py            # full run (several minutes)
  .venv/bin/python bench/sampling.py --quick    # smoke run with tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _prompts(batch: int, length: int, vocab: int, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  # Ordinary (non-special) tokens: SmolLM2's specials live at the low ids.
  return rng.integers(100, vocab, size=(batch, length), dtype=np.int64)


# --- workers (each runs in its own process) ---------------------------------

def _jax_matmul_flops(n: int) -> float:
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  reps, start = 5, time.perf_counter()
  for _ in range(reps):
    f(a, a).block_until_ready()
  return 2.0 * n ** 3 * reps / (time.perf_counter() - start)


def _torch_device(args):
  import torch
  return torch.device("cuda" if args.device == "gpu" else "cpu")


def _sync(device) -> None:
  # CUDA kernels run asynchronously: wait for them before reading the clock.
  if device.type == "cuda":
    import torch
    torch.cuda.synchronize()


def _torch_matmul_flops(n: int, device=None) -> float:
  import torch
  device = device or torch.device("cpu")
  a = torch.ones(n, n, device=device)
  a @ a
  _sync(device)
  reps, start = 5, time.perf_counter()
  for _ in range(reps):
    a @ a
  _sync(device)
  return 2.0 * n ** 3 * reps / (time.perf_counter() - start)


def _random_smollm2_dir() -> str:
  """An HF directory with SmolLM2-135M's architecture and random weights (seeded)."""
  import tempfile

  import torch
  import transformers
  config = transformers.LlamaConfig(
      vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
      num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
      max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
      pad_token_id=2)
  torch.manual_seed(0)
  path = tempfile.mkdtemp(prefix="smollm2_random_")
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  return path


def _load_torch_model(args):
  import torch
  import transformers
  path = pathlib.Path(args.model)
  if path.is_dir():
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
  else:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
  return model.to(_torch_device(args))


def _jax_setup(args) -> None:
  import jax
  if args.device == "gpu":
    # torch multiplies float32 in full precision by default; so does this side then.
    jax.config.update("jax_default_matmul_precision", "highest")


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


def worker_jax_sample(args) -> dict:
  import numpy as np
  _jax_setup(args)

  from langptune_jax import flops
  from langptune_jax.weights import hf
  model, config = hf.load_decoder(args.model, dtype="float32", param_dtype="float32")
  out = {"matmul_flops": _jax_matmul_flops(args.matmul_n), "runs": []}
  for batch in args.batches:
    prompts = _prompts(batch, args.prompt_len, config.vocab_size).astype(np.int32)
    start = time.perf_counter()
    greedy_sample(model, config, prompts, args.new_tokens)
    first = time.perf_counter() - start
    start = time.perf_counter()
    res = greedy_sample(model, config, prompts, args.new_tokens)
    seconds = time.perf_counter() - start
    assert int(res.response_mask.sum()) == batch * args.new_tokens
    out["runs"].append({
        "batch": batch, "seconds": seconds, "compile_s": max(first - seconds, 0.0),
        "tokens_per_s": batch * args.new_tokens / seconds,
        "flops": flops.sample_flops(config, batch, args.prompt_len, args.new_tokens)})
  out["peak_rss_mib"] = _peak_rss_mib()
  return out


def worker_torch_sample(args) -> dict:
  import torch
  device = _torch_device(args)
  model = _load_torch_model(args).eval()
  out = {"matmul_flops": _torch_matmul_flops(args.matmul_n, device), "runs": []}
  for batch in args.batches:
    prompts = torch.tensor(_prompts(batch, args.prompt_len, model.config.vocab_size),
                           device=device)
    kw = dict(attention_mask=torch.ones_like(prompts), do_sample=False,
              pad_token_id=model.config.eos_token_id)
    with torch.no_grad():
      model.generate(prompts, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
      _sync(device)
      start = time.perf_counter()
      gen = model.generate(prompts, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, **kw)
      _sync(device)
      seconds = time.perf_counter() - start
    assert gen.shape == (batch, args.prompt_len + args.new_tokens), gen.shape
    out["runs"].append({"batch": batch, "seconds": seconds,
                        "tokens_per_s": batch * args.new_tokens / seconds})
  out["peak_rss_mib"] = _peak_rss_mib()
  return out


def _timed(fn, reps: int) -> list[float]:
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
  first = _timed(ours, 1)[0]
  theirs()  # warm-up
  ours_times, their_times = [], []
  for _ in range(reps):
    ours_times += _timed(ours, 1)
    their_times += _timed(theirs, 1)
  return first, ours_times, their_times


def _jax_lora_step(args):
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
  tokens = _prompts(b, p + n, config.vocab_size, seed=1).astype(np.int32)
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


def _torch_lora(model, rank: int, alpha: float, device=None):
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


def _torch_lora_step(args):
  """The same LoRA step in torch: step() runs one and returns the loss."""
  import torch
  device = _torch_device(args)
  model = _load_torch_model(args)
  model.train()
  for param in model.parameters():
    param.requires_grad_(False)
  _torch_lora(model, args.lora_rank, 2.0 * args.lora_rank, device)
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=1e-4, eps=1e-6)
  b, p, n = args.train_batch, args.prompt_len, args.new_tokens
  tokens = torch.tensor(_prompts(b, p + n, model.config.vocab_size, seed=1), device=device)

  def step() -> float:
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for chunk in tokens.chunk(args.train_micro_batches):  # gradient accumulation, as ours
      logp, _ = torch_sequence_logprobs(model, chunk, p)
      loss = -logp.sum() / b
      loss.backward()
      total += loss.detach().item()  # waits for the device
    optimizer.step()
    return total

  return step


def worker_train(args) -> dict:
  """Our LoRA step and torch's in one process, alternating call by call.

  One step lasts seconds, less than a shared VM's speed drifts between two
  processes run minutes apart; alternating exposes both sides to the same drift.
  """
  import statistics
  _jax_setup(args)
  ours, flops = _jax_lora_step(args)
  theirs = _torch_lora_step(args)
  losses = {"ours": [], "torch": []}
  first, ours_times, torch_times = alternate(lambda: losses["ours"].append(ours()),
                                             lambda: losses["torch"].append(theirs()),
                                             args.train_reps)
  times = {"ours": ours_times, "torch": torch_times}
  seconds = {side: statistics.median(t) for side, t in times.items()}
  return {"seconds": seconds, "times": times, "losses": losses, "flops": flops,
          "compile_s": max(first - seconds["ours"], 0.0),
          "matmul_flops": {"jax": _jax_matmul_flops(args.matmul_n),
                           "torch": _torch_matmul_flops(args.matmul_n, _torch_device(args))},
          "peak_rss_mib": _peak_rss_mib()}


WORKERS = {"jax_sample": worker_jax_sample, "torch_sample": worker_torch_sample,
           "train": worker_train}


# --- driver -----------------------------------------------------------------

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


def _run_worker(name: str, argv: list[str], *, script: str = __file__,
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


def _micro_text(args) -> str:
  m = args.train_micro_batches
  return f" in {m} micro-batches" if m > 1 else ""


def _span(times: list[float]) -> str:
  return f"{min(times):.2f}-{max(times):.2f}"


def _table(args, res) -> str:
  js, ts, tr = res["jax_sample"], res["torch_sample"], res["train"]
  lines = [
      f"# Sampling and LoRA training: ours (JAX) vs HF transformers (torch), "
      f"{args.device.upper()} float32",
      "",
      f"SmolLM2-135M-Instruct{' shapes (random weights)' if args.random_weights else ''}, "
      f"prompts {args.prompt_len} tokens, {args.new_tokens} new tokens "
      f"(greedy, min_new_tokens = max_new_tokens), {os.cpu_count()} CPU cores.",
      f"Matmul peak ({args.matmul_n}^3 float32): JAX {js['matmul_flops'] / 1e9:.1f} GFLOP/s, "
      f"torch {ts['matmul_flops'] / 1e9:.1f} GFLOP/s. Host memory (every process): "
      f"{js['host_memory']}.",
      "",
      "| measurement | ours | HF / torch | ratio (ours / HF) | ours: GFLOP/s (fraction of "
      "matmul peak) | compile (s) | peak RSS ours / HF (MiB) |",
      "|---|---|---|---|---|---|---|",
  ]
  for ours, theirs in zip(js["runs"], ts["runs"]):
    achieved = ours["flops"] / ours["seconds"]
    lines.append(
        f"| sample, batch {ours['batch']} | {ours['tokens_per_s']:.1f} tok/s "
        f"| {theirs['tokens_per_s']:.1f} tok/s | {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x "
        f"| {achieved / 1e9:.1f} ({achieved / js['matmul_flops']:.0%}) | {ours['compile_s']:.1f} "
        f"| {js['peak_rss_mib']:.0f} / {ts['peak_rss_mib']:.0f} |")
  ours_s, torch_s = tr["seconds"]["ours"], tr["seconds"]["torch"]
  achieved = tr["flops"] / ours_s
  lines.append(
      f"| LoRA r={args.lora_rank} step (fwd+bwd+AdamW), batch {args.train_batch} x "
      f"{args.prompt_len + args.new_tokens}{_micro_text(args)} | {ours_s * 1e3:.0f} ms | "
      f"{torch_s * 1e3:.0f} ms | {torch_s / ours_s:.2f}x "
      f"| {achieved / 1e9:.1f} ({achieved / tr['matmul_flops']['jax']:.0%}) "
      f"| {tr['compile_s']:.1f} | {tr['peak_rss_mib']:.0f}, both sides in one process |")
  lines += ["", f"LoRA step: both sides in one process, alternating call by call, median of "
            f"{len(tr['times']['ours'])} calls each after a warm-up (per call: ours "
            f"{_span(tr['times']['ours'])} s, torch {_span(tr['times']['torch'])} s); the "
            f"first losses agree (ours {tr['losses']['ours'][0]:.4f}, torch "
            f"{tr['losses']['torch'][0]:.4f}). Both send only the response positions "
            f"through the output head."]
  lines += ["", "Ratios > 1 mean ours is faster (training: torch time / our time). "
            "Sampling FLOPs count prefill and decode (flops.sample_flops); training FLOPs "
            "count forward + activation backward + adapter weight gradients."]
  return "\n".join(lines) + "\n"


def write_results(out: str | os.PathLike, table: str, results: dict | None = None) -> None:
  """Writes the markdown table atomically (never a half-written file), then the raw JSON."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".tmp")
  tmp.write_text(table)
  tmp.replace(out)
  if results is not None:
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="")
  parser.add_argument("--batches", default="8,32")
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--lora_rank", type=int, default=16)
  parser.add_argument("--train_batch", type=int, default=8)
  parser.add_argument("--train_reps", type=int, default=5,
                      help="LoRA steps timed per side, alternating (median kept)")
  parser.add_argument("--train_micro_batches", type=int, default=4,
                      help="micro-batches per LoRA step, both sides (gradients accumulated)")
  parser.add_argument("--matmul_n", type=int, default=2048)
  parser.add_argument("--out", default=str(ROOT / "bench/results/sampling.md"))
  parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                      help="where both sides run (gpu: JAX's CUDA backend and torch on cuda)")
  parser.add_argument("--random_weights", action="store_true",
                      help="SmolLM2's shapes with random weights (no asset needed: GPU hosts)")
  parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.random_weights and not args.worker:
    args.model = _random_smollm2_dir()
  if not args.model:
    sys.path.insert(0, str(ROOT))
    from langptune_jax import assets
    args.model = str(assets.asset_path("smollm2"))
  if args.quick:
    args.batches, args.prompt_len, args.new_tokens = "2", 16, 8
    args.train_batch, args.train_reps, args.matmul_n, args.train_micro_batches = 2, 1, 512, 1
  args.batches = [int(b) for b in str(args.batches).split(",")]
  if args.train_micro_batches < 1 or args.train_batch % args.train_micro_batches:
    raise SystemExit(f"--train_micro_batches={args.train_micro_batches}: must be >= 1 and divide "
                     f"--train_batch={args.train_batch}")
  if args.worker:
    run_worker(WORKERS[args.worker], args)
    return
  passthrough = [f"--model={args.model}", f"--device={args.device}", f"--prompt_len={args.prompt_len}",
                 f"--new_tokens={args.new_tokens}", f"--lora_rank={args.lora_rank}",
                 f"--train_batch={args.train_batch}", f"--train_reps={args.train_reps}",
                 f"--train_micro_batches={args.train_micro_batches}",
                 f"--matmul_n={args.matmul_n}", "--batches=" + ",".join(map(str, args.batches))]
  results = {name: _run_worker(name, passthrough) for name in WORKERS}
  table = _table(args, results)
  print(table)
  write_results(args.out, table, results)


if __name__ == "__main__":
  main()
