"""The cost floor of one float32 decode step on this machine, JAX and torch side by side.

A decode step must at least multiply the new token of every row by every
weight matrix. With SmolLM2-135M's shapes (random weights; only shapes
matter) this script times, for each batch size:

* ``layers``: the 7 projections of all 30 blocks with distinct weights, so
  every step streams ~420 MB of weights from memory as real decoding does;
* ``head``: the tied output head (49152 x 576) on the same rows;

once as one jitted JAX function and once as torch ``F.linear`` calls (both on
all cores), best of ``--reps``. Compare the sum with the per-token time of a
whole sampler (``bench/sampling.py``): a sampler cannot beat these numbers
with the same kernels and dtype.

  .venv/bin/python bench/decode_floor.py
"""

from __future__ import annotations

import argparse

import common  # bench/common.py (this script's directory)

LAYERS, EMBED, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 30, 576, 1536, 9, 3, 64, 49152


def _shapes():
  """[in, out] of q, k, v, o, gate, up, down."""
  q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
  return [(EMBED, q), (EMBED, kv), (EMBED, kv), (q, EMBED), (EMBED, MLP), (EMBED, MLP),
          (MLP, EMBED)]


def _weights(rng):
  import numpy as np
  return [[rng.standard_normal(s, dtype=np.float32) * 0.02 for s in _shapes()]
          for _ in range(LAYERS)]


def measure(batches, reps: int) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  rng = np.random.default_rng(0)
  weights = _weights(rng)
  head = rng.standard_normal((VOCAB, EMBED), dtype=np.float32) * 0.02
  jw, jhead = jax.tree.map(jnp.asarray, weights), jnp.asarray(head)
  tw = [[torch.from_numpy(np.ascontiguousarray(w.T)) for w in ws] for ws in weights]
  thead = torch.from_numpy(head)

  @jax.jit
  def jax_layers(x, ws):
    # Every projection reads the running row vector, so none can be skipped.
    for q, k, v, o, gate, up, down in ws:
      x = x + (x @ q) @ o + (jax.nn.silu(x @ gate) * (x @ up)) @ down
      x = x + 1e-6 * (jnp.sum(x @ k) + jnp.sum(x @ v))
    return x

  jax_head = jax.jit(lambda x, e: x @ e.T)

  def torch_layers(x):  # called under torch.no_grad() below
    f = torch.nn.functional.linear
    for q, k, v, o, gate, up, down in tw:
      x = x + f(f(x, q), o) + f(torch.nn.functional.silu(f(x, gate)) * f(x, up), down)
      x = x + 1e-6 * (f(x, k).sum() + f(x, v).sum())
    return x

  rows = []
  for batch in batches:
    x = rng.standard_normal((batch, EMBED), dtype=np.float32)
    jx, tx = jnp.asarray(x), torch.from_numpy(x)
    with torch.no_grad():
      row = {
          "batch": batch,
          "jax_layers": common.best_of(lambda: jax_layers(jx, jw).block_until_ready(), reps),
          "jax_head": common.best_of(lambda: jax_head(jx, jhead).block_until_ready(), reps),
          "torch_layers": common.best_of(lambda: torch_layers(tx), reps),
          "torch_head": common.best_of(lambda: torch.nn.functional.linear(tx, thead), reps),
      }
    rows.append(row)
  return rows


def table(rows) -> str:
  mb = sum(i * o for i, o in _shapes()) * LAYERS * 4 / 1e6
  lines = [
      "# Float32 decode-step floor: weight matmuls only (SmolLM2-135M shapes)",
      "",
      f"Layers: 30 x 7 projections ({mb:.0f} MB of weights per step); head: 49152 x 576 "
      "(113 MB). Best of the timed calls; one decode step of a whole sampler costs at least "
      "layers + head.",
      "",
      "| batch | layers JAX | layers torch | head JAX | head torch | floor JAX (ms/step) "
      "| floor torch (ms/step) |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    ms = {k: v * 1e3 for k, v in r.items() if k != "batch"}
    lines.append(
        f"| {r['batch']} | {ms['jax_layers']:.1f} ms | {ms['torch_layers']:.1f} ms "
        f"| {ms['jax_head']:.1f} ms | {ms['torch_head']:.1f} ms "
        f"| {ms['jax_layers'] + ms['jax_head']:.1f} | {ms['torch_layers'] + ms['torch_head']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="8,32")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--out", default=str(common.ROOT / "bench/results/decode_floor.md"))
  args = parser.parse_args(argv)
  rows = measure([int(b) for b in args.batches.split(",")], args.reps)
  text = table(rows)
  print(text)
  common.write_results(args.out, text)


if __name__ == "__main__":
  main()
