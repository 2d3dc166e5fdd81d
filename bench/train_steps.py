"""One RLSO update and one CL step: our jitted training steps vs the same steps in torch (CPU).

The workload is identical on both sides (float32, CPU):

* encoder SmolLM2-135M-Instruct (offline GGUF) with LoRA rank ``--lora_rank`` on
  q, k, v, o, gate, up, down; decoder all-MiniLM-L6-v2 with mean pooling;
* ``--prompts`` prompts of ``--prompt_len`` ordinary tokens, ``--group`` samples
  each, ``--new_tokens`` tokens sampled at temperature 1 (no early stop);
* a catalogue of ``--items`` MovieLens-100K item texts (``--item_len`` MiniLM
  tokens), embedded once by the decoder (timed separately);
* RLSO update = rollout + decode to text + MiniLM re-tokenization + profile
  embedding + NDCG reward + logp_old / logp_ref (adapters off) + ``--passes``
  passes of the REBEL loss with one AdamW step each; both sides split the
  scoring forwards and each pass into micro-batches of ``--micro_batch``
  prompts (gradients accumulated, the same update), which halves the peak
  memory of both;
* CL step = InfoNCE over ``--prompts`` (profile text, target item text) pairs
  through MiniLM (every weight trains), forward + backward + AdamW.

Ours is :class:`langptune_jax.train.loop.Trainer` (``rlso_update``) and the CL step
of :mod:`langptune_jax.train.setup`, the RLSO update
run twice: with ``rl.shared_prompt`` (each prompt scored once per group, the
default) and without (every row scores its own copy of the prompt, as torch does);
torch is HF ``generate`` plus a plain LoRA wrapper, one-forward sequence
log-probs, the same loss math and ``torch.optim.AdamW``. For the RLSO update
each side runs in its own subprocess (peak RSS per side); our first call
(tracing + XLA compilation) is reported separately, then ``--reps`` calls are
timed and the median kept. The CL step lasts under a second, less than this
kind of shared VM drifts between two processes, so both CL steps run in a third
process, alternating call by call, ``--cl_reps`` calls each.
Achieved GFLOP/s use the analytic model FLOPs of :mod:`langptune_jax.flops` and
are compared with a plain float32 matmul measured in the same process.

  .venv/bin/python bench/train_steps.py            # full run (long on a small CPU)
  .venv/bin/python bench/train_steps.py --quick    # smoke run with tiny shapes
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import common  # bench/common.py (this script's directory)

ROOT = common.ROOT
KL_COEF, LR_RL, LR_CL, CL_TEMPERATURE, ADAM_EPS = 0.05, 1e-5, 2e-5, 0.1, 1e-6
HISTORY_LEN = 4


LORA_TARGETS = common.LORA_TARGETS


# --- the shared workload (both workers build it the same way) ---------------

def _item_texts(count: int) -> list[str]:
  from langptune_jax import assets
  path = pathlib.Path(assets.asset_path("ml100k")) / "ml-100k.item"
  if not path.exists():
    raise FileNotFoundError(f"{path}: the MovieLens-100K item file is missing")
  texts = []
  with open(path, encoding="utf-8", errors="replace") as f:
    next(f)  # header
    for line in f:
      _, title, year, genres = (line.rstrip("\n").split("\t") + ["", "", "", ""])[:4]
      texts.append(f"{title} ({year}), a movie of the genres {genres.replace(' ', ', ')}.")
      if len(texts) == count:
        break
  if len(texts) < count:
    raise ValueError(f"--items={count}: {path} has only {len(texts)} items")
  return texts


def _workload(args, vocab: int | None = None) -> dict:
  """Targets, histories, CL texts and (given the encoder's vocabulary) prompts, from fixed seeds."""
  import numpy as np
  rng = np.random.default_rng(0)
  items = _item_texts(args.items)
  targets = rng.choice(args.items, size=args.prompts, replace=False).astype(np.int32)
  history = np.stack([rng.choice(np.setdiff1d(np.arange(args.items), [t]), HISTORY_LEN,
                                 replace=False) for t in targets]).astype(np.int32)
  # CL pairs: a profile-like text built from the history, and the target's text.
  profiles = ["The user enjoys movies such as " + " ".join(items[i] for i in h) for h in history]
  out = {"targets": targets, "history": history, "item_texts": items, "cl_profiles": profiles}
  if vocab is not None:
    out["prompts"] = common.random_prompts(args.prompts, args.prompt_len, vocab, seed=0).astype(np.int32)
  return out


def _rlso_flops(config, args) -> float:
  """Model FLOPs of one RLSO update on the encoder (sampling, scoring, passes).

  Both sides put only the positions that predict a token through the output
  head (the last prompt position in prefill, the response positions when
  scoring), so the head's FLOPs of the other prompt positions are taken out.
  """
  from langptune_jax import flops
  rows, p, n = args.prompts * args.group, args.prompt_len, args.new_tokens
  kw = dict(lora_rank=args.lora_rank, lora_targets=LORA_TARGETS)
  head = 2.0 * flops.matmul_params(config)["lm_head"]  # forward FLOPs per token
  prefill = rows * p * flops.forward_flops_per_token(config, p, **kw) - rows * (p - 1) * head
  decode = rows * n * flops.decode_flops_per_token(config, p + (n + 1) / 2, **kw)
  score = rows * (p + n) * flops.forward_flops_per_token(config, p + n, **kw) - rows * p * head
  # Backward through the frozen head: activation gradients only (as much as its forward).
  train = (rows * (p + n) * flops.train_flops_per_token(config, p + n, **kw)
           - 2 * rows * p * head)
  return prefill + decode + 2 * score + args.passes * train


def _cl_flops(bert_config, args) -> float:
  from langptune_jax import flops
  return (args.prompts * args.profile_len * flops.train_flops_per_token(bert_config,
                                                                        args.profile_len)
          + args.prompts * args.item_len * flops.train_flops_per_token(bert_config, args.item_len))


def _bert_config(path):
  import types
  with open(pathlib.Path(path) / "config.json") as f:
    return types.SimpleNamespace(family="bert", **json.load(f))


# --- ours -------------------------------------------------------------------

def worker_jax(args, shared_prompt: bool = True) -> dict:
  import jax
  import numpy as np
  sys.path.insert(0, str(ROOT / "configs"))
  import demo  # pylint: disable=g-import-not-at-top

  from langptune_jax import assets, parallel
  from langptune_jax.models import embedder as embedder_lib
  from langptune_jax.train import loop
  from langptune_jax.train import profiles as profiles_lib
  from langptune_jax.train.run_data import RunData, UserSplit
  from langptune_jax.weights import hf
  from langptune_jax.weights import tokenizer as tok_lib

  cfg = demo.get_config()
  cfg.checkpoint.enabled = False
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  cfg.lora.update(rank=args.lora_rank, alpha=2.0 * args.lora_rank, targets=LORA_TARGETS)
  cfg.rl.update(lr=LR_RL, kl_coef=KL_COEF, prompts_per_update=args.prompts,
                num_generations=args.group, num_ppo_epochs=args.passes,
                response_length=args.new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                stop_at_eos=False, micro_batch_size=args.micro_batch, adam_eps=ADAM_EPS,
                shared_prompt=shared_prompt, reuse_rollout_logprobs=False)
  cfg.cl.update(lr=LR_CL, batch_size=args.prompts, temperature=CL_TEMPERATURE,
                micro_batch_size=0, adam_eps=ADAM_EPS)
  cfg.data.decoder_max_len = args.profile_len
  mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])

  start = time.perf_counter()
  encoder, enc_config = hf.load_decoder(assets.asset_path("smollm2"), dtype="float32",
                                        param_dtype="float32")
  minilm = assets.asset_path("minilm")
  decoder = embedder_lib.load_embedder("bert", minilm, pooling="mean")
  enc_tok = tok_lib.load_tokenizer(assets.asset_path("smollm2"))
  dec_tok = tok_lib.load_tokenizer(minilm)
  w = _workload(args, enc_config.vocab_size)
  item_tokens, item_mask = embedder_lib.tokenize_texts(dec_tok, w["item_texts"], args.item_len)
  users = UserSplit(np.arange(args.prompts, dtype=np.int32), w["prompts"],
                    np.ones_like(w["prompts"], bool), w["history"], w["targets"])
  data = RunData(users, users, users, item_tokens, item_mask, w["item_texts"])
  trainer = loop.Trainer(cfg, str(pathlib.Path(args.tmpdir) / "jax"), data=data, encoder=encoder,
                         decoder=decoder, writer_tokenizer=enc_tok, ranker_tokenizer=dec_tok,
                         mesh=mesh)
  load_s = time.perf_counter() - start
  out = {"load_s": load_s}

  # Catalogue: embedded once (first call compiles; the second is the timing).
  embed = lambda: trainer.embed_texts(item_tokens, item_mask, "items")  # noqa: E731
  embed()  # compiles
  out["catalogue_s"] = common.timed(embed, 1)[0]
  item_emb = parallel.put(embed(), mesh, ("items", None), trainer.rules)

  calls, rl_metrics = iter(range(10_000)), []

  def rlso():
    i = next(calls)
    rl_metrics.append(trainer.rlso_update(users, item_emb, jax.random.key(i),
                                          np.random.default_rng(i)))

  first = common.timed(rlso, 1)[0]
  times = common.timed(rlso, args.reps)
  out["rlso"] = {"times": times, "seconds": statistics.median(times),
                 "compile_s": max(first - statistics.median(times), 0.0),
                 "reward": rl_metrics[-1]["reward"], "loss": rl_metrics[-1]["loss"],
                 "pass_s": rl_metrics[-1]["rl_pass/step_time_s"]}

  # The rollout alone (sampling 16 x new_tokens), to split the update's time.
  with parallel.use_mesh(mesh, trainer.rules):
    rows = np.repeat(w["prompts"], args.group, axis=0)

    def rollout():
      res = profiles_lib.generate(trainer.writer_state.model, rows, np.ones_like(rows, bool),
                                  trainer.sampling, jax.random.key(next(calls)))
      jax.block_until_ready(res.tokens)
      assert int(np.asarray(res.response_mask).sum()) == rows.shape[0] * args.new_tokens

    out["rollout_s"] = statistics.median(common.timed(rollout, args.reps))

  out["rlso"]["flops"] = _rlso_flops(enc_config, args)
  out["matmul_flops"] = common.jax_matmul_flops(args.matmul_n)
  out["peak_rss_mib"] = common.peak_rss_mib()
  out["versions"] = {"jax": jax.__version__, "flax": importlib.import_module("flax").__version__}
  return out


