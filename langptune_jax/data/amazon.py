"""Amazon Reviews 2023 (reviews + meta JSONL, plain or .gz) -> `core.Source`.

Memory stays small however large the reviews file is:

  meta pass 1     keeps parent_asin -> (integer id, line number) for rows with a title;
  reviews pass 1  keeps (user, item, timestamp, line, rating) as integer/float numpy
                  arrays (the text is validated but not kept), then deduplicates and
                  runs the k-core on those arrays;
  meta pass 2     builds item texts only for items that survive;
  reviews pass 2  reads review text only for the interactions a prompt needs
                  (a later pass fetches the few extra ones when a filter shifts a
                  user's history).

Bad records (malformed JSON, invalid UTF-8, missing/null/mistyped fields,
duplicate reviews, reviews of unknown items) are skipped and counted per reason
with their first line numbers.
"""

from __future__ import annotations

import array
import gzip
import json
import os
import pathlib
from typing import Any, Iterable, Iterator

import numpy as np
import tqdm

from langptune_jax.data import core
from langptune_jax.data import prompts as prompts_lib

DataError = core.DataError


def open_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
  """(1-based line number, raw line bytes) of a plain or gzip JSONL file."""
  p = pathlib.Path(path).expanduser()
  if not str(path) or not p.is_file():
    raise DataError(f"input file not found: {p if str(path) else '(empty path)'}")
  with open(p, "rb") as f:
    gz = f.read(2) == b"\x1f\x8b"
  with (gzip.open(p, "rb") if gz else open(p, "rb", buffering=1 << 20)) as f:
    for n, line in enumerate(f, start=1):
      yield n, line


def _parse(line: bytes, n: int, where: str, skips: core.SkipLog) -> dict | None:
  """A JSON object from one line, or None (counted) when it is unusable."""
  try:
    text = line.decode("utf-8")
  except UnicodeDecodeError:
    skips.skip("invalid UTF-8", f"{where}:{n}")
    return None
  if not text.strip():
    skips.skip("blank line", f"{where}:{n}")
    return None
  try:
    row = json.loads(text)
  except ValueError:
    skips.skip("malformed JSON", f"{where}:{n}")
    return None
  if not isinstance(row, dict):
    skips.skip("malformed JSON", f"{where}:{n}")
    return None
  return row


def _bar(desc: str):
  return tqdm.tqdm(desc=desc, unit=" lines", unit_scale=True, mininterval=1.0, disable=None)


def _str_list(value: Any) -> list[str]:
  if value is None:
    return []
  if isinstance(value, str):
    return [value]
  if isinstance(value, (list, tuple)):
    return [str(v) for v in value if v is not None]
  return [str(value)]


def _is_number(v: Any) -> bool:
  return type(v) is int or type(v) is float  # bool (an int subclass) excluded


