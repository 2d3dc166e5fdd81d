r"""Tiny configuration for tests: small lengths and batches, no paths.

Tests build tiny random models themselves; this file only fixes sizes that keep
every jitted step fast on CPU with 8 emulated devices. To see it validated:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    langptune-jax info --config=configs/tiny.py --workdir=/tmp/tiny
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import base  # noqa: E402  (configs/ is not a package)


def get_config():
  c = base.get_config()
  c.data.source = "movielens"
  c.data.domain = "movielens"
  c.data.instruction = base.MOVIELENS_INSTRUCTION
  c.data.history_len = 4
  c.data.prompt_max_len = 64
  c.data.decoder_max_len = 32
  c.data.max_users = 64

  c.encoder.family = "llama"
  c.encoder.dtype = "float32"
  c.encoder.training = "lora"
  c.encoder.num_layers_unfrozen = 1

  c.decoder.family = "bert"
  c.decoder.pooling = "mean"
  c.decoder.embed_batch_size = 16

  c.lora.rank = 4
  c.lora.alpha = 8.0

  c.rl.lr = 1e-4
  c.rl.num_lm_updates = 2
  c.rl.prompts_per_update = 8
  c.rl.num_generations = 2
  c.rl.num_ppo_epochs = 2
  c.rl.response_length = 16

  c.cl.lr = 1e-4
  c.cl.num_emb_updates = 2
  c.cl.batch_size = 8
  # Tests vary cl.batch_size freely; global negatives keep any even batch valid.
  c.cl.negatives = "global"

  c.train.num_iterations = 1
  c.train.profile_batch_size = 8

  c.eval.ks = (1, 5, 10)
  c.eval.max_users = 16
  c.eval.reference_perplexity = False  # tests that read it turn it on
  c.baselines.history_pad_len = 48  # a few steps on short texts keep the baseline cheap
  c.baselines.history_max_len = 32
  c.baselines.history_batch_size = 8
  c.baselines.history_rounds = 1
  c.baselines.history_steps = 2
  c.eval.sasrec_steps = 20

  c.mesh.data = -1
  c.checkpoint.every_steps = 1
  c.checkpoint.max_to_keep = 2
  c.logging.every_steps = 1
  c.logging.num_sample_profiles = 2
  c.profile.start_step = 1
  c.profile.num_steps = 1
  return c
