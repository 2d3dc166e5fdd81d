r"""Base configuration: every field, with the paper's defaults (Gemma-2B-it + mxbai-embed-large-v1).

Every field can be overridden on the command line; the model and data paths have no default:

  langptune-jax train --config=configs/base.py \
    --config.encoder.path=/models/gemma-2b-it --config.decoder.path=/models/mxbai-embed-large-v1 \
    --config.data.reviews=/data/Movies_and_TV.jsonl.gz \
    --config.data.meta=/data/meta_Movies_and_TV.jsonl.gz --config.rl.lr=3e-7 --workdir=/runs/base

Paper configurations (configs/gemma_2b_*.py, configs/llama3_8b_*.py) start
from this file and change what the paper changes.
"""

import ml_collections

# The paper's instructions (docs/method.md §2 step 4); the data package owns the texts.
from langptune_jax.data.prompts import (  # noqa: E402,F401  (re-exported for configs)
  BOOKS_INSTRUCTION,
  MOVIELENS_INSTRUCTION,
  MOVIES_TV_INSTRUCTION,
)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = ""  # empty: --workdir flag or ./runs/<config name>

  # --- data (docs/method.md §2) ---
  c.data = d = ml_collections.ConfigDict()
  d.source = "amazon"  # amazon | movielens
  d.domain = "movies_tv"  # movies_tv | books | movielens (selects the instruction)
  d.reviews = ""  # Amazon Reviews 2023 reviews JSONL(.gz)
  d.meta = ""  # Amazon Reviews 2023 meta JSONL(.gz)
  d.movielens_dir = ""  # folder with ml-100k.inter/.item (empty: the offline asset)
  d.dataset_dir = ""  # prepared TFDS dataset (empty: <workdir>/dataset)
  d.instruction = MOVIES_TV_INSTRUCTION
  d.k_core = 5
  d.history_len = 4
  d.decoder_max_len = 512
  d.prompt_max_len = 1024
  d.test_fraction = 0.2  # users held out (by order of first interaction), halved val/test
  d.min_test_interactions = 5
  d.max_users = 0  # 0: all; >0 keeps the first N users (demos, smoke runs)
  d.num_workers = 0  # grain worker processes (0: in-process)
  d.scan_workers = 0  # processes for the first reviews pass (0: by file size and CPUs)
  # The authors' protocol by default; each alternative is a deliberate change.
  d.catalogue = "train_items"  # train_items (items of training interactions) | all_items
  d.keep_duplicate_reviews = True  # False: keep only the earliest of repeated (user, item)
  # authors: item-length and prompt-length users removed together after the k-core, then one
  # k-core; iterative: item length -> k-core -> prompt length -> k-core until stable
  d.filter_order = "authors"  # authors | iterative
  # authors: Gemma prompts end "<start_of_turn>model" (no newline), content untrimmed;
  # trimmed: the tokenizer's own chat template (trailing newline, content trimmed)
  d.prompt_ending = "authors"  # authors | trimmed

  # --- profile encoder (LLM) ---
  c.encoder = e = ml_collections.ConfigDict()
  e.family = "gemma"  # llama | gemma | gemma2 | gemma3
  e.path = ""  # local HF directory or .gguf file
  e.dtype = "bfloat16"  # compute dtype: float32 | bfloat16
  e.param_dtype = "float32"
  e.training = "lora"  # lora | partial | full
  e.num_layers_unfrozen = 4  # with training=partial: top blocks that train
  e.remat = "none"  # none | full | dots (activation checkpointing of each block)
  e.cache_size = 0  # KV cache length; 0: prompt_max_len + response_length
  e.preset = ""  # model shape without weights for `plan` (e.g. gemma-2b-it); "": from path
  # LoRA A init. peft: kaiming-uniform a=sqrt(5), bound 1/sqrt(fan_in); he_uniform: sqrt(6/fan_in)
  e.lora_init = "peft"  # peft | he_uniform

  # --- recommender decoder (text embedder) ---
  c.decoder = r = ml_collections.ConfigDict()
  r.family = "bert"  # bert | llama | gemma | gemma2 | gemma3
  r.path = ""
  r.dtype = "float32"
  r.param_dtype = "float32"
  r.pooling = "cls"  # cls | mean | last
  r.normalize = True
  r.num_layers_unfrozen = -1  # -1: the whole decoder trains; N: only the top N layers
  r.embed_batch_size = 64  # items per batch when embedding the catalogue
  r.remat = "none"  # none | full: recompute each block in the backward pass (CL steps)
  r.attention = "einsum"  # einsum | fused (jax.nn.dot_product_attention; right padding only)
  r.preset = ""  # model shape without weights for `plan` (e.g. mxbai-embed-large-v1)

  # --- LoRA on the encoder ---
  c.lora = lo = ml_collections.ConfigDict()
  lo.rank = 1024
  lo.alpha = 2048.0
  lo.dropout = 0.0
  lo.targets = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")

  # --- RL phase: RLSO encoder updates (REBEL-style) ---
  c.rl = rl = ml_collections.ConfigDict()
  rl.lr = 1e-7
  rl.lr_schedule = "constant"  # constant | linear | cosine
  rl.warmup_steps = 0
  rl.weight_decay = 0.01  # torch AdamW default (Gemma); Llama 1e-6
  rl.adam_b1 = 0.9
  rl.adam_b2 = 0.999  # Llama 0.95
  rl.adam_eps = 1e-6
  rl.max_grad_norm = 0.0  # 0: no clipping
  rl.num_lm_updates = 200  # RLSO updates per iteration
  rl.prompts_per_update = 64  # global: 16 per device x 4 devices
  rl.num_generations = 2  # G samples per prompt
  rl.micro_batch_size = 0  # prompts per micro-batch (0: whole batch at once)
  rl.shared_prompt = True  # score each prompt once per group (exact; fewer tokens)
  rl.reuse_rollout_logprobs = False  # logp_old from the sampler, not a second forward
  rl.num_ppo_epochs = 4
  rl.eta = 1.0
  rl.kl_coef = 0.2
  rl.whiten_rewards = True
  rl.whiten_chunk = 32  # whiten within consecutive chunks of this many rewards (per-GPU); 0: all
  rl.reward_type = "ndcg"  # ndcg | mrr
  rl.penalty_reward = 0.0
  rl.response_length = 512
  rl.temperature = 1.0
  rl.top_k = 0
  rl.top_p = 1.0
  rl.stop_at_eos = False  # False: always generate response_length tokens (as the paper)

  # --- CL phase: InfoNCE decoder alignment ---
  c.cl = cl = ml_collections.ConfigDict()
  cl.lr = 1e-7
  cl.lr_schedule = "constant"
  cl.warmup_steps = 0
  cl.weight_decay = 0.01
  cl.adam_b1 = 0.9
  cl.adam_b2 = 0.999
  cl.adam_eps = 1e-6
  cl.max_grad_norm = 0.0
  # Optimizer steps. The authors' 800 "emb updates" are micro-batch calls with gradient
  # accumulation 16 on 4 GPUs: 50 optimizer steps of 16 x 4 x 32 = 2,048 pairs.
  cl.num_emb_updates = 50
  cl.batch_size = 2048  # pairs per optimizer step
  # group: each consecutive group of cl.group_size pairs is its own InfoNCE batch (the authors'
  # per-GPU micro-batch); global: every other target of the whole batch is a negative
  cl.negatives = "group"  # group | global
  cl.group_size = 32
  cl.dedupe_negatives = False  # True: a repeated target is not used as its own negative
  cl.micro_batch_size = 0
  cl.temperature = 0.1

  # --- schedule ---
  c.train = t = ml_collections.ConfigDict()
  t.num_iterations = 5
  t.eval_every_iterations = 1
  t.profile_batch_size = 32  # users per batch when writing profiles for all users
  t.stop_after_steps = 0  # >0: stop (after checkpointing) once this many updates ran; resume later
  t.cl_users = 0  # >0: each CL phase writes profiles for this many train users (seeded subset)

  # --- evaluation ---
  c.eval = ev = ml_collections.ConfigDict()
  ev.ks = (5, 10, 20)
  ev.split = "val"  # during training (model selection)
  ev.final_split = "test"  # the final table
  ev.bootstrap_samples = 1000  # resamples of users for the confidence intervals
  ev.confidence = 0.95
  ev.temperature = 1.0  # profile sampling temperature at evaluation
  ev.max_users = 0  # 0: the whole split
  ev.greedy = False  # profiles for evaluation: sampled at eval.temperature, or greedy
  # Readability beside the ranking metrics: distinct-1/2 always, and with this the profiles'
  # perplexity under the frozen reference writer (one forward pass per evaluated profile).
  ev.reference_perplexity = True
  # reference_query: the last history item's text as the query; history: the raw prompt
  # embedded by a copy of the decoder fine-tuned on (prompt, target) pairs; popularity;
  # random; sasrec: a self-attentive sequential recommender on the same splits.
  ev.baselines = ("reference_query", "history", "popularity", "random", "sasrec")
  ev.sasrec_steps = 1000

  # --- baselines: the raw-history baseline, the authors' recipe ---
  # History text without chat wrapper or instruction, left-padded to history_pad_len decoder
  # tokens and the last history_max_len kept; a fresh copy of the decoder trained for
  # history_rounds x history_steps InfoNCE steps on train users (the decoder's own negatives
  # setting applies).
  c.baselines = bl = ml_collections.ConfigDict()
  bl.history_pad_len = 1024
  bl.history_max_len = 512
  bl.history_lr = 3e-6
  bl.history_batch_size = 64
  bl.history_rounds = 10
  bl.history_steps = 200

  # --- device mesh ---
  c.mesh = m = ml_collections.ConfigDict()
  m.data = -1
  m.fsdp = 1
  m.tensor = 1
  m.rules = ml_collections.FieldReference(None, field_type=list)  # None: parallel.DEFAULT_RULES

  # --- checkpoints ---
  c.checkpoint = ck = ml_collections.ConfigDict()
  ck.enabled = True
  ck.every_steps = 100  # RL or CL updates between checkpoints (phase ends always save)
  ck.max_to_keep = 3
  ck.resume = True

  # --- logging ---
  c.logging = lg = ml_collections.ConfigDict()
  lg.every_steps = 10
  lg.tensorboard = True
  lg.jsonl = True
  lg.num_sample_profiles = 5

  # --- profiling (XLA trace of a window of steps) ---
  c.profile = p = ml_collections.ConfigDict()
  p.enabled = False
  p.start_step = 5
  p.num_steps = 3
  p.peak_tflops = 0.0  # per chip; 0: look up the chip in the built-in table

  # --- recommend / serve (a trained run, one user at a time) ---
  c.serve = sv = ml_collections.ConfigDict()
  sv.host = "127.0.0.1"
  sv.port = 8000
  sv.top_k = 10
  sv.export_dir = ""  # empty: the workdir's latest checkpoint; else `export`'s folder

  # --- judge (simulated-user check of profiles) ---
  c.judge = jd = ml_collections.ConfigDict()
  jd.path = ""  # judge LLM (HF dir or .gguf); empty: the offline SmolLM2
  jd.endpoint = ""  # OpenAI-compatible base URL (e.g. http://host:8080/v1); wins over path
  jd.model = ""  # model name sent to the endpoint
  jd.num_candidates = 5  # the target plus N-1 sampled negatives
  jd.max_users = 50  # users of eval.split judged (0: all)
  jd.seed = 0

  # --- multi-host ---
  c.distributed = dist = ml_collections.ConfigDict()
  dist.initialize = False  # call jax.distributed.initialize() at start
  dist.coordinator_address = ""  # empty: from the environment (TPU/SLURM)
  dist.num_processes = 0
  dist.process_id = -1
  # A process silent this long counts as dead and the others stop (bounds a hang on a lost host).
  dist.heartbeat_timeout_seconds = 100
  dist.initialization_timeout_seconds = 300  # how long start-up waits for every process
  return c
