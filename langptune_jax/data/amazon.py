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

import os
import pathlib
from typing import Any, Iterable, Iterator

import numpy as np
import tqdm

from langptune_jax.data import core, review_scan
from langptune_jax.data import prompts as prompts_lib
from langptune_jax.settings import DataSettings

DataError = core.DataError


def open_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
  """(1-based line number, raw line bytes) of a plain or gzip JSONL file."""
  p = pathlib.Path(path).expanduser()
  if not str(path) or not p.is_file():
    raise DataError(f"input file not found: {p if str(path) else '(empty path)'}")
  with review_scan.open_binary(p) as f:
    for n, line in enumerate(f, start=1):
      yield n, line


def _parse(line: bytes, n: int, where: str, skips: core.SkipLog) -> dict | None:
  """A JSON object from one line, or None (counted) when it is unusable."""
  row, bad = review_scan.parse_line(line)
  if bad is None and not isinstance(row, dict):
    bad = "malformed JSON"
  if bad is not None:
    skips.skip(bad, f"{where}:{n}")
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


class AmazonSource:
  """Streams one Amazon Reviews 2023 category into a `core.Source`."""

  def __init__(self, reviews: str, meta: str, skips: core.SkipLog, log: core.FilterLog,
               scan_workers: int = 0, keep_duplicates: bool = True):
    self.reviews_path = reviews
    # The authors keep repeated (user, item) reviews: they count toward the k-core.
    self.keep_duplicates = keep_duplicates
    self.scan_workers = scan_workers  # reviews pass 1 processes; 0: by file size and CPUs
    self.meta_path = meta
    self.skips = skips
    self.log = log
    self.item_keys: list[str] = []
    self.user_keys: list[str] = []
    self._meta_line: list[int] = []
    self._review_text: dict[int, str] = {}
    self.review_passes = 0
    self.num_review_lines = 0
    # Line number -> byte offset of each kept review, for seeks in pass 2 (plain files).
    self._seekable = False
    self._ref_lines = np.zeros(0, np.int32)
    self._ref_offsets = np.zeros(0, np.int64)

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
          no_title += 1  # docs/method.md §2 step 1: a filter, not bad input
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
        row = review_scan.parse_line(line)[0]  # validated by pass 1
        out[i] = prompts_lib.amazon_item_text(
            row["title"], row.get("average_rating"), _str_list(row.get("description")),
            _str_list(row.get("categories")), row.get("price"))
        if len(out) == len(wanted):
          break
    return out

  # --- reviews ------------------------------------------------------------
  def scan_reviews(self) -> core.Interactions:
    """Reviews pass 1: compact integer arrays of valid reviews of known items."""
    path = str(pathlib.Path(self.reviews_path).expanduser())
    name = pathlib.Path(path).name
    gz = review_scan.is_gzip(path)  # gzip cannot be cut into byte ranges: one process
    workers = 1 if gz else review_scan.auto_workers(path, self.scan_workers)
    max_ex = self.skips.max_examples
    with _bar("reviews pass 1") as bar:
      if workers > 1:
        chunks = review_scan.scan_parallel(path, workers, self._item_index, max_ex, bar.update)
      else:
        chunks = [review_scan.scan_range(path, 0, None, self._item_index, max_ex,
                                         progress=bar.update)]
    *columns, byte_offsets = self._merge(chunks, name)
    # Sorted by line: pass 2 seeks to the few reviews it needs instead of re-reading.
    self._seekable = not gz
    self._ref_lines, self._ref_offsets = columns[3], byte_offsets
    n = self.num_review_lines
    self.review_passes = 1
    if not len(columns[0]):
      raise DataError(f"no usable reviews in {self.reviews_path} ({n} lines; "
                      f"skipped: {self.skips.counts})")
    inter = core.Interactions.from_unsorted(*columns)
    if self.keep_duplicates:
      return inter
    # Duplicates: the same user reviewing the same item again; the earliest stays.
    return core.drop_duplicates(inter, self.skips, "review: duplicate (user, item)", name)

  def _merge(self, chunks: list[review_scan.Chunk], name: str) -> list[np.ndarray]:
    """Chunks in file order -> global user ids, line numbers and skip records."""
    users: dict[str, int] = {}
    columns: list[list[np.ndarray]] = [[] for _ in range(6)]
    offset = 0
    for chunk in chunks:
      remap = np.fromiter((users.setdefault(k, len(users)) for k in chunk.user_keys),
                          np.int32, len(chunk.user_keys))
      local = np.frombuffer(chunk.user, np.int32)
      columns[0].append(remap[local] if len(local) else local)
      columns[1].append(np.frombuffer(chunk.item, np.int32))
      columns[2].append(np.frombuffer(chunk.ts, np.int64))
      columns[3].append(np.frombuffer(chunk.line, np.int32) + np.int32(offset))
      columns[4].append(np.frombuffer(chunk.rating, np.float32))
      columns[5].append(np.frombuffer(chunk.offset, np.int64))
      for reason, count in chunk.skip_counts.items():
        lines = chunk.skip_lines.get(reason, [])
        for line in lines:  # the first few examples, then the bare count
          self.skips.skip(reason, f"{name}:{line + offset}")
        self.skips.counts[reason] = self.skips.counts.get(reason, 0) + count - len(lines)
      offset += chunk.num_lines
    self.user_keys.extend(users)
    self.num_review_lines = offset
    return [np.concatenate(c) for c in columns]

  def keep_offsets_of(self, refs: np.ndarray) -> None:
    """Forgets the byte offsets of reviews no longer needed (after the k-core)."""
    keep = np.isin(self._ref_lines, refs)
    self._ref_lines, self._ref_offsets = self._ref_lines[keep], self._ref_offsets[keep]

  def _ensure_text(self, refs: Iterable[int]) -> None:
    """Reviews pass 2 (and rarely later ones): text of the given review lines."""
    need = sorted(set(int(r) for r in refs) - self._review_text.keys())
    if not need:
      return
    self.review_passes += 1
    with tqdm.tqdm(total=len(need), desc=f"reviews pass {self.review_passes}",
                   unit=" reviews", mininterval=1.0, disable=None) as bar:
      if self._seekable:
        at = np.searchsorted(self._ref_lines, need)
        with open(pathlib.Path(self.reviews_path).expanduser(), "rb") as f:
          for n, offset in zip(need, self._ref_offsets[at].tolist()):
            f.seek(offset)
            self._review_text[n] = review_scan.parse_line(f.readline())[0]["text"]
            bar.update()
        return
      wanted, last = set(need), need[-1]
      for n, line in open_lines(self.reviews_path):  # gzip: no seeking, read through
        if n in wanted:
          self._review_text[n] = review_scan.parse_line(line)[0]["text"]
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


