"""Latency of re-ranking a catalogue with an edited profile (what the `serve` page does per edit).

One request: tokenize the profile, cut it to its fixed width (16, 32 or 64 tokens),
embed it with all-MiniLM-L6-v2 (the demo's ranking model) on one device, score
every item's cached embedding, take the top-k. The catalogue embeddings are
random unit vectors: only their number matters for the cost. The first request
(the compile) is not counted; p50 / p90 over the rest, each profile different.

  .venv/bin/python bench/rerank.py                 # 10,000 items, about 20 s
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = ("horror", "comedy", "western", "romance", "space", "war", "animated", "crime",
         "musical", "documentary", "thriller", "family", "classic", "slow", "funny")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--items", type=int, default=10_000)
  parser.add_argument("--max_len", type=int, default=64, help="profile window (tokens)")
  parser.add_argument("--requests", type=int, default=200)
  parser.add_argument("--top_k", type=int, default=10)
  parser.add_argument("--out", default=str(ROOT / "bench/results/rerank.md"))
  args = parser.parse_args(argv)

  from sampling import write_results  # bench/sampling.py (this script's directory)

  from langptune_jax import assets
  from langptune_jax.models import embedder as embedder_lib
  from langptune_jax.serve.ranker import Ranker
  from langptune_jax.weights import tokenizer as tok_lib
  path = assets.asset_path("minilm")
  embedder = embedder_lib.load_embedder("bert", str(path), pooling="mean", normalize=True)
  ranker = Ranker(embedder, tok_lib.load_tokenizer(str(path)), args.max_len)
  rng = np.random.default_rng(0)
  items = rng.standard_normal((args.items, embedder.model.config.hidden_size)).astype(np.float32)
  items /= np.linalg.norm(items, axis=1, keepdims=True)
  ranker.warm_up()
  times = []
  for i in range(args.requests):
    words = rng.choice(WORDS, 3 + i % 8)
    profile = f"The user likes {' and '.join(words)} films, request {i}."
    start = time.perf_counter()
    ranker.top_k(profile, items, args.top_k, exclude=rng.integers(0, args.items, 5))
    times.append(time.perf_counter() - start)
  ms = sorted(t * 1e3 for t in times)
  p50, p90 = statistics.median(ms), ms[int(0.9 * (len(ms) - 1))]
  table = ("| items | profile window | requests | p50 ms | p90 ms |\n|---|---|---|---|---|\n"
           f"| {args.items} | {args.max_len} | {args.requests} | {p50:.1f} | {p90:.1f} |\n")
  print(table)
  write_results(args.out, table, {"items": args.items, "max_len": args.max_len,
                                  "requests": args.requests, "ms": ms})


if __name__ == "__main__":
  main()