# --- torch ------------------------------------------------------------------

def worker_torch(args) -> dict:
  import numpy as np
  import torch
  import transformers

  from langptune_jax import assets
  from langptune_jax.weights import tokenizer as tok_lib

  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  torch.manual_seed(0)
  start = time.perf_counter()
  gguf = pathlib.Path(assets.asset_path("smollm2"))
  lm = transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
  lm.eval()  # no dropout in SmolLM2; eval() only silences train-mode checks
  for param in lm.parameters():
    param.requires_grad_(False)
  lora_switch = common.torch_lora(lm, args.lora_rank, 2.0 * args.lora_rank)
  lora_params = [p for p in lm.parameters() if p.requires_grad]
  lm_opt = torch.optim.AdamW(lora_params, lr=LR_RL, eps=ADAM_EPS, weight_decay=0.0)
  minilm = assets.asset_path("minilm")
  # eval(): our BERT has no dropout, so torch's must not drop either (gradients still flow).
  bert = transformers.BertModel.from_pretrained(minilm, add_pooling_layer=False).eval()
  enc_tok = tok_lib.load_tokenizer(str(gguf))
  dec_tok = transformers.AutoTokenizer.from_pretrained(minilm)
  w = _workload(args, lm.config.vocab_size)
  load_s = time.perf_counter() - start
  out = {"load_s": load_s}

  tokenize = functools.partial(_torch_tokenize, dec_tok)
  embed = functools.partial(_torch_embed, bert)
  item_tokens, item_mask = tokenize(w["item_texts"], args.item_len)

  def embed_catalogue():
    with torch.no_grad():
      return torch.cat([embed(item_tokens[i:i + 64], item_mask[i:i + 64])
                        for i in range(0, args.items, 64)])

  embed_catalogue()
  out["catalogue_s"] = common.timed(embed_catalogue, 1)[0]
  item_emb = embed_catalogue()

  g, p, n = args.group, args.prompt_len, args.new_tokens
  prompts = torch.tensor(np.repeat(w["prompts"], g, axis=0), dtype=torch.long)
  targets = torch.tensor(np.repeat(w["targets"], g), dtype=torch.long)
  history = torch.tensor(np.repeat(w["history"], g, axis=0), dtype=torch.long)
  rows = prompts.shape[0]
  per_micro = (args.micro_batch or args.prompts) * g  # rows per micro-batch
  num_micro = rows // per_micro

  def rollout(new_tokens):
    with torch.no_grad():
      return lm.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                         top_k=0, top_p=1.0, temperature=1.0, min_new_tokens=new_tokens,
                         max_new_tokens=new_tokens, pad_token_id=lm.config.eos_token_id)

  pair_j, pair_k = np.triu_indices(g, k=1)  # every pair within a prompt's group

  def score(seqs, *flags):
    """Sequence log-probs, micro-batch by micro-batch as ours scores them."""
    return torch.cat([common.torch_sequence_logprobs(lm, chunk, p, *flags)[0]
                      for chunk in seqs.split(per_micro)])

  def rlso_update(new_tokens=n, passes=args.passes):
    seqs = rollout(new_tokens)
    assert seqs.shape == (rows, p + new_tokens), seqs.shape
    texts = [t.strip() for t in enc_tok.batch_decode(seqs[:, p:].tolist(),
                                                     skip_special_tokens=True)]
    ptok, pmask = tokenize(texts, args.profile_len)
    truncated = pmask[:, -1].bool()
    with torch.no_grad():
      scores = embed(ptok, pmask) @ item_emb.T
      scores.scatter_(1, history, float("-inf"))
      target_score = scores.gather(1, targets[:, None])
      rank = 1 + (scores > target_score).sum(-1)
      reward = torch.where(truncated, 0.0, 1.0 / torch.log2(rank.float() + 1.0))
      logp_old = score(seqs, True)
      lora_switch["on"] = False
      logp_ref = score(seqs)
      lora_switch["on"] = True
      total = reward - KL_COEF * (logp_old - logp_ref)
      total = (total - total.mean()) / torch.sqrt(total.var(unbiased=False) + 1e-8)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(passes):
      order = rng.permutation(rows // g)
      index = torch.tensor((order[:, None] * g + np.arange(g)[None, :]).reshape(-1))
      lm_opt.zero_grad(set_to_none=True)
      pass_loss = 0.0
      for micro in index.split(per_micro):  # gradient accumulation, as ours does
        logp_new, _ = common.torch_sequence_logprobs(lm, seqs[micro], p, True)
        d = ((logp_new - logp_old[micro]) - total[micro]).reshape(-1, g)
        loss = torch.square(d[:, pair_j] - d[:, pair_k]).mean() / num_micro
        loss.backward()
        pass_loss += loss.detach().item()
      lm_opt.step()
      losses.append(pass_loss)
    return {"reward": float(reward.mean()), "loss": float(np.mean(losses))}

  # Warm-up on the same code path with a short rollout and one pass (torch has no compile).
  rlso_update(new_tokens=2, passes=1)
  rl_metrics = []
  times = common.timed(lambda: rl_metrics.append(rlso_update()), args.reps)
  out["rlso"] = {"times": times, "seconds": statistics.median(times),
                 "reward": rl_metrics[-1]["reward"], "loss": rl_metrics[-1]["loss"]}
  out["rollout_s"] = statistics.median(common.timed(lambda: rollout(n), args.reps))

  out["matmul_flops"] = common.torch_matmul_flops(args.matmul_n)
  out["peak_rss_mib"] = common.peak_rss_mib()
  out["threads"] = torch.get_num_threads()
  out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
  return out


def _torch_tokenize(tokenizer, texts, length):
  enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length,
                  return_tensors="pt")
  return enc["input_ids"], enc["attention_mask"]


