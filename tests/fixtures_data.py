"""Small Amazon Reviews 2023 files (exact release schema) with known filter outcomes.

Config the expectations assume (`SMALL_CFG`): k_core=3, history_len=3,
min_test_interactions=4, test_fraction=0.25, decoder_max_len=64,
prompt_max_len=512 (encoder: SmolLM2 GGUF tokenizer; decoder: MiniLM).

Users, in order of first interaction, and what happens to them:
  R00       5 commons (+ a duplicate review of C0 -> counted, dropped)
  N0        exactly 3 reviews: survives k-core(3) and lands in train, no target -> dropped
  L0 L1 L2  review LONG (description > 64 MiniLM tokens) -> dropped by the item length filter
  S0        1 review -> dropped by the first k-core (round 1)
  P0        4 reviews, the first with a huge text -> dropped by the prompt length filter
  R01..R15  5 commons each
  H0 H1     T (reviewed only by held-out users) + 4 commons; T is dropped, 4 remain
  H2        T + 3 commons -> 3 left after dropping T -> dropped (< 4)
After the prompt filter 20 users remain: train = first 15 (R00, N0, R01..R13),
held out = R14, R15, H0, H1, H2. Final: train 14 users (N0 has no target),
held-out 4 users -> val 2 / test 2. Catalogue: C0..C7 and T (9 items).
"""

from __future__ import annotations

import gzip
import json
import pathlib
import random

COMMONS = [f"C{i}" for i in range(8)]
# The hand-computed outcomes below follow the alternative protocol (iterative filters,
# duplicates dropped, every item in the catalogue); tests/test_data_protocol.py checks
# the authors' protocol (the config default) on the same files.
ALTERNATIVE_PROTOCOL = dict(filter_order="iterative", keep_duplicate_reviews=False,
                            catalogue="all_items")
SMALL_CFG = dict(k_core=3, history_len=3, min_test_interactions=4, test_fraction=0.25,
                 decoder_max_len=64, prompt_max_len=512, max_users=0, **ALTERNATIVE_PROTOCOL)

EXPECTED = {
    "train": ["R00", "R01", "R02", "R03", "R04", "R05", "R06", "R07", "R08", "R09", "R10",
              "R11", "R12", "R13"],
    "held_out": ["R14", "R15", "H0", "H1"],
    "items": COMMONS + ["T"],
    "users_after_prompt_filter": 20,
}


def meta_rows() -> list[dict]:
  rows = []
  for i, asin in enumerate(COMMONS):
    rows.append({
        "main_category": "Movies & TV", "title": f"Common Movie {i}",
        "average_rating": round(4.5 - 0.1 * i, 1), "rating_number": 100 + i,
        "features": [], "description": [f"A film number {i}.", "Good."],
        "price": 9.99 + i, "images": [], "videos": [], "store": "Studio",
        "categories": ["Movies & TV", "Drama"], "details": {"Language": "English"},
        "parent_asin": asin, "bought_together": None,
    })
  # C7: null price, no description, no categories -> exercised in the item text.
  rows[7].update(price=None, categories=[])
  del rows[7]["description"]
  rows.append({"title": "Very Long Movie", "average_rating": 3.0,
               "description": ["word " * 120], "categories": ["Movies & TV"],
               "price": "12.00", "parent_asin": "LONG"})
  rows.append({"title": "Held-out Only", "average_rating": 4.0, "description": ["New."],
               "categories": ["Movies & TV"], "price": 5.0, "parent_asin": "T"})
  rows.append({"title": None, "average_rating": 4.0, "parent_asin": "NOTITLE"})
  rows.append({"average_rating": 4.0, "parent_asin": "NOTITLE2"})
  return rows


def _review(user, asin, ts, text="Nice one.", rating=4.0):
  return {"rating": rating, "title": "Review", "text": text, "images": [], "asin": asin,
          "parent_asin": asin, "user_id": user, "timestamp": ts, "helpful_vote": 0,
          "verified_purchase": True}


