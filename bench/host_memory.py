"""LANGPTUNE_MALLOC: the same JAX work under glibc's defaults and under ``reuse``, in alternating processes.

Each round starts one fresh process per setting (the order flips every round,
so a drift of the shared machine's speed hits both settings alike); each
process measures, on SmolLM2-135M-Instruct in float32:

* sampling at batch ``--batch``: a warm call with 1 new token (prefill plus
  one step) and one with ``--new_tokens`` (greedy, no early stop); their
  difference gives the time of one decode step;
* our LoRA (rank ``--lora_rank``) training step of ``bench/sampling.py`` on
  ``--batch`` x (``--prompt_len`` + ``--new_tokens``) tokens: the median of
  ``--train_reps`` warm calls, and the minor page faults of each warm call
  (``ru_minflt``), which is what the setting is meant to remove;
* the process's peak RSS.

The table gives every process's numbers and the median over rounds per
setting: the measurement behind keeping glibc's defaults as the default.

  .venv/bin/python bench/host_memory.py            # 2 rounds, about 12 minutes on 2 cores
  .venv/bin/python bench/host_memory.py --quick    # smoke run with tiny shapes
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import common  # bench/common.py (this script's directory)

ROOT = common.ROOT
SETTINGS = ("system", "reuse")


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def worker(args) -> dict:
  """One setting's measurements in this (fresh) process; the setting is applied by run_worker."""
  import numpy as np

  from langptune_jax.weights import hf
  model, config = hf.load_decoder(args.model, dtype="float32", param_dtype="float32")
  prompts = common.random_prompts(args.batch, args.prompt_len, config.vocab_size).astype(np.int32)

  def generate(new_tokens: int) -> float:
    return common.timed(lambda: common.greedy_sample(model, config, prompts, new_tokens), 1)[0]

  generate(1), generate(args.new_tokens)  # compile both shapes
  one, full = generate(1), generate(args.new_tokens)

  step, _ = common.jax_lora_step(args)
  step()  # compile
  times, faults = [], []
  for _ in range(args.train_reps):
    before, start = _minor_faults(), time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
    faults.append(_minor_faults() - before)
  return {"prefill_plus_one_s": one, "sample_s": full,
          "decode_step_ms": 1e3 * (full - one) / max(args.new_tokens - 1, 1),
          "tokens_per_s": args.batch * args.new_tokens / full,
          "step_times": times, "step_s": statistics.median(times),
          "faults_per_step": statistics.median(faults),
          "peak_rss_mib": common.peak_rss_mib()}


def _run(setting: str, argv: list[str]) -> dict:
  result = common.run_worker_process(setting, argv, script=__file__, env={"LANGPTUNE_MALLOC": setting})
  return {**result, "setting": setting}


_COLUMNS = (("prefill + 1 token (s)", "prefill_plus_one_s", "{:.2f}"),
            ("decode step (ms)", "decode_step_ms", "{:.1f}"),
            ("sampling (tok/s)", "tokens_per_s", "{:.1f}"),
            ("LoRA step (s)", "step_s", "{:.2f}"),
            ("page faults / step", "faults_per_step", "{:,.0f}"),
            ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"))


def _row(label: str, values: dict) -> str:
  return "| " + label + " | " + " | ".join(fmt.format(values[key]) for _, key, fmt in _COLUMNS) + " |"


def _table(args, runs: list[dict]) -> str:
  lines = [
      "# Host memory: glibc defaults vs LANGPTUNE_MALLOC=reuse (JAX only, CPU float32)",
      "",
      f"SmolLM2-135M-Instruct, batch {args.batch}, {args.prompt_len}-token prompts, "
      f"{args.new_tokens} new tokens (greedy); LoRA r={args.lora_rank} step on the same "
      f"{args.batch} x {args.prompt_len + args.new_tokens} tokens, median of {args.train_reps} "
      f"warm calls; {args.rounds} rounds, one fresh process per setting and round, order "
      f"alternating; {os.cpu_count()} CPU cores.",
      "",
      "| process | " + " | ".join(name for name, _, _ in _COLUMNS) + " |",
      "|---" * (len(_COLUMNS) + 1) + "|",
  ]
  for i, run in enumerate(runs):
    lines.append(_row(f"round {i // len(SETTINGS) + 1}, {run['setting']}", run))
  for setting in SETTINGS:
    mine = [run for run in runs if run["setting"] == setting]
    median = {key: statistics.median(run[key] for run in mine) for _, key, _ in _COLUMNS}
    lines.append(_row(f"**median, {setting}**", median))
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--lora_rank", type=int, default=16)
  parser.add_argument("--train_reps", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--out", default=str(ROOT / "bench/results/host_memory.md"))
  parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
  parser.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if not args.model:
    common.use_project()
    from langptune_jax import assets
    args.model = str(assets.asset_path("smollm2"))
  if args.quick:
    args.batch, args.prompt_len, args.new_tokens, args.train_reps, args.rounds = 2, 16, 8, 1, 1
  # Fields the shared LoRA step reads.
  args.train_batch, args.train_micro_batches, args.device = args.batch, 1, "cpu"
  if args.worker:
    common.run_worker(worker, args)
    return
  passthrough = [f"--model={args.model}", f"--batch={args.batch}",
                 f"--prompt_len={args.prompt_len}", f"--new_tokens={args.new_tokens}",
                 f"--lora_rank={args.lora_rank}", f"--train_reps={args.train_reps}"]
  runs = []
  for round_index in range(args.rounds):
    order = SETTINGS if round_index % 2 == 0 else SETTINGS[::-1]
    runs += [_run(setting, passthrough) for setting in order]
  table = _table(args, runs)
  print(table)
  common.write_results(args.out, table, {"runs": runs})


if __name__ == "__main__":
  main()
