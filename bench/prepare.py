"""Throughput and peak memory of `prepare` on synthetic Amazon Reviews 2023 files.

Generates reviews/meta JSONL in the release schema (250k and 1M reviews by
default): a fixed active community (150k reviews, 12 per user, Zipf item
popularity) that survives the k-core, plus a cold tail of two-review users on
a large catalogue that grows with the file, as in the real categories, so the
output stays about the same size while the input grows;
then runs the whole pipeline once per size in a fresh subprocess and reports
reviews/s (pipeline time, tokenizer loading excluded and shown apart) and the
subprocess's peak RSS. Writes a table to bench/results/prepare.md.

  .venv/bin/python bench/prepare.py [--sizes 250000,1000000] [--workdir /tmp/bench_prepare]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import common  # bench/common.py (this script's directory)
import numpy as np

ROOT = common.ROOT
CORE_REVIEWS = 150_000  # reviews by the active community (k-core survivors)
CORE_ITEMS = 3_000
WORDS = ("great movie story acting plot film watch loved boring classic season show "
         "characters ending family funny scary music director series episode quality "
         "recommend price disc picture sound").split()


def generate(folder: pathlib.Path, num_reviews: int, seed: int = 0) -> tuple[str, str]:
  """Synthetic reviews + meta files (cached by size) in the release schema."""
  folder.mkdir(parents=True, exist_ok=True)
  reviews = folder / f"reviews_{num_reviews}.jsonl"
  meta = folder / f"meta_{num_reviews}.jsonl"
  if reviews.exists() and meta.exists():
    return str(reviews), str(meta)
  rng = np.random.default_rng(seed)
  # A fixed active community (what survives the k-core, as in the real release)
  # plus a cold tail that grows with the file: one-off users on a large catalogue.
  core_reviews = min(CORE_REVIEWS, num_reviews)
  core_users = np.arange(core_reviews) // 12
  core_items = (np.minimum(rng.zipf(1.2, core_reviews) - 1, CORE_ITEMS - 1) * 7919) % CORE_ITEMS
  tail = num_reviews - core_reviews
  tail_users = core_users.max() + 1 + np.arange(tail) // 2  # two reviews each
  tail_items = CORE_ITEMS + rng.integers(0, max(tail // 20, 1), tail)  # ~20 reviews/item
  owners = np.concatenate([core_users, tail_users])
  items = np.concatenate([core_items, tail_items])
  num_items = int(items.max()) + 1
  order = rng.permutation(num_reviews)  # interleave the two populations in the file
  owners, items = owners[order], items[order]
  ts = 1_500_000_000_000 + rng.integers(0, 200_000_000_000, num_reviews)
  text_len = rng.integers(10, 60, num_reviews)
  words = np.array(WORDS)
  tmp = reviews.with_suffix(".tmp")
  with open(tmp, "w") as f:
    for n in range(num_reviews):
      text = " ".join(words[rng.integers(0, len(words), text_len[n])])
      f.write(json.dumps({
          "rating": float(1 + n % 5), "title": "Review title", "text": text, "images": [],
          "asin": f"B{items[n]:09d}", "parent_asin": f"B{items[n]:09d}",
          "user_id": f"AG{owners[n]:012d}", "timestamp": int(ts[n]), "helpful_vote": 0,
          "verified_purchase": True}) + "\n")
  tmp.rename(reviews)
  with open(meta, "w") as f:
    for i in range(num_items):
      f.write(json.dumps({
          "main_category": "Movies & TV", "title": f"Movie {i}", "average_rating": 4.2,
          "rating_number": 10, "features": [],
          "description": [" ".join(words[rng.integers(0, len(words), 30)])],
          "price": 9.99, "images": [], "videos": [], "store": "Studio",
          "categories": ["Movies & TV", "Drama"], "details": {},
          "parent_asin": f"B{i:09d}", "bought_together": None}) + "\n")
  return str(reviews), str(meta)


def child(reviews: str, meta: str, out: str) -> None:
  """One measured run (inside the subprocess); prints a JSON result line."""
  import resource

  common.use_project()
  from langptune_jax import assets
  from langptune_jax import config as config_lib
  from langptune_jax.data import prepare
  from langptune_jax.weights import tokenizer as tok_lib

  config = config_lib.load_config(ROOT / "configs" / "base.py", {
      "data.reviews": reviews, "data.meta": meta, "data.dataset_dir": out,
      "encoder.path": str(assets.asset_path("smollm2")),
      "decoder.path": str(assets.asset_path("minilm"))})
  t0 = time.perf_counter()
  tok_lib.load_tokenizer(config.encoder.path)
  tok_lib.load_tokenizer(config.decoder.path)
  t_tok = time.perf_counter() - t0
  rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  t1 = time.perf_counter()
  _, stats = prepare.prepare(config)
  seconds = time.perf_counter() - t1
  lines = next(s["review_lines"] for s in stats["filters"] if "review_lines" in s)
  print("RESULT " + json.dumps({
      "reviews": lines, "seconds": seconds, "tokenizer_seconds": t_tok,
      "reviews_per_s": lines / seconds, "stages": stats["seconds"], "peak_rss_mb": resource.getrusage(
          resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_tokenizers_mb": rss_base,
      "users": {k: v.get("users") for k, v in stats["splits"].items() if k != "items"},
      "items": stats["splits"]["items"]["items"]}))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="250000,1000000")
  parser.add_argument("--workdir", default="/tmp/bench_prepare")
  parser.add_argument("--child", nargs=3, metavar=("REVIEWS", "META", "OUT"))
  args = parser.parse_args()
  if args.child:
    child(*args.child)
    return
  work = pathlib.Path(args.workdir)
  results = []
  for size in [int(s) for s in args.sizes.split(",")]:
    t = time.perf_counter()
    reviews, meta = generate(work / "raw", size)
    print(f"{size} reviews generated in {time.perf_counter() - t:.1f}s", flush=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__, "--child", reviews, meta,
                           str(work / f"dataset_{size}")], capture_output=True, text=True,
                          env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
      sys.exit(f"run with {size} reviews failed:\n{proc.stderr[-3000:]}")
    results.append(json.loads(line[0][7:]))
    print(results[-1], flush=True)
  header = ("| reviews | pipeline s | reviews/s | read+k-core s | read+k-core reviews/s | "
            "tokenize s | write s | "
            "peak RSS MB | RSS after tokenizers MB | tokenizer load s | users train/val/test | "
            "items |")
  rows = [header, "|" + "---|" * 12]
  for r in results:
    u = r["users"]
    st = r["stages"]
    rows.append(f"| {r['reviews']:,} | {r['seconds']:.1f} | {r['reviews_per_s']:,.0f} | "
                f"{st['read_and_kcore']:.1f} | {r['reviews'] / st['read_and_kcore']:,.0f} | "
                f"{st['tokenize_items'] + st['tokenize_prompts']:.1f} | {st['write']:.1f} | "
                f"{r['peak_rss_mb']:.0f} | {r['rss_after_tokenizers_mb']:.0f} | "
                f"{r['tokenizer_seconds']:.1f} | {u['train']}/{u['val']}/{u['test']} | "
                f"{r['items']} |")
  table = "\n".join(rows)
  print(table)
  out = ROOT / "bench" / "results" / "prepare.md"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(
      "# prepare throughput (synthetic Amazon Reviews 2023 files)\n\n"
      f"Machine: {os.cpu_count()} CPU cores, shared (1-min load average at the end: "
      f"{os.getloadavg()[0]:.1f}). Pipeline time covers both passes over "
      "the files, k-core, length filters (fast batch tokenization), splits and the TFDS "
      "array_record write; tokenizer loading is shown apart. Peak RSS is the subprocess's "
      "maximum resident set size, including the libraries (transformers, torch via the "
      "tokenizer import).\n\n" + table + "\n")


if __name__ == "__main__":
  main()
