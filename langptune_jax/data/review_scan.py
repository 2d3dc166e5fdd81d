"""Reviews pass 1: a reviews JSONL file -> compact integer columns, in parallel.

A plain (not gzip) file is cut into line-aligned byte ranges that forked worker
processes parse at the same time; their results are merged in file order, so
user ids, line numbers and skip examples are exactly those of one sequential
scan. Parsing uses orjson; a line orjson refuses goes through the standard
library parser, which decides whether it is bad and why (so the skip reasons do
not depend on the fast path).
"""

from __future__ import annotations

import array
import dataclasses
import gzip
import json
import math
import multiprocessing
import os
import warnings
import zlib
from typing import Any, Callable

import orjson

# A worker gets at least this many bytes: below it, process start-up outweighs the gain.
MIN_BYTES_PER_WORKER = 32 << 20
_PROGRESS_EVERY = 1 << 14  # lines between progress-counter updates


def parse_line(line: bytes) -> tuple[Any, str | None]:
  """(value, None) for a valid JSON line, or (None, skip reason)."""
  try:
    return orjson.loads(line), None
  except orjson.JSONDecodeError:
    pass
  try:
    text = line.decode("utf-8")
  except UnicodeDecodeError:
    return None, "invalid UTF-8"
  if not text.strip():
    return None, "blank line"
  try:
    return json.loads(text), None  # e.g. NaN, which orjson refuses and json accepts
  except ValueError:
    return None, "malformed JSON"


def _is_number(v: Any) -> bool:
  return type(v) is int or type(v) is float  # bool (an int subclass) excluded


def is_gzip(path: str | os.PathLike) -> bool:
  with open(path, "rb") as f:
    return f.read(2) == b"\x1f\x8b"


# Timestamps are kept as int64 seconds (or milliseconds): anything larger is not a time.
_MAX_TIMESTAMP = 2 ** 62
_MAX_RATING = 1e30  # stored as float32


class _CheckedGzip:
  """Line iteration over a gzip file; a truncated or corrupt file is one clear error."""

  def __init__(self, path: str | os.PathLike):
    self._path = path
    self._file = gzip.open(path, "rb")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._file.close()

  def __iter__(self):
    try:
      yield from self._file
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
      # A ValueError: the CLI prints it as one line (core.DataError is one too).
      raise ValueError(f"{self._path}: truncated or corrupt gzip file ({type(e).__name__}: "
                       f"{e}); download it again") from None


def open_binary(path: str | os.PathLike):
  """A plain or gzip file, opened for reading bytes (line iteration)."""
  if is_gzip(path):
    return _CheckedGzip(path)
  return open(path, "rb", buffering=1 << 20)


def _finite(v: int | float) -> bool:
  return type(v) is int or math.isfinite(v)  # math.isfinite overflows on huge ints


def bad_number(timestamp: int | float, rating: int | float, prefix: str = "review: "
               ) -> str | None:
  """The skip reason of a record with an unusable timestamp or rating, else None."""
  if not _finite(timestamp):
    return f"{prefix}timestamp NaN or infinite"
  if timestamp < 0:
    return f"{prefix}negative timestamp"
  if timestamp >= _MAX_TIMESTAMP:
    return f"{prefix}timestamp too large"
  if not _finite(rating):
    return f"{prefix}rating NaN or infinite"
  if rating < 0:
    return f"{prefix}negative rating"
  if rating > _MAX_RATING:
    return f"{prefix}rating too large"
  return None


@dataclasses.dataclass
class Chunk:
  """Pass-1 result of one byte range; line numbers count from 1 within the range."""
  user_keys: list[str]
  user: array.array
  item: array.array
  ts: array.array
  line: array.array
  rating: array.array
  offset: array.array  # byte offset of each kept line, for direct reads in pass 2
  num_lines: int
  skip_counts: dict[str, int]
  skip_lines: dict[str, list[int]]  # the first few line numbers per reason