def load(cfg: DataSettings, skips: core.SkipLog, log: core.FilterLog) -> core.Source:
  """Reads an Amazon category into a `core.Source` (docs/method.md §2, steps 1-2)."""
  src = AmazonSource(cfg.reviews, cfg.meta, skips, log, scan_workers=cfg.scan_workers,
                     keep_duplicates=cfg.keep_duplicate_reviews)
  for field, path in (("data.reviews", src.reviews_path), ("data.meta", src.meta_path)):
    if not path or not pathlib.Path(path).expanduser().is_file():
      raise DataError(f"{field} file not found: {path or '(empty)'}")
  src.scan_meta()
  inter = src.scan_reviews()
  log.stages.append({"filter": "reviews kept after validation", "interactions_after": len(inter),
                     "review_lines": src.num_review_lines})
  before = inter.counts()
  inter = core.first_users(inter, cfg.max_users)
  if before != inter.counts():
    log.record(f"max_users({cfg.max_users})", before, inter.counts(), "raise data.max_users")
  inter = core.apply_kcore(inter, cfg.k_core, log, "k-core")
  src.keep_offsets_of(inter.ref)
  src._texts_cache = {}

  def item_text(items: Iterable[int]) -> dict[int, str]:
    items = list(items)
    missing = [i for i in items if i not in src._texts_cache]
    if missing:
      src._texts_cache.update(src.item_text(missing))
    return {i: src._texts_cache[i] for i in items}

  return core.Source(inter=inter, user_keys=src.user_keys, item_keys=src.item_keys,
                     item_text=item_text, history_blocks=src.history_blocks)