def _torch_embed(bert, tokens, mask):
  """Mean-pooled, L2-normalised MiniLM embeddings (as our decoder with pooling='mean')."""
  import torch
  hidden = bert(input_ids=tokens, attention_mask=mask).last_hidden_state
  m = mask[..., None].to(hidden.dtype)
  pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
  return torch.nn.functional.normalize(pooled, dim=-1)


# --- the CL step, both sides in one process -----------------------------------

def worker_cl(args) -> dict:
  """Our CL step and torch's, alternating call by call on the same (profile, item) pairs."""
  import jax
  import torch
  import transformers
  sys.path.insert(0, str(ROOT / "configs"))
  import demo  # pylint: disable=g-import-not-at-top

  from langptune_jax import assets, parallel
  from langptune_jax.models import embedder as embedder_lib
  from langptune_jax.train import setup as setup_lib
  from langptune_jax.weights import tokenizer as tok_lib

  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  cfg = demo.get_config()
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  cfg.cl.update(lr=LR_CL, batch_size=args.prompts, temperature=CL_TEMPERATURE,
                micro_batch_size=0, adam_eps=ADAM_EPS)
  mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
  rules = parallel.rules_from_config(cfg.mesh.rules)
  minilm = assets.asset_path("minilm")
  w = _workload(args)
  ids = w["targets"]
  item_texts = [w["item_texts"][i] for i in ids]

  # Ours: the decoder's train state and CL step, built by the training set-up.
  decoder = embedder_lib.load_embedder("bert", minilm, pooling="mean")
  wrt = setup_lib.ranker_trainable_filter(decoder, int(cfg.decoder.num_layers_unfrozen))
  train_state, cl_step = setup_lib.make_cl_training(decoder, wrt, cfg.cl,
                                                    setup_lib.schedule_lengths(cfg)[1], mesh, rules)
  dec_tok = tok_lib.load_tokenizer(minilm)
  ptok, pmask = embedder_lib.tokenize_texts(dec_tok, w["cl_profiles"], args.profile_len)
  itok, imask = embedder_lib.tokenize_texts(dec_tok, item_texts, args.item_len)
  batch = parallel.global_batch({"profile_tokens": ptok, "profile_mask": pmask,
                                 "item_tokens": itok, "item_mask": imask, "item_ids": ids},
                                mesh, rules)
  ours_losses = []

  def ours():
    train_state.state, metrics = cl_step(train_state.state, batch)
    ours_losses.append(float(metrics["loss"]))  # float() waits for the step

  # Torch: the same pairs, every MiniLM weight trains.
  bert = transformers.BertModel.from_pretrained(minilm, add_pooling_layer=False).eval()
  bert_opt = torch.optim.AdamW(bert.parameters(), lr=LR_CL, eps=ADAM_EPS, weight_decay=0.0)
  hf_tok = transformers.AutoTokenizer.from_pretrained(minilm)
  t_ptok, t_pmask = _torch_tokenize(hf_tok, w["cl_profiles"], args.profile_len)
  t_itok, t_imask = _torch_tokenize(hf_tok, item_texts, args.item_len)
  t_ids = torch.tensor(ids)
  eye = torch.eye(len(ids), dtype=torch.bool)
  torch_losses = []

  def theirs():
    bert_opt.zero_grad(set_to_none=True)
    logits = (_torch_embed(bert, t_ptok, t_pmask) @ _torch_embed(bert, t_itok, t_imask).T
              / CL_TEMPERATURE)
    logits = logits.masked_fill((t_ids[:, None] == t_ids[None, :]) & ~eye, float("-inf"))
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(ids)))
    loss.backward()
    bert_opt.step()
    torch_losses.append(loss.detach().item())

  first, ours_times, torch_times = common.alternate(ours, theirs, args.cl_reps)
  seconds = statistics.median(ours_times)
  flops = _cl_flops(_bert_config(minilm), args)
  return {"ours": {"times": ours_times, "seconds": seconds, "losses": ours_losses,
                   "compile_s": max(first - seconds, 0.0), "flops": flops},
          "torch": {"times": torch_times, "seconds": statistics.median(torch_times),
                    "losses": torch_losses},
          "matmul_flops": {"jax": common.jax_matmul_flops(args.matmul_n),
                           "torch": common.torch_matmul_flops(args.matmul_n)},
          "peak_rss_mib": common.peak_rss_mib()}


