"""Demo configuration: MovieLens-100K, SmolLM2-135M-Instruct encoder, all-MiniLM-L6-v2 decoder.

Everything comes from the offline assets (``langptune-jax assets``), so
``make demo`` runs end to end on a laptop CPU. Sizes are small on purpose;
the paper's settings live in configs/base.py and the paper configs.

  langptune-jax demo --config=configs/demo.py --workdir=runs/demo   # what `make demo` runs
  langptune-jax train --config=configs/demo.py --workdir=runs/demo --config.rl.num_lm_updates=40
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import base  # noqa: E402  (configs/ is not a package)


def _asset(relative: str) -> str:
  # Same location rule as langptune_jax.assets.cache_dir; the path may not exist yet.
  cache = pathlib.Path(os.environ.get("LANGPTUNE_CACHE", "~/.cache/langptune_jax")).expanduser()
  return str(cache / relative)


def get_config():
  c = base.get_config()
  c.data.source = "movielens"
  c.data.domain = "movielens"
  c.data.instruction = base.MOVIELENS_INSTRUCTION
  c.data.movielens_dir = _asset("ml-100k")
  c.data.history_len = 2  # the paper uses 4; 2 keeps prompts short on a CPU
  c.data.prompt_max_len = 160  # MovieLens prompts with 2 rated movies: p50 143, p99 158 tokens
  c.data.decoder_max_len = 64  # items ~17 tokens; 32-token profiles fit
  # All 943 MovieLens-100K users with 35% held out: ~165 val and ~165 test users, enough
  # for bootstrap intervals that separate methods (40 users could not).
  c.data.max_users = 0
  c.data.test_fraction = 0.35

  c.encoder.family = "llama"
  c.encoder.path = _asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
  c.encoder.dtype = "float32"
  c.encoder.training = "lora"

  c.decoder.family = "bert"
  c.decoder.path = _asset("minilm")
  c.decoder.pooling = "mean"
  c.decoder.embed_batch_size = 64

  c.lora.rank = 8
  c.lora.alpha = 16.0

  # 20 RLSO updates of 2 prompts x 2 samples, one REBEL pass each, log p_old from the
  # sampler (float32: the same numbers): a 20-point reward curve in about 4 minutes. Four rows
  # suit one CPU device; with N data-parallel devices use N/2 prompts (or more) per update.
  c.rl.lr = 1e-4
  c.rl.kl_coef = 0.05
  c.rl.num_lm_updates = 20
  c.rl.prompts_per_update = 2
  c.rl.num_generations = 2
  c.rl.num_ppo_epochs = 1
  c.rl.reuse_rollout_logprobs = True
  c.rl.response_length = 32
  c.rl.temperature = 0.7  # the evaluation temperature (below): rollouts read like eval profiles
  # On a CPU the packed shared-prompt pass runs slower than row by row
  # (bench/results/train_steps_shared_prompt.md); accelerators keep the default.
  c.rl.shared_prompt = False

  c.cl.lr = 5e-5
  c.cl.num_emb_updates = 8
  c.cl.batch_size = 16
  c.cl.group_size = 16  # a CPU batch of 16 pairs is one InfoNCE group

  c.train.num_iterations = 1
  # One iteration selects nothing: no validation evaluations, the final table on `test`
  # (every held-out user) beside zero-shot, CL only and the baselines.
  c.train.eval_every_iterations = 0
  # 165 test users in 3 batches of 56 (32 would take 6, the last one mostly padding).
  c.train.profile_batch_size = 56
  c.train.cl_users = 56  # profiles per CL phase: a seeded subset of the train users

  c.eval.max_users = 0  # every held-out user of the split
  # A 135M model sampling at T=1 writes mostly noise; a cooler evaluation temperature keeps
  # the profiles on topic (the paper configs keep T=1).
  c.eval.temperature = 0.7
  c.eval.bootstrap_samples = 1000
  c.eval.reference_perplexity = False  # one more forward pass per profile (~1 min here)
  # The authors' history-baseline recipe shrunk to CPU size (their 10 x 200 steps of 64).
  c.baselines.history_pad_len = 256
  c.baselines.history_max_len = 64
  c.baselines.history_batch_size = 16
  c.baselines.history_rounds = 1
  c.baselines.history_steps = 8
  c.eval.sasrec_steps = 300

  c.mesh.data = -1
  c.checkpoint.every_steps = 10
  c.checkpoint.max_to_keep = 1
  c.logging.every_steps = 1
  return c