class AmazonSource:
  """Streams one Amazon Reviews 2023 category into a `core.Source`."""

  def __init__(self, reviews: str, meta: str, skips: core.SkipLog, log: core.FilterLog):
    self.reviews_path = reviews
    self.meta_path = meta
    self.skips = skips
    self.log = log
    self.item_keys: list[str] = []
    self.user_keys: list[str] = []
    self._meta_line: list[int] = []
    self._review_text: dict[int, str] = {}
    self.review_passes = 0
    self.num_review_lines = 0

  # --- meta ---------------------------------------------------------------
  def scan_meta(self) -> int:
    """Meta pass 1: integer ids for rows with a parent_asin and a title."""
    index: dict[str, int] = {}
    rows = no_title = 0
    name = pathlib.Path(self.meta_path).name
    with _bar("meta pass 1") as bar:
      for n, line in open_lines(self.meta_path):
        bar.update()
        row = _parse(line, n, name, self.skips)
        if row is None:
          continue
        rows += 1
        asin = row.get("parent_asin")
        if not isinstance(asin, str) or not asin:
          self.skips.skip("meta: missing parent_asin", f"{name}:{n}")
          continue
        title = row.get("title")
        if not isinstance(title, str) or not title.strip():
          no_title += 1  # design step 1: a filter, not bad input
          continue
        if asin in index:
          self.skips.skip("meta: duplicate parent_asin", f"{name}:{n}")
          continue
        index[asin] = len(self.item_keys)
        self.item_keys.append(asin)
        self._meta_line.append(n)
    self._item_index = index
    self.log.stages.append({"filter": "meta rows without a title", "rows_before": rows,
                            "rows_after": rows - no_title})
    if not index:
      raise DataError(f"meta filter (title present) left 0 of {rows} meta rows in "
                      f"{self.meta_path}; check data.meta")
    return len(index)

  def item_text(self, items: Iterable[int]) -> dict[int, str]:
    """Meta pass 2: item texts for the given item ids only."""
    wanted = {self._meta_line[i]: i for i in items}
    out: dict[int, str] = {}
    with _bar("meta pass 2") as bar:
      for n, line in open_lines(self.meta_path):
        bar.update()
        i = wanted.get(n)
        if i is None:
          continue
        row = json.loads(line.decode("utf-8"))
        out[i] = prompts_lib.amazon_item_text(
            row["title"], row.get("average_rating"), _str_list(row.get("description")),
            _str_list(row.get("categories")), row.get("price"))
        if len(out) == len(wanted):
          break
    return out

  # --- reviews ------------------------------------------------------------
  def scan_reviews(self) -> core.Interactions:
    """Reviews pass 1: compact integer arrays of valid reviews of known items."""
    users: dict[str, int] = {}
    user_keys = self.user_keys
    # array.array: compact typed storage with fast appends, whatever the file size.
    u, it, ref = (array.array("i") for _ in range(3))
    ts = array.array("q")
    rating = array.array("f")
    item_index = self._item_index
    skip = self.skips.skip
    loads = json.loads
    raw_decode = json.JSONDecoder().raw_decode
    name = pathlib.Path(self.reviews_path).name
    n = 0
    with _bar("reviews pass 1") as bar:
      for n, line in open_lines(self.reviews_path):
        if not n & 0x3FFF:
          bar.update(0x4000)
        try:
          text = line.decode("utf-8")  # explicit: json's own encoding sniffing is slower
        except UnicodeDecodeError:
          skip("invalid UTF-8", f"{name}:{n}")
          continue
        try:
          row, end = raw_decode(text)  # json.loads minus two wrapper calls per line
          if end != len(text) and text[end:].strip():
            raise ValueError("trailing data")
        except ValueError:
          try:
            row = loads(text)  # leading whitespace is fine for loads, not raw_decode
          except ValueError:
            skip("blank line" if not line.strip() else "malformed JSON", f"{name}:{n}")
            continue
        if type(row) is not dict:
          skip("malformed JSON", f"{name}:{n}")
          continue
        uid, asin, t = row.get("user_id"), row.get("parent_asin"), row.get("timestamp")
        r, text = row.get("rating"), row.get("text")
        if type(uid) is not str or not uid or type(asin) is not str or not asin:
          skip("review: missing user_id/parent_asin", f"{name}:{n}")
          continue
        if not _is_number(t) or not _is_number(r) or type(text) is not str:
          skip("review: missing or null timestamp/rating/text", f"{name}:{n}")
          continue
        i = item_index.get(asin)
        if i is None:
          skip("review: unknown item (no meta row with a title)", f"{name}:{n}")
          continue
        uidx = users.get(uid)
        if uidx is None:
          uidx = users[uid] = len(user_keys)
          user_keys.append(uid)
        u.append(uidx)
        it.append(i)
        ts.append(int(t))
        ref.append(n)
        rating.append(r)
      bar.update(n & 0x3FFF)
    self.num_review_lines = n
    self.review_passes = 1
    if not u:
      raise DataError(f"no usable reviews in {self.reviews_path} ({n} lines; "
                      f"skipped: {self.skips.counts})")
    inter = core.Interactions.from_unsorted(*(np.frombuffer(a, dtype=a.typecode)
                                              for a in (u, it, ts, ref, rating)))
    # Duplicates: the same user reviewing the same item again; the earliest stays.
    return core.drop_duplicates(inter, self.skips, "review: duplicate (user, item)", name)

  def _ensure_text(self, refs: Iterable[int]) -> None:
    """Reviews pass 2 (and rarely later ones): text of the given review lines."""
    need = set(int(r) for r in refs) - self._review_text.keys()
    if not need:
      return
    self.review_passes += 1
    last = max(need)
    with tqdm.tqdm(total=len(need), desc=f"reviews pass {self.review_passes}",
                   unit=" reviews", mininterval=1.0, disable=None) as bar:
      for n, line in open_lines(self.reviews_path):
        if n in need:
          self._review_text[n] = json.loads(line.decode("utf-8"))["text"]
          bar.update()
        if n >= last:
          break

  def history_blocks(self, inter: core.Interactions, rows: np.ndarray) -> list[str]:
    self._ensure_text(inter.ref[rows].tolist())
    texts = self._texts_cache
    missing = [int(i) for i in np.unique(inter.item[rows]) if int(i) not in texts]
    if missing:
      texts.update(self.item_text(missing))
    return [prompts_lib.review_block(texts[int(inter.item[j])], _rating(inter.rating[j]),
                                     self._review_text[int(inter.ref[j])])
            for j in rows.tolist()]

  _texts_cache: dict[int, str]


def _rating(value: float) -> Any:
  # Printed as a float, as in the release (5.0); rounding undoes float32 storage.
  return round(float(value), 4)


def load(cfg: Any, skips: core.SkipLog, log: core.FilterLog) -> core.Source:
  """Reads an Amazon category into a `core.Source` (design §2 steps 1-2)."""
  src = AmazonSource(cfg.get("reviews", ""), cfg.get("meta", ""), skips, log)
  for field, path in (("data.reviews", src.reviews_path), ("data.meta", src.meta_path)):
    if not path or not pathlib.Path(path).expanduser().is_file():
      raise DataError(f"{field} file not found: {path or '(empty)'}")
  src.scan_meta()
  inter = src.scan_reviews()
  log.stages.append({"filter": "reviews kept after validation", "interactions_after": len(inter),
                     "review_lines": src.num_review_lines})
  before = inter.counts()
  inter = core.first_users(inter, int(cfg.get("max_users", 0)))
  if before != inter.counts():
    log.record(f"max_users({cfg.get('max_users')})", before, inter.counts(),
               "raise data.max_users")
  inter = core.apply_kcore(inter, int(cfg.get("k_core", 5)), log, "k-core")
  src._texts_cache = {}

  def item_text(items: Iterable[int]) -> dict[int, str]:
    items = list(items)
    missing = [i for i in items if i not in src._texts_cache]
    if missing:
      src._texts_cache.update(src.item_text(missing))
    return {i: src._texts_cache[i] for i in items}

  return core.Source(inter=inter, user_keys=src.user_keys, item_keys=src.item_keys,
                     item_text=item_text, history_blocks=src.history_blocks)
