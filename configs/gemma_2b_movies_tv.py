r"""Paper configuration: Gemma-2B-it (LoRA r=1024) + mxbai-embed-large-v1 on Amazon Movies & TV.

Set the local paths on the command line:
  langptune-jax train --config=configs/gemma_2b_movies_tv.py \
    --config.encoder.path=/models/gemma-2b-it \
    --config.decoder.path=/models/mxbai-embed-large-v1 \
    --config.data.reviews=/data/Movies_and_TV.jsonl.gz \
    --config.data.meta=/data/meta_Movies_and_TV.jsonl.gz --workdir=gs://bucket/runs/gemma_mtv

Memory of every step on a 16-chip slice, compiled from shapes on a CPU (no weights needed):
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=16 \
    langptune-jax plan --config=configs/gemma_2b_movies_tv.py --workdir=/tmp/plan
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import base  # noqa: E402  (configs/ is not a package)


def get_config(domain: str = "movies_tv"):
  c = base.get_config()
  c.data.source = "amazon"
  c.data.domain = domain
  c.data.instruction = (base.MOVIES_TV_INSTRUCTION if domain == "movies_tv"
                        else base.BOOKS_INSTRUCTION)

  c.encoder.family = "gemma"
  c.encoder.dtype = "bfloat16"
  c.encoder.training = "lora"
  c.encoder.remat = "full"
  c.lora.rank = 1024
  c.lora.alpha = 2048.0
  c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")

  c.decoder.family = "bert"
  c.decoder.pooling = "cls"
  c.decoder.dtype = "bfloat16"
  c.decoder.remat = "full"  # recompute each block in the CL backward pass: bounds its activations

  # 4 devices x 16 prompts x 2 samples per RL update; CL batch 32 per device.
  c.encoder.lora_init = "peft"

  # AdamW: torch defaults, as the authors' Gemma script.
  for section in (c.rl, c.cl):
    section.adam_b1, section.adam_b2, section.weight_decay = 0.9, 0.999, 0.01
  c.rl.lr = 1e-7
  c.rl.kl_coef = 0.2
  c.rl.num_lm_updates = 200
  c.rl.prompts_per_update = 64
  c.rl.num_generations = 2
  c.rl.num_ppo_epochs = 4
  # 8 prompts (16 sequences) per micro-batch bounds the update's activations
  # (`langptune-jax plan --chip=v5e` finds the largest that fits); the same gradient.
  c.rl.micro_batch_size = 8
  c.rl.response_length = 512
  c.rl.whiten_chunk = 32  # 16 prompts x 2 samples per GPU
  c.cl.lr = 1e-7
  # The authors' 800 micro-batch calls with accumulation 16 on 4 GPUs: 50 optimizer steps
  # of 2,048 pairs, each group of 32 pairs its own InfoNCE batch.
  c.cl.num_emb_updates = 50
  c.cl.batch_size = 2048
  c.cl.negatives = "group"
  c.cl.group_size = 32
  c.cl.dedupe_negatives = False
  c.cl.micro_batch_size = 32
  c.eval.temperature = 1.0
  c.eval.final_split = "test"
  c.train.num_iterations = 5
  # Fully sharded (weights, rank-1024 adapters and AdamW state split over every
  # chip): `langptune-jax plan` puts this at 1.9 GiB resident per v5e-16 chip.
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