def worker_jax_unshared(args) -> dict:
  return worker_jax(args, shared_prompt=False)


WORKERS = {"jax": worker_jax, "jax_unshared": worker_jax_unshared, "torch": worker_torch,
           "cl": worker_cl}


# --- driver -----------------------------------------------------------------

def _run_worker(name: str, argv: list[str]) -> dict:
  print(f"[bench] {name} ...", file=sys.stderr, flush=True)
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as torch sees the machine
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, __file__, "--worker", name] + argv, env=env,
                        stdout=subprocess.PIPE, text=True, cwd=ROOT)
  if proc.returncode:
    raise SystemExit(f"bench worker {name} failed (exit {proc.returncode}); see stderr above")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["wall_s"] = time.perf_counter() - start
  result["loadavg_after"] = os.getloadavg()
  return result


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def _micro_text(args) -> str:
  if not args.micro_batch or args.micro_batch == args.prompts:
    return "one batch"
  plural = "s" if args.micro_batch > 1 else ""
  return (f"micro-batches of {args.micro_batch} prompt{plural} "
          f"({args.micro_batch * args.group} rows, gradients accumulated)")


def _table(args, res: dict, loadavg_before, command: str) -> str:
  js, ts, cl = res["jax"], res["torch"], res["cl"]
  rows_n = args.prompts * args.group
  lines = [
      "# Training steps: ours (JAX) vs torch, CPU float32",
      "",
      f"Command: `{command}`",
      "",
      f"Machine: {_cpu_model()}, {os.cpu_count()} cores; load average (1, 5, 15 min) before "
      f"{', '.join(f'{x:.2f}' for x in loadavg_before)}, after ours "
      f"{', '.join(f'{x:.2f}' for x in js['loadavg_after'])}, after torch "
      f"{', '.join(f'{x:.2f}' for x in ts['loadavg_after'])}.",
      f"Versions: python {platform.python_version()}, jax {js['versions']['jax']}, flax "
      f"{js['versions']['flax']}, torch {ts['versions']['torch']} ({ts['threads']} threads), "
      f"transformers {ts['versions']['transformers']}. Host memory (every process): "
      f"{js['host_memory']}.",
      "",
      f"Workload: SmolLM2-135M-Instruct + LoRA r={args.lora_rank} (q, k, v, o, gate, up, down), "
      f"all-MiniLM-L6-v2 (mean pooling). RLSO: {args.prompts} prompts x G={args.group} = "
      f"{rows_n} rows, {args.prompt_len}-token prompts, {args.new_tokens} tokens sampled at "
      f"temperature 1 (no early stop), profiles re-tokenized to {args.profile_len} MiniLM tokens, "
      f"NDCG reward over {args.items} items ({args.item_len} tokens), logp_old + logp_ref, "
      f"{args.passes} REBEL passes with one AdamW step each, scoring and passes in "
      f"{_micro_text(args)}. CL: InfoNCE over {args.prompts} "
      f"(profile {args.profile_len} tokens, item {args.item_len} tokens) pairs, full MiniLM "
      f"fine-tuning. RLSO: each side in its own process, median of {args.reps} timed call(s) "
      f"after a warm-up. CL: both sides in one process, alternating call by call, median of "
      f"{args.cl_reps} call(s) each after a warm-up.",
      f"Plain {args.matmul_n}^3 float32 matmul in the RLSO processes: JAX "
      f"{js['matmul_flops'] / 1e9:.1f} GFLOP/s, torch {ts['matmul_flops'] / 1e9:.1f} GFLOP/s; "
      f"in the CL process: JAX {cl['matmul_flops']['jax'] / 1e9:.1f}, torch "
      f"{cl['matmul_flops']['torch'] / 1e9:.1f} GFLOP/s.",
      "",
      "| step | ours | torch | ratio (torch / ours) | ours GFLOP/s (of matmul) "
      "| torch GFLOP/s (of matmul) | our compile (s) |",
      "|---|---|---|---|---|---|---|",
  ]
  steps = (("RLSO update", js["rlso"], ts["rlso"], js["matmul_flops"], ts["matmul_flops"]),
           ("CL step", cl["ours"], cl["torch"], cl["matmul_flops"]["jax"],
            cl["matmul_flops"]["torch"]))
  for label, ours, theirs, our_peak, their_peak in steps:
    f = ours["flops"]
    a, b = f / ours["seconds"], f / theirs["seconds"]
    lines.append(
        f"| {label} | {ours['seconds']:.2f} s | {theirs['seconds']:.2f} s "
        f"| {theirs['seconds'] / ours['seconds']:.2f}x | {a / 1e9:.1f} "
        f"({a / our_peak:.0%}) | {b / 1e9:.1f} ({b / their_peak:.0%}) "
        f"| {ours['compile_s']:.1f} |")
  un = res["jax_unshared"]["rlso"]
  lines.append(
      f"| RLSO update, shared prompt off | {un['seconds']:.2f} s | {ts['rlso']['seconds']:.2f} s "
      f"| {ts['rlso']['seconds'] / un['seconds']:.2f}x | {un['flops'] / un['seconds'] / 1e9:.1f} "
      f"| | {un['compile_s']:.1f} |")
  lines.append(
      f"| of which one REBEL pass: shared / off | {js['rlso']['pass_s']:.2f} s / "
      f"{un['pass_s']:.2f} s | | {un['pass_s'] / js['rlso']['pass_s']:.2f}x (off / shared) "
      "| | | |")
  lines.append(
      f"| of which rollout ({rows_n} x {args.new_tokens} tokens) | {js['rollout_s']:.2f} s "
      f"| {ts['rollout_s']:.2f} s | {ts['rollout_s'] / js['rollout_s']:.2f}x | | | |")
  lines.append(
      f"| catalogue embedding ({args.items} items, not in the update) | "
      f"{js['catalogue_s']:.2f} s | {ts['catalogue_s']:.2f} s "
      f"| {ts['catalogue_s'] / js['catalogue_s']:.2f}x | | | |")
  lines += [
      "",
      f"Shared prompt: the RLSO update is {un['seconds'] / js['rlso']['seconds']:.2f}x as fast "
      f"as with rl.shared_prompt off ({un['seconds']:.2f} s -> {js['rlso']['seconds']:.2f} s); "
      "the GFLOP/s of both rows count the row-by-row work (the shared prompt does less).",
      "",
      f"Peak RSS (whole process, including loading and dequantizing the GGUF): ours "
      f"{js['peak_rss_mib']:.0f} MiB (shared prompt off: "
      f"{res['jax_unshared']['peak_rss_mib']:.0f} MiB), torch {ts['peak_rss_mib']:.0f} MiB. Model loading: ours "
      f"{js['load_s']:.1f} s, torch {ts['load_s']:.1f} s. Per-call times (s): ours RLSO "
      f"{', '.join(f'{t:.2f}' for t in js['rlso']['times'])}, torch RLSO "
      f"{', '.join(f'{t:.2f}' for t in ts['rlso']['times'])}; ours CL "
      f"{', '.join(f'{t:.3f}' for t in cl['ours']['times'])}, torch CL "
      f"{', '.join(f'{t:.3f}' for t in cl['torch']['times'])}. The CL process (both MiniLMs) "
      f"peaked at {cl['peak_rss_mib']:.0f} MiB.",
      "",
      f"Model FLOPs per call (langptune_jax.flops, same count for both sides): RLSO "
      f"{js['rlso']['flops'] / 1e12:.2f} TFLOP (prefill + decode + 2 scoring forwards + "
      f"{args.passes} x forward/backward), CL {cl['ours']['flops'] / 1e9:.1f} GFLOP. "
      "Our compile time is the first call minus the median warm call. The torch warm-up "
      "is one short update (2 new tokens, 1 pass); each side's CL warm-up is one step.",
      "",
      f"Sanity (last timed call): mean task reward ours {js['rlso']['reward']:.3f}, torch "
      f"{ts['rlso']['reward']:.3f} (sampled profiles differ: different random streams); "
      f"REBEL loss ours {js['rlso']['loss']:.4f}, torch {ts['rlso']['loss']:.4f}; CL losses "
      f"ours {', '.join(f'{x:.4f}' for x in cl['ours']['losses'][:3])}, torch "
      f"{', '.join(f'{x:.4f}' for x in cl['torch']['losses'][:3])} (first three steps; same "
      "inputs and initial weights).",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--group", type=int, default=2)
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--passes", type=int, default=4)
  parser.add_argument("--micro_batch", type=int, default=2,
                      help="prompts per micro-batch of the REBEL passes and the scoring "
                           "forwards, both sides (0: the whole batch at once)")
  parser.add_argument("--lora_rank", type=int, default=16)
  parser.add_argument("--items", type=int, default=256)
  parser.add_argument("--item_len", type=int, default=24)
  parser.add_argument("--profile_len", type=int, default=96)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--cl_reps", type=int, default=10,
                      help="timed CL steps (a CL step is short, so one call is mostly noise)")
  parser.add_argument("--matmul_n", type=int, default=2048)
  parser.add_argument("--torch_threads", type=int, default=0,
                      help="torch.set_num_threads; 0: torch's default (one per core)")
  parser.add_argument("--out", default=str(ROOT / "bench/results/train_steps.md"))
  parser.add_argument("--tmpdir", default="/tmp/langptune_bench_train_steps")
  parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
  parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.prompts, args.prompt_len, args.new_tokens, args.passes = 2, 16, 8, 2
    args.items, args.item_len, args.profile_len, args.reps, args.matmul_n = 16, 16, 24, 1, 512
    args.cl_reps, args.micro_batch = 1, 1
  for name in ("prompts", "prompt_len", "new_tokens", "passes", "reps", "cl_reps", "items",
               "item_len", "profile_len", "lora_rank"):
    if getattr(args, name) < 1:
      raise SystemExit(f"--{name}={getattr(args, name)}: must be >= 1")
  if args.micro_batch < 0 or (args.micro_batch and args.prompts % args.micro_batch):
    raise SystemExit(f"--micro_batch={args.micro_batch}: must divide --prompts={args.prompts}"
                     " (0: no micro-batches)")
  if args.group < 2:
    raise SystemExit(f"--group={args.group}: REBEL needs at least 2 samples per prompt")
  if args.items < args.prompts + HISTORY_LEN:
    raise SystemExit(f"--items={args.items}: need at least --prompts + {HISTORY_LEN}")
  common.use_project()
  if args.worker:
    common.run_worker(WORKERS[args.worker], args)
    return
  passthrough = [f"--{k}={getattr(args, k)}" for k in (
      "prompts", "group", "prompt_len", "new_tokens", "passes", "micro_batch", "lora_rank",
      "items", "item_len", "profile_len", "reps", "cl_reps", "matmul_n", "torch_threads", "tmpdir")]
  loadavg = os.getloadavg()
  results = {name: _run_worker(name, passthrough) for name in WORKERS}
  command = " ".join([".venv/bin/python bench/train_steps.py"] + sys.argv[1:])
  table = _table(args, results, loadavg, command)
  print(table)
  common.write_results(args.out, table, results)


if __name__ == "__main__":
  main()
