"""One REBEL forward+backward over a rollout batch, with and without the shared prompt (CPU).

SmolLM2-135M-Instruct (offline GGUF, float32) + LoRA r=16 on q, k, v, o, gate,
up, down; 4 prompts x G=2, 128-token prompts, 32-token responses, one batch.
Both variants run alternately in one process (twice each, 3 timed calls per run
after a compiling call), so machine load affects them alike.

  .venv/bin/python bench/rlso_pass.py
"""

import time

import jax
import numpy as np
from flax import nnx

from langptune_jax import assets
from langptune_jax.models import lora as lora_lib
from langptune_jax.train import rlso
from langptune_jax.weights import hf

PROMPT_LEN, RESPONSE_LEN, GROUP, PROMPTS = 128, 32, 2, 4


def main():
  model, _ = hf.load_decoder(assets.asset_path("smollm2"), dtype="float32", param_dtype="float32")
  lora_lib.apply_lora(model, targets=("q", "k", "v", "o", "gate", "up", "down"), rank=16,
                      alpha=32.0, rngs=nnx.Rngs(0))
  rows = PROMPTS * GROUP
  rng = np.random.default_rng(0)
  prompts = np.repeat(rng.integers(100, 20000, (PROMPTS, PROMPT_LEN)), GROUP, 0).astype(np.int32)
  batch = {"prompt_tokens": prompts, "prompt_mask": np.ones_like(prompts, bool),
           "response_tokens": rng.integers(100, 20000, (rows, RESPONSE_LEN)).astype(np.int32),
           "response_mask": np.ones((rows, RESPONSE_LEN), bool),
           "logp_old": np.full(rows, -100.0, np.float32),
           "total_reward": rng.normal(size=rows).astype(np.float32),
           "task_reward": np.zeros(rows, np.float32), "kl": np.zeros(rows, np.float32)}
  graphdef, state = nnx.split(model)
  for shared in (False, True, False, True):
    settings = rlso.RLSOSettings(GROUP, 1.0, 0.0, False, 1.0, 0, shared_prompt=shared)
    step = jax.jit(lambda st, b, s=settings: rlso.rlso_loss_and_grads(
        nnx.merge(graphdef, st), nnx.LoRAParam, b, s)[0])
    jax.block_until_ready(step(state, batch))  # compiles
    times = []
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(step(state, batch))
      times.append(time.perf_counter() - start)
    print(f"shared_prompt={shared}: median {sorted(times)[1]:.2f} s "
          f"({', '.join(f'{t:.2f}' for t in times)})", flush=True)


if __name__ == "__main__":
  main()
