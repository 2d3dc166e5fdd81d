"""MovieLens-100K (recbole atomic files) -> `core.Source`.

`ml-100k.inter`: user_id:token, item_id:token, rating:float, timestamp:float.
`ml-100k.item`: item_id:token, movie_title:token_seq, release_year:token, class:token_seq.
Columns are found by their header names. Item text is built from title, year and
genres; history blocks carry the rating (MovieLens has no review text). Bad
lines (wrong column count, unparsable numbers, unknown items, duplicate
(user, item) pairs) are skipped and counted.
"""

from __future__ import annotations

import pathlib
from typing import Iterable

import numpy as np
import tqdm

from langptune_jax import assets
from langptune_jax.data import core, review_scan
from langptune_jax.data import prompts as prompts_lib
from langptune_jax.settings import DataSettings

DataError = core.DataError


def _read_atomic(path: pathlib.Path, columns: list[str], skips: core.SkipLog):
  """Rows (line number, {column: str}) of a recbole atomic file with these columns."""
  if not path.is_file():
    raise DataError(f"MovieLens file not found: {path}")
  with open(path, "rb") as f:
    header = f.readline().decode("utf-8").rstrip("\r\n").split("\t")
    names = [h.split(":")[0] for h in header]
    missing = [c for c in columns if c not in names]
    if missing:
      raise DataError(f"{path}: header lacks column(s) {', '.join(missing)} "
                      f"(found {', '.join(header)})")
    idx = [names.index(c) for c in columns]
    for n, raw in enumerate(f, start=2):
      try:
        line = raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError:
        skips.skip("invalid UTF-8", f"{path.name}:{n}")
        continue
      if not line.strip():
        continue
      parts = line.split("\t")
      if len(parts) != len(header):
        skips.skip("wrong number of columns", f"{path.name}:{n}")
        continue
      yield n, {c: parts[i] for c, i in zip(columns, idx)}


def load(cfg: DataSettings, skips: core.SkipLog, log: core.FilterLog) -> core.Source:
  """Reads MovieLens-100K into a `core.Source` (k-core included)."""
  folder = cfg.movielens_dir
  root = pathlib.Path(folder).expanduser() if folder else assets.asset_path("ml100k")
  if not root.is_dir():
    raise DataError(f"data.movielens_dir not found: {root}")

  item_keys: list[str] = []
  item_index: dict[str, int] = {}
  item_fields: list[tuple[str, str, list[str]]] = []
  for n, row in tqdm.tqdm(_read_atomic(root / "ml-100k.item",
                                       ["item_id", "movie_title", "release_year", "class"],
                                       skips),
                          desc="ml-100k.item", unit=" lines", disable=None):
    key = row["item_id"]
    if not key or not row["movie_title"].strip():
      skips.skip("item: missing id or title", f"ml-100k.item:{n}")
      continue
    if key in item_index:
      skips.skip("item: duplicate id", f"ml-100k.item:{n}")
      continue
    item_index[key] = len(item_keys)
    item_keys.append(key)
    item_fields.append((row["movie_title"].strip(), row["release_year"].strip(),
                        row["class"].split()))
  if not item_keys:
    raise DataError(f"no usable items in {root / 'ml-100k.item'}")

  user_keys: list[str] = []
  user_index: dict[str, int] = {}
  cols: list[list[float]] = [[], [], [], [], []]
  for n, row in tqdm.tqdm(_read_atomic(root / "ml-100k.inter",
                                       ["user_id", "item_id", "rating", "timestamp"], skips),
                          desc="ml-100k.inter", unit=" lines", unit_scale=True,
                          mininterval=1.0, disable=None):
    try:
      rating, ts_value = float(row["rating"]), float(row["timestamp"])
    except ValueError:
      skips.skip("unparsable rating/timestamp", f"ml-100k.inter:{n}")
      continue
    bad = review_scan.bad_number(ts_value, rating, prefix="")  # NaN, inf, negative, 1e400
    if bad is not None:
      skips.skip(bad, f"ml-100k.inter:{n}")
      continue
    ts = int(ts_value)
    i = item_index.get(row["item_id"])
    if i is None:
      skips.skip("unknown item", f"ml-100k.inter:{n}")
      continue
    uk = row["user_id"]
    if not uk:
      skips.skip("missing user_id", f"ml-100k.inter:{n}")
      continue
    u = user_index.get(uk)
    if u is None:
      u = user_index[uk] = len(user_keys)
      user_keys.append(uk)
    for col, v in zip(cols, (u, i, ts, n, rating)):
      col.append(v)
  if not cols[0]:
    raise DataError(f"no usable interactions in {root / 'ml-100k.inter'}")
  inter = core.Interactions.from_unsorted(*cols)
  if not cfg.keep_duplicate_reviews:
    inter = core.drop_duplicates(inter, skips, "duplicate (user, item)", "ml-100k.inter")

  before = inter.counts()
  inter = core.first_users(inter, cfg.max_users)
  if before != inter.counts():
    log.record(f"max_users({cfg.max_users})", before, inter.counts(), "raise data.max_users")
  inter = core.apply_kcore(inter, cfg.k_core, log, "k-core")

  def item_text(items: Iterable[int]) -> dict[int, str]:
    return {i: prompts_lib.movielens_item_text(*item_fields[i]) for i in items}

  def history_blocks(part: core.Interactions, rows: np.ndarray) -> list[str]:
    return [prompts_lib.rating_block(prompts_lib.movielens_item_text(
        *item_fields[int(part.item[j])]), round(float(part.rating[j]), 4))
            for j in rows.tolist()]

  return core.Source(inter=inter, user_keys=user_keys, item_keys=item_keys,
                     item_text=item_text, history_blocks=history_blocks)
