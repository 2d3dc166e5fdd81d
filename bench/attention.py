"""Causal self-attention forward and forward+backward: ours vs torch SDPA, same shapes.

SmolLM2-135M's attention shapes (9 query heads sharing 3 key/value heads of
64 dims, 30 layers) on a left-padded causal batch, float32, as in the LoRA
training step. Timed per variant, best of ``--reps``, each a jitted function
of all ``--layers`` layers chained through the queries (so none is skipped):

* ``autodiff``: the same masked softmax differentiated by JAX itself;
* ``ours, one pass``: :func:`langptune_jax.models.attention.masked_attention`
  with its hand-written gradient;
* ``ours, causal chunks``: :func:`langptune_jax.models.attention.causal_attention`
  as the decoder runs it without a KV cache (4 query chunks at 256 tokens);
* ``torch SDPA``: ``scaled_dot_product_attention`` with the same boolean mask
  and ``enable_gqa``.

  .venv/bin/python bench/attention.py
"""

from __future__ import annotations

import argparse

import common  # bench/common.py (this script's directory)

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
PAD = 40  # left padding of every row: those queries see no key


def measure(batch: int, length: int, layers: int, reps: int) -> dict[str, dict[str, float]]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  common.use_project()
  from langptune_jax.models import attention  # pylint: disable=g-import-not-at-top

  groups, scale = HEADS // KV_HEADS, HEAD_DIM ** -0.5
  rng = np.random.default_rng(0)
  q = rng.standard_normal((batch, KV_HEADS, groups * length, HEAD_DIM), dtype=np.float32)
  k = rng.standard_normal((batch, KV_HEADS, length, HEAD_DIM), dtype=np.float32)
  v = rng.standard_normal((batch, KV_HEADS, length, HEAD_DIM), dtype=np.float32)
  valid = np.arange(length) >= PAD
  mask = np.tril(np.ones((length, length), bool))[None] & valid[None, None, :]
  mask = np.broadcast_to(mask, (batch, length, length))

  def autodiff(q, k, v, mask, scale):
    b, kv, rows, _ = q.shape
    s = jnp.einsum("bkrd,bksd->bkrs", q, k) * scale
    s = jnp.where(mask[:, None, None], s.reshape(b, kv, groups, length, -1), attention.MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1).reshape(b, kv, rows, -1)
    return jnp.einsum("bkrs,bksd->bkrd", p, v)

  chunks = min(4, length // 64)
  cores = {
      "autodiff": autodiff,
      "ours, one pass": attention.masked_attention,
      "ours, causal chunks": lambda q, k, v, m, s: attention.causal_attention(q, k, v, m, s,
                                                                              chunks),
  }
  args = [jnp.asarray(a) for a in (q, k, v, mask)]
  out = {}
  for name, core in cores.items():
    def loss(q, k, v, mask, core=core):
      for _ in range(layers):
        q = q + 1e-3 * core(q, k, v, mask, scale)
      return jnp.sum(q ** 2)
    forward = jax.jit(loss)
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    out[name] = {"forward": common.best_of(lambda f=forward: f(*args).block_until_ready(), reps),
                 "forward+backward": common.best_of(
                     lambda b=backward: jax.block_until_ready(b(*args)), reps)}

  tq = torch.from_numpy(q.reshape(batch, KV_HEADS * groups, length, HEAD_DIM)).requires_grad_()
  tk, tv = torch.from_numpy(k).requires_grad_(), torch.from_numpy(v).requires_grad_()
  tmask = torch.from_numpy(np.ascontiguousarray(mask))[:, None]

  def torch_loss():
    x = tq
    for _ in range(layers):
      x = x + 1e-3 * torch.nn.functional.scaled_dot_product_attention(
          x, tk, tv, attn_mask=tmask, scale=scale, enable_gqa=True)
    return (x ** 2).sum()

  def torch_forward():
    with torch.no_grad():
      torch_loss()

  out["torch SDPA"] = {"forward": common.best_of(torch_forward, reps),
                       "forward+backward": common.best_of(lambda: torch_loss().backward(), reps)}
  return out


def table(results, args) -> str:
  torch_fb = results["torch SDPA"]["forward+backward"]
  lines = [
      f"# Causal attention, {args.layers} layers of SmolLM2-135M shapes, float32",
      "",
      f"Batch {args.batch} x {args.length} tokens, {HEADS} query / {KV_HEADS} key-value heads of "
      f"{HEAD_DIM} dims, {PAD} left-padding positions per row. Best of {args.reps}.",
      "",
      "| variant | forward | forward+backward | torch / variant (fwd+bwd) |",
      "|---|---|---|---|",
  ]
  for name, r in results.items():
    lines.append(f"| {name} | {r['forward'] * 1e3:.0f} ms | {r['forward+backward'] * 1e3:.0f} ms "
                 f"| {torch_fb / r['forward+backward']:.2f}x |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--layers", type=int, default=30)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--out", default=str(common.ROOT / "bench/results/attention.md"))
  args = parser.parse_args(argv)
  for name in ("batch", "length", "layers", "reps"):
    if getattr(args, name) < 1:
      raise SystemExit(f"--{name}={getattr(args, name)}: must be >= 1")
  if args.length <= PAD:
    raise SystemExit(f"--length={args.length}: must exceed the {PAD} padding positions")
  results = measure(args.batch, args.length, args.layers, args.reps)
  text = table(results, args)
  print(text)
  common.write_results(args.out, text, results)


if __name__ == "__main__":
  main()
