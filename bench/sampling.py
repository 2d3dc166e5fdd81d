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
import os
import pathlib
import time

import common  # bench/common.py (this script's directory)

# --- workers (each runs in its own process) ---------------------------------

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
  return model.to(common.torch_device(args))


def _jax_setup(args) -> None:
  import jax
  if args.device == "gpu":
    # torch multiplies float32 in full precision by default; so does this side then.
    jax.config.update("jax_default_matmul_precision", "highest")


def worker_jax_sample(args) -> dict:
  import numpy as np
  _jax_setup(args)

  from langptune_jax import flops
  from langptune_jax.weights import hf
  model, config = hf.load_decoder(args.model, dtype="float32", param_dtype="float32")
  out = {"matmul_flops": common.jax_matmul_flops(args.matmul_n), "runs": []}
  for batch in args.batches:
    prompts = common.random_prompts(batch, args.prompt_len, config.vocab_size).astype(np.int32)
    start = time.perf_counter()
    common.greedy_sample(model, config, prompts, args.new_tokens)
    first = time.perf_counter() - start
    start = time.perf_counter()
    res = common.greedy_sample(model, config, prompts, args.new_tokens)
    seconds = time.perf_counter() - start
    assert int(res.response_mask.sum()) == batch * args.new_tokens
    out["runs"].append({
        "batch": batch, "seconds": seconds, "compile_s": max(first - seconds, 0.0),
        "tokens_per_s": batch * args.new_tokens / seconds,
        "flops": flops.sample_flops(config, batch, args.prompt_len, args.new_tokens)})
  out["peak_rss_mib"] = common.peak_rss_mib()
  return out


def worker_torch_sample(args) -> dict:
  import torch
  device = common.torch_device(args)
  model = _load_torch_model(args).eval()
  out = {"matmul_flops": common.torch_matmul_flops(args.matmul_n, device), "runs": []}
  for batch in args.batches:
    prompts = torch.tensor(common.random_prompts(batch, args.prompt_len, model.config.vocab_size),
                           device=device)
    kw = dict(attention_mask=torch.ones_like(prompts), do_sample=False,
              pad_token_id=model.config.eos_token_id)
    with torch.no_grad():
      model.generate(prompts, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
      common.sync(device)
      start = time.perf_counter()
      gen = model.generate(prompts, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, **kw)
      common.sync(device)
      seconds = time.perf_counter() - start
    assert gen.shape == (batch, args.prompt_len + args.new_tokens), gen.shape
    out["runs"].append({"batch": batch, "seconds": seconds,
                        "tokens_per_s": batch * args.new_tokens / seconds})
  out["peak_rss_mib"] = common.peak_rss_mib()
  return out


def _torch_lora_step(args):
  """The same LoRA step in torch: step() runs one and returns the loss."""
  import torch
  device = common.torch_device(args)
  model = _load_torch_model(args)
  model.train()
  for param in model.parameters():
    param.requires_grad_(False)
  common.torch_lora(model, args.lora_rank, 2.0 * args.lora_rank, device)
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=1e-4, eps=1e-6)
  b, p, n = args.train_batch, args.prompt_len, args.new_tokens
  tokens = torch.tensor(common.random_prompts(b, p + n, model.config.vocab_size, seed=1), device=device)

  def step() -> float:
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for chunk in tokens.chunk(args.train_micro_batches):  # gradient accumulation, as ours
      logp, _ = common.torch_sequence_logprobs(model, chunk, p)
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
  ours, flops = common.jax_lora_step(args)
  theirs = _torch_lora_step(args)
  losses = {"ours": [], "torch": []}
  first, ours_times, torch_times = common.alternate(lambda: losses["ours"].append(ours()),
                                             lambda: losses["torch"].append(theirs()),
                                             args.train_reps)
  times = {"ours": ours_times, "torch": torch_times}
  seconds = {side: statistics.median(t) for side, t in times.items()}
  return {"seconds": seconds, "times": times, "losses": losses, "flops": flops,
          "compile_s": max(first - seconds["ours"], 0.0),
          "matmul_flops": {"jax": common.jax_matmul_flops(args.matmul_n),
                           "torch": common.torch_matmul_flops(args.matmul_n, common.torch_device(args))},
          "peak_rss_mib": common.peak_rss_mib()}


WORKERS = {"jax_sample": worker_jax_sample, "torch_sample": worker_torch_sample,
           "train": worker_train}


# --- driver -----------------------------------------------------------------

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
  parser.add_argument("--out", default=str(common.ROOT / "bench/results/sampling.md"))
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
    common.use_project()
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
    common.run_worker(WORKERS[args.worker], args)
    return
  passthrough = [f"--model={args.model}", f"--device={args.device}", f"--prompt_len={args.prompt_len}",
                 f"--new_tokens={args.new_tokens}", f"--lora_rank={args.lora_rank}",
                 f"--train_batch={args.train_batch}", f"--train_reps={args.train_reps}",
                 f"--train_micro_batches={args.train_micro_batches}",
                 f"--matmul_n={args.matmul_n}", "--batches=" + ",".join(map(str, args.batches))]
  results = {name: common.run_worker_process(name, passthrough, script=__file__) for name in WORKERS}
  table = _table(args, results)
  print(table)
  common.write_results(args.out, table, results)


if __name__ == "__main__":
  main()
