"""Demo configuration: MovieLens-100K, SmolLM2-135M-Instruct encoder, all-MiniLM-L6-v2 decoder.

Everything comes from the offline assets (``langptune-jax assets``), so
``make demo`` runs end to end on a laptop CPU. Sizes are small on purpose;
the paper's settings live in configs/base.py and the paper configs.

  langptune-jax demo --config=configs/demo.py --workdir=runs/demo   # what `make demo` runs
  langptune-jax train --config=configs/demo.py --workdir=runs/demo --config.rl.num_lm_updates=20
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
  c.data.history_len = 3  # the paper uses 4; 3 keeps prompts short on a CPU
  c.data.prompt_max_len = 192  # MovieLens prompts with 3 rated movies: ~170 SmolLM2 tokens
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

  c.rl.lr = 5e-5
  c.rl.kl_coef = 0.05
  c.rl.num_lm_updates = 2
  c.rl.prompts_per_update = 4
  c.rl.num_generations = 2
  c.rl.num_ppo_epochs = 2
  c.rl.response_length = 32

  c.cl.lr = 5e-5
  c.cl.num_emb_updates = 8
  c.cl.batch_size = 16
  c.cl.group_size = 16  # a CPU batch of 16 pairs is one InfoNCE group

  c.train.num_iterations = 1
  c.train.profile_batch_size = 32
  c.train.cl_users = 64  # profiles per CL phase: a seeded subset of the train users

  c.eval.max_users = 0  # every held-out user of the split
  # A 135M model sampling at T=1 writes mostly noise; a cooler evaluation temperature keeps
  # the profiles on topic (the paper configs keep T=1).
  c.eval.temperature = 0.7
  c.eval.bootstrap_samples = 1000
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