def review_rows() -> list[dict]:
  order = (["R00", "N0", "L0", "L1", "L2", "S0", "P0"] + [f"R{j:02d}" for j in range(1, 16)]
           + ["H0", "H1", "H2"])
  plan: dict[str, list[str]] = {}
  for j in range(16):
    plan[f"R{j:02d}"] = [COMMONS[(j + m) % 8] for m in range(5)]
  plan["N0"] = ["C0", "C1", "C2"]
  for n, u in enumerate(["L0", "L1", "L2"]):
    plan[u] = ["LONG", COMMONS[n], COMMONS[n + 1], COMMONS[n + 2]]
  plan["S0"] = ["C3"]
  plan["P0"] = ["C4", "C5", "C6", "C7"]
  plan["H0"] = ["T", "C0", "C2", "C4", "C6"]
  plan["H1"] = ["T", "C1", "C3", "C5", "C7"]
  plan["H2"] = ["T", "C0", "C1", "C2"]
  rows = []
  for p, user in enumerate(order):
    for m, asin in enumerate(plan[user]):
      text = f"Review {m} by {user}."
      if user == "P0" and m == 0:
        text = "A very long review. " * 150
      rows.append(_review(user, asin, 1_600_000_000_000 + p * 100_000 + m * 1000, text,
                          rating=float(1 + (p + m) % 5)))
  rows.append(_review("R00", "C0", 1_700_000_000_000, "Again."))  # duplicate (user, item)
  return rows


BAD_REVIEW_LINES = [
    b'{"user_id": "R00", "parent_asin": "C1", ',  # malformed JSON
    b'{"user_id": "R00", "parent_asin": "C1", "text": "\xff\xfe", "rating": 5.0, '
    b'"timestamp": 1}',  # invalid UTF-8
    json.dumps({"parent_asin": "C1", "rating": 5.0, "text": "x", "timestamp": 1}).encode(),
    json.dumps(_review("R01", "C2", 5, text=None)).encode(),  # null text
    json.dumps({**_review("R01", "C2", 5), "timestamp": None}).encode(),
    json.dumps(_review("R01", "ZZZ", 5)).encode(),  # unknown item
    json.dumps(_review("R01", "NOTITLE", 5)).encode(),  # item without a title
    b"",  # blank line
]
BAD_META_LINES = [b'{"parent_asin": "C9", "title": ']


def write(folder: pathlib.Path, gz: bool = False, seed: int = 0) -> tuple[str, str]:
  """Writes reviews/meta JSONL (shuffled lines, bad lines mixed in); returns their paths."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = random.Random(seed)
  reviews = [json.dumps(r).encode() for r in review_rows()] + BAD_REVIEW_LINES
  rng.shuffle(reviews)
  meta = [json.dumps(r).encode() for r in meta_rows()]
  meta.insert(3, BAD_META_LINES[0])
  meta.insert(5, json.dumps({"title": "Dup", "parent_asin": "C1"}).encode())
  suffix = ".jsonl.gz" if gz else ".jsonl"
  paths = []
  for name, lines in (("Movies_and_TV", reviews), ("meta_Movies_and_TV", meta)):
    path = folder / f"{name}{suffix}"
    data = b"\n".join(lines) + b"\n"
    if gz:
      # mtime=0: the same bytes every time.
      with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(data)
    else:
      path.write_bytes(data)
    paths.append(str(path))
  return paths[0], paths[1]


BASE_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "base.py"


def make_config(encoder_path, decoder_path, dataset_dir, **data):
  """configs/base.py with the test tokenizers and `data` overrides."""
  from langptune_jax import config as config_lib

  overrides = {"encoder.path": str(encoder_path), "decoder.path": str(decoder_path),
               "data.dataset_dir": str(dataset_dir)}
  overrides.update({f"data.{k}": v for k, v in data.items()})
  return config_lib.load_config(BASE_CONFIG, overrides)


def amazon_config(folder: pathlib.Path, encoder_path, decoder_path, gz: bool = False,
                  **data):
  reviews, meta = write(folder / ("raw_gz" if gz else "raw"), gz=gz)
  settings = dict(SMALL_CFG, source="amazon", reviews=reviews, meta=meta)
  settings.update(data)
  return make_config(encoder_path, decoder_path, folder / "dataset", **settings)