def scan_range(path: str, start: int, end: int | None, item_index: dict[str, int],
               max_examples: int, progress: Callable[[int], None] | None = None) -> Chunk:
  """Parses the lines in bytes [start, end) of `path` (end None: to the end).

  Byte ranges other than the whole file (start 0, end None) need a plain file.
  """
  users: dict[str, int] = {}
  user_keys: list[str] = []
  u, it, ref = (array.array("i") for _ in range(3))
  ts = array.array("q")
  rating = array.array("f")
  offsets = array.array("q")
  counts: dict[str, int] = {}
  examples: dict[str, list[int]] = {}

  def skip(reason: str, n: int) -> None:
    counts[reason] = counts.get(reason, 0) + 1
    ex = examples.setdefault(reason, [])
    if len(ex) < max_examples:
      ex.append(n)

  n = 0
  pos = start
  with open_binary(path) as f:
    if start:
      f.seek(start)
    for line in f:
      n += 1
      line_start = pos
      pos += len(line)
      if progress is not None and not n % _PROGRESS_EVERY:
        progress(_PROGRESS_EVERY)
      row, bad = parse_line(line)
      if bad is None and type(row) is not dict:
        bad = "malformed JSON"
      if bad is not None:
        skip(bad, n)
      else:
        uid, asin, t = row.get("user_id"), row.get("parent_asin"), row.get("timestamp")
        r, text = row.get("rating"), row.get("text")
        if type(uid) is not str or not uid or type(asin) is not str or not asin:
          skip("review: missing user_id/parent_asin", n)
        elif not _is_number(t) or not _is_number(r) or type(text) is not str:
          skip("review: missing or null timestamp/rating/text", n)
        elif (number := bad_number(t, r)) is not None:
          skip(number, n)
        else:
          i = item_index.get(asin)
          if i is None:
            skip("review: unknown item (no meta row with a title)", n)
          else:
            uidx = users.get(uid)
            if uidx is None:
              uidx = users[uid] = len(user_keys)
              user_keys.append(uid)
            u.append(uidx)
            it.append(i)
            ts.append(int(t))
            ref.append(n)
            rating.append(r)
            offsets.append(line_start)
      if end is not None and pos >= end:
        break
  if progress is not None:
    progress(n % _PROGRESS_EVERY)
  return Chunk(user_keys, u, it, ts, ref, rating, offsets, n, counts, examples)


def line_aligned_ranges(path: str, parts: int) -> list[tuple[int, int]]:
  """`parts` byte ranges of about equal size, each starting at a line start."""
  size = os.path.getsize(path)
  bounds = [0]
  with open(path, "rb") as f:
    for k in range(1, parts):
      f.seek(max(size * k // parts - 1, bounds[-1]))
      if f.tell() > 0:
        f.readline()  # to the start of the next line
      bounds.append(max(min(f.tell(), size), bounds[-1]))
  bounds.append(size)
  return list(zip(bounds[:-1], bounds[1:]))


def auto_workers(path: str, requested: int) -> int:
  """Worker count: `requested` if > 0, else what the file size and the CPUs allow."""
  if requested > 0:
    return requested
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cpus = os.cpu_count() or 1
  return max(1, min(cpus, os.path.getsize(path) // MIN_BYTES_PER_WORKER))


# Set in the parent just before the fork, so that workers inherit them unpickled.
_WORKER_STATE: dict[str, Any] = {}


def _scan_in_worker(job: tuple[int, int]) -> Chunk:
  state = _WORKER_STATE
  counter = state["counter"]

  def progress(lines: int) -> None:
    with counter.get_lock():
      counter.value += lines

  return scan_range(state["path"], job[0], job[1], state["item_index"],
                    state["max_examples"], progress=progress)


def scan_parallel(path: str, workers: int, item_index: dict[str, int], max_examples: int,
                  on_progress: Callable[[int], None]) -> list[Chunk]:
  """Chunks of a plain file scanned by `workers` forked processes, in file order."""
  ranges = line_aligned_ranges(path, workers)
  ctx = multiprocessing.get_context("fork")
  counter = ctx.Value("q", 0)
  _WORKER_STATE.update(path=path, item_index=item_index, max_examples=max_examples,
                       counter=counter)
  try:
    with warnings.catch_warnings():
      # JAX (and Python >= 3.12) warn that forking a multithreaded process may
      # deadlock a child that uses those threads' locks. These children run only
      # pure-Python parsing on inherited data and never call into JAX or XLA.
      warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
      warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks")
      pool = ctx.Pool(len(ranges))
    with pool:
      result = pool.map_async(_scan_in_worker, ranges, chunksize=1)
      seen = 0
      while not result.ready():
        result.wait(0.5)
        now = counter.value
        on_progress(now - seen)
        seen = now
      chunks = result.get()
      on_progress(counter.value - seen)
  finally:
    _WORKER_STATE.clear()
  return chunks
