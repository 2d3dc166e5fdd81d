"""Accelerator suite: per-device MFU of the RLSO pass and the CL step, rollout tokens/s against
the HBM roofline, ours vs torch, with random weights at the paper's shapes (bfloat16).

Shapes (the paper configuration's per-device work): encoder gemma-2b-it with LoRA
r=``--lora_rank`` (1024) on q, k, v, o, gate, up, down; decoder mxbai-embed-large-v1
(every weight trains); one RLSO pass = forward + backward of the REBEL loss over
``--prompts`` prompts x ``--group`` samples of ``--prompt_len`` + ``--response_len``
tokens, then AdamW; one CL step = InfoNCE over ``--cl_rows`` (profile, item) pairs
of ``--cl_len`` tokens, forward + backward + AdamW; rollout = sampling
``--response_len`` tokens for ``--rollout_rows`` prompts (no early stop).

Ours scores each prompt once per group (``rl.shared_prompt``, the default; the
unshared pass is timed too); torch is an HF model built from the same shapes
(random weights), a plain LoRA wrapper, one forward per row (the authors' way)
and ``torch.optim.AdamW``. Each side runs in its own process. MFU = model FLOPs
of the work done (:mod:`langptune_jax.flops`: the shared pass counts each prompt
once) / time / the chip's peak (the table in ``flops``, ``--peak_tflops`` to
override); the roofline rate = rows x HBM bandwidth / bytes read per decode
step (all weights plus the mean KV cache).

  .venv/bin/python bench/accelerator.py --device=gpu          # one GPU, paper shapes
  .venv/bin/python bench/accelerator.py --quick               # CPU smoke run, tiny shapes
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import common  # bench/common.py (this script's directory)

TARGETS = common.LORA_TARGETS
PAPER = dict(encoder="gemma-2b-it", decoder="mxbai-embed-large-v1", lora_rank=1024, prompts=8,
             group=2, prompt_len=1024, response_len=512, cl_rows=32, cl_len=512,
             rollout_rows=64, reps=5)
QUICK = dict(encoder="tiny-llama", decoder="tiny-bert", lora_rank=8, prompts=2, group=2,
             prompt_len=32, response_len=16, cl_rows=8, cl_len=32, rollout_rows=4, reps=2)


def _median_time(fn, reps: int, sync=lambda: None) -> float:
  fn()  # warm-up (compilation on our side)
  sync()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _flops(args, ecfg, bcfg, shared: bool) -> dict:
  """Model FLOPs of each measured call; only response positions go through the output head."""
  from langptune_jax import flops
  p, n, g = args.prompt_len, args.response_len, args.group
  rows = args.prompts * g
  kw = dict(lora_rank=args.lora_rank, lora_targets=TARGETS)
  per_token = flops.train_flops_per_token(ecfg, p + n, **kw)
  head = 2.0 * flops.matmul_params(ecfg)["lm_head"]
  prompt_rows = args.prompts if shared else rows  # prompt tokens computed once per group
  rlso = (prompt_rows * p + rows * n) * per_token - 2 * prompt_rows * p * head
  decode = args.rollout_rows * n * flops.decode_flops_per_token(ecfg, p + (n + 1) / 2, **kw)
  prefill = (args.rollout_rows * p * flops.forward_flops_per_token(ecfg, p, **kw)
             - args.rollout_rows * (p - 1) * head)
  return {"rlso": rlso, "cl": flops.cl_step_flops(bcfg, args.cl_rows, args.cl_len),
          "rollout": prefill + decode}


def _configs(args):
  import jax.numpy as jnp

  from langptune_jax.models import presets
  ecfg = presets.decoder_config(args.encoder, dtype=args.dtype, param_dtype=args.dtype,
                                remat=args.remat)
  bcfg = presets.bert_config(args.decoder, dtype=jnp.dtype(args.dtype),
                             param_dtype=jnp.dtype(args.dtype), remat=args.remat != "none")
  return ecfg, bcfg


def _batches(args, vocab: int, bert_vocab: int) -> dict:
  import numpy as np
  rng = np.random.default_rng(0)
  rows = args.prompts * args.group
  prompts = np.repeat(rng.integers(3, vocab, (args.prompts, args.prompt_len)), args.group, 0)
  text = lambda: rng.integers(3, bert_vocab, (args.cl_rows, args.cl_len)).astype(np.int32)  # noqa: E731
  return {
      "rlso": {"prompt_tokens": prompts.astype(np.int32),
               "prompt_mask": np.ones(prompts.shape, bool),
               "response_tokens": rng.integers(3, vocab, (rows, args.response_len)).astype(
                   np.int32),
               "response_mask": np.ones((rows, args.response_len), bool),
               "logp_old": np.full(rows, -100.0, np.float32),
               "total_reward": rng.normal(size=rows).astype(np.float32),
               "task_reward": np.zeros(rows, np.float32), "kl": np.zeros(rows, np.float32)},
      "cl": {"profile_tokens": text(), "profile_mask": np.ones((args.cl_rows, args.cl_len),
                                                                 np.int32),
             "item_tokens": text(), "item_mask": np.ones((args.cl_rows, args.cl_len), np.int32),
             "item_ids": np.arange(args.cl_rows, dtype=np.int32)},
      "rollout": rng.integers(3, vocab, (args.rollout_rows, args.prompt_len)).astype(np.int32),
  }


def _param_bytes(tree) -> int:
  import jax
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# --- ours ---------------------------------------------------------------------

def worker_jax(args) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from langptune_jax import sampling
  from langptune_jax.models import bert, transformer
  from langptune_jax.models import embedder as embedder_lib
  from langptune_jax.models import lora as lora_lib
  from langptune_jax.train import contrastive, rlso
  ecfg, bcfg = _configs(args)
  data = _batches(args, ecfg.vocab_size, bcfg.vocab_size)
  model = transformer.Decoder(ecfg, rngs=nnx.Rngs(0))
  lora_lib.apply_lora(model, targets=TARGETS, rank=args.lora_rank, alpha=2.0 * args.lora_rank,
                      rngs=nnx.Rngs(1))
  out = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend()}

  for shared in (True, False):
    optimizer = nnx.Optimizer(model, optax.adamw(1e-7), wrt=nnx.LoRAParam)
    settings = rlso.RLSOSettings(args.group, 1.0, 0.0, False, 1.0, 0, shared_prompt=shared)

    def make_step(settings):
      @nnx.jit
      def step(model, optimizer, batch):
        loss, _, grads = rlso.rlso_loss_and_grads(model, nnx.LoRAParam, batch, settings)
        optimizer.update(model, grads)
        return loss
      return step

    rlso_step = make_step(settings)
    batch = {k: jnp.asarray(v) for k, v in data["rlso"].items()}
    name = "rlso" if shared else "rlso_unshared"
    out[f"{name}_s"] = _median_time(
        lambda: rlso_step(model, optimizer, batch).block_until_ready(), args.reps)

  embedder = embedder_lib.Embedder(bert.Bert(bcfg, rngs=nnx.Rngs(2)), family="bert",
                                   pooling="cls", normalize=True)
  cl_optimizer = nnx.Optimizer(embedder, optax.adamw(1e-7), wrt=nnx.Param)

  @nnx.jit
  def cl_step(embedder, optimizer, batch):
    loss, _, grads = contrastive.cl_loss_and_grads(embedder, nnx.Param, batch, temperature=0.05)
    optimizer.update(embedder, grads)
    return loss

  cl_batch = {k: jnp.asarray(v) for k, v in data["cl"].items()}
  out["cl_s"] = _median_time(lambda: cl_step(embedder, cl_optimizer, cl_batch).block_until_ready(),
                             args.reps)

  prompts = jnp.asarray(data["rollout"])
  mask = jnp.ones(prompts.shape, bool)

  def rollout():
    sampled = sampling.sample(model, prompts, mask, rng=jax.random.key(0),
                              max_new_tokens=args.response_len,
                              min_new_tokens=args.response_len)
    jax.block_until_ready(sampled.tokens)

  out["rollout_s"] = _median_time(rollout, args.reps)
  out["weight_bytes"] = _param_bytes(nnx.state(model))
  stats = jax.devices()[0].memory_stats() or {}
  out["peak_gib"] = (stats["peak_bytes_in_use"] / 2 ** 30 if "peak_bytes_in_use" in stats
                     else common.peak_rss_mib() / 1024)
  return out


# --- torch --------------------------------------------------------------------

def _hf_decoder_config(ecfg):
  import transformers
  kw = dict(vocab_size=ecfg.vocab_size, hidden_size=ecfg.embed_dim,
            intermediate_size=ecfg.mlp_dim, num_hidden_layers=ecfg.num_layers,
            num_attention_heads=ecfg.num_heads, num_key_value_heads=ecfg.num_kv_heads,
            head_dim=ecfg.head_dim, tie_word_embeddings=ecfg.tie_embeddings)
  if ecfg.family == "gemma":
    return transformers.GemmaConfig(**kw)
  return transformers.LlamaConfig(**kw)


def worker_torch(args) -> dict:
  import torch
  import transformers
  device = common.torch_device(args)
  dtype = getattr(torch, args.dtype)
  sync = lambda: common.sync(device)  # noqa: E731
  ecfg, bcfg = _configs(args)
  data = _batches(args, ecfg.vocab_size, bcfg.vocab_size)
  torch.manual_seed(0)
  lm = transformers.AutoModelForCausalLM.from_config(_hf_decoder_config(ecfg))
  lm.requires_grad_(False)
  common.torch_lora(lm, args.lora_rank, 2.0 * args.lora_rank)
  lm = lm.to(device=device, dtype=dtype)
  lora = [p for n, p in lm.named_parameters() if n.endswith((".a", ".b"))]
  for p in lora:
    p.requires_grad_(True)
  optimizer = torch.optim.AdamW(lora, lr=1e-7)
  b = {k: torch.as_tensor(v, device=device) for k, v in data["rlso"].items()}
  tokens = torch.cat([b["prompt_tokens"], b["response_tokens"]], 1).long()
  g, p = args.group, args.prompt_len

  def rlso_step():
    logp, _ = common.torch_sequence_logprobs(lm, tokens, p)
    d = ((logp.float() - b["logp_old"]) - b["total_reward"]).view(-1, g)
    j, k = torch.triu_indices(g, g, 1, device=device)
    loss = torch.mean(torch.square(d[:, j] - d[:, k]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

  out = {"device": (torch.cuda.get_device_name() if device.type == "cuda"
                    else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")}
  out["rlso_s"] = _median_time(rlso_step, args.reps, sync)

  prompts = torch.as_tensor(data["rollout"], device=device).long()

  def rollout():
    with torch.no_grad():
      lm.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                  max_new_tokens=args.response_len, min_new_tokens=args.response_len,
                  pad_token_id=0)

  out["rollout_s"] = _median_time(rollout, args.reps, sync)
  lm = optimizer = None  # frees the LM before the CL model is built

  bert = transformers.BertModel(transformers.BertConfig(
      vocab_size=bcfg.vocab_size, hidden_size=bcfg.hidden_size,
      num_hidden_layers=bcfg.num_layers, num_attention_heads=bcfg.num_heads,
      intermediate_size=bcfg.intermediate_size), add_pooling_layer=False).to(device=device,
                                                                             dtype=dtype)
  cl_optimizer = torch.optim.AdamW(bert.parameters(), lr=1e-7)
  c = {k: torch.as_tensor(v, device=device).long() for k, v in data["cl"].items()}

  def cl_step():
    q = bert(input_ids=c["profile_tokens"], attention_mask=c["profile_mask"]).last_hidden_state
    k = bert(input_ids=c["item_tokens"], attention_mask=c["item_mask"]).last_hidden_state
    q = torch.nn.functional.normalize(q[:, 0].float(), dim=-1)
    k = torch.nn.functional.normalize(k[:, 0].float(), dim=-1)
    loss = torch.nn.functional.cross_entropy(q @ k.T / 0.05, torch.arange(len(q), device=device))
    cl_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    cl_optimizer.step()

  out["cl_s"] = _median_time(cl_step, args.reps, sync)
  out["peak_gib"] = (torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda"
                     else common.peak_rss_mib() / 1024)
  return out


# --- the table ----------------------------------------------------------------

def _table(args, ours: dict, torch_: dict) -> str:
  common.use_project()
  from langptune_jax import flops
  ecfg, bcfg = _configs(args)
  chip = flops.CHIPS.get(args.chip.lower()) if args.chip else None
  peak = args.peak_tflops or (chip.peak_tflops if chip else 0.0)
  bandwidth = args.hbm_gbps or (chip.hbm_gbps if chip else 0.0)
  shared, unshared = _flops(args, ecfg, bcfg, True), _flops(args, ecfg, bcfg, False)

  def mfu(work, seconds):
    return f"{work / seconds / (peak * 1e12):.1%}" if peak else "n/a"

  lines = [f"# Accelerator suite ({'--quick, ' if args.quick else ''}{args.device}, "
           f"{args.dtype})", "",
           f"ours on {ours['device']}, torch on {torch_['device']}; encoder {args.encoder} "
           f"+ LoRA r={args.lora_rank}, decoder {args.decoder}; RLSO {args.prompts} prompts x "
           f"{args.group}, {args.prompt_len} + {args.response_len} tokens; CL {args.cl_rows} "
           f"pairs x {args.cl_len}; rollout {args.rollout_rows} x {args.response_len} tokens; "
           f"median of {args.reps} calls. Peak {peak or 'unknown'} TFLOP/s, HBM "
           f"{bandwidth or 'unknown'} GB/s per device.", ""]
  if args.quick:
    lines += ["The CPU `--quick` smoke run: tiny random models, no peak FLOP/s or HBM bandwidth for "
              "a CPU (so no MFU or roofline); it shows the script runs end to end, not the "
              "accelerator numbers.", ""]
  lines += ["| step | ours s | ours MFU | torch s | torch MFU | torch / ours |",
            "|---|---|---|---|---|---|"]
  rows = [("RLSO pass (shared prompt)", ours["rlso_s"], shared["rlso"], "rlso"),
          ("RLSO pass (unshared)", ours["rlso_unshared_s"], unshared["rlso"], "rlso"),
          ("CL step", ours["cl_s"], shared["cl"], "cl")]
  for name, ours_s, work, step in rows:
    # torch runs every row with its own prompt: the unshared work.
    theirs_s, theirs_work = torch_[f"{step}_s"], unshared[step]
    lines.append(f"| {name} | {ours_s:.3f} | {mfu(work, ours_s)} | {theirs_s:.3f} | "
                 f"{mfu(theirs_work, theirs_s)} | {theirs_s / ours_s:.2f}x |")
  tokens = args.rollout_rows * args.response_len
  kv_bytes = (2 * ecfg.num_layers * args.rollout_rows * ecfg.num_kv_heads * ecfg.head_dim
              * (args.prompt_len + args.response_len / 2) * 2)
  step_bytes = ours["weight_bytes"] + kv_bytes
  roof = args.rollout_rows * bandwidth * 1e9 / step_bytes if bandwidth else 0.0
  ours_rate, torch_rate = tokens / ours["rollout_s"], tokens / torch_["rollout_s"]
  frac = lambda r: f"{r / roof:.1%}" if roof else "n/a"  # noqa: E731
  lines += ["", "| rollout | tokens/s | of HBM roofline |", "|---|---|---|",
            f"| ours | {ours_rate:.1f} | {frac(ours_rate)} |",
            f"| torch (HF generate) | {torch_rate:.1f} | {frac(torch_rate)} |", "",
            f"Roofline: {roof:.0f} tokens/s ({step_bytes / 2 ** 30:.2f} GiB read per decode step)"
            if roof else "Roofline: n/a (no HBM bandwidth for this device: --chip or --hbm_gbps)",
            f"Peak memory: ours {ours['peak_gib']:.2f} GiB, torch {torch_['peak_gib']:.2f} GiB "
            f"({'device' if args.device == 'gpu' else 'process RSS, both frameworks'})."]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke run)")
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--remat", default="full", choices=("none", "full", "dots"))
  parser.add_argument("--chip", default="", help="peak and bandwidth from this chip's table entry "
                      "(default: the device's, if known)")
  parser.add_argument("--peak_tflops", type=float, default=0.0)
  parser.add_argument("--hbm_gbps", type=float, default=0.0)
  parser.add_argument("--out", default=str(common.ROOT / "bench/results/accelerator.md"))
  parser.add_argument("--worker", default="")
  for key, value in PAPER.items():
    parser.add_argument(f"--{key}", type=type(value), default=None)
  args = parser.parse_args(argv)
  for key, value in (QUICK if args.quick else PAPER).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.worker:
    common.run_worker({"jax": worker_jax, "torch": worker_torch}[args.worker], args)
    return
  passed = list(argv if argv is not None else sys.argv[1:])
  ours = common.run_worker_process("jax", passed, script=__file__)
  theirs = common.run_worker_process("torch", passed, script=__file__)
  if not args.chip and args.device == "gpu":
    args.chip = next((k for k, c in _chips().items() if c.name.lower() in ours["device"].lower()),
                     "")
  table = _table(args, ours, theirs)
  print(table)
  settings = {k: v for k, v in vars(args).items() if k not in ("out", "worker")}
  common.write_results(args.out, table, {"args": settings, "ours": ours, "torch": theirs})


def _chips():
  common.use_project()
  from langptune_jax import flops
  return flops.CHIPS


if __name__ == "__main__":
  main()
