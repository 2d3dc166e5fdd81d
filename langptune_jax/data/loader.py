"""Grain pipelines and in-memory access over a prepared dataset (see builder.py).

* `train_iterator`: seeded shuffle (a new permutation every epoch), repeat,
  fixed-shape batches with drop_remainder, per-process sharding; the iterator's
  `get_state()` / `set_state()` make it checkpointable.
* `eval_iterator`: one pass over all rows of a split in order, the last batch
  padded, with a `valid` mask; every process yields the same number of batches
  (needed by `jax.make_array_from_process_local_data`).
* `load_split`: a whole split as numpy arrays (text columns as lists of str).

Batches are dicts of numpy arrays holding only the numeric features (text
columns are left out unless asked for). Sharding defaults to
`jax.process_index()` / `jax.process_count()`; tests pass the shard arguments.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any, Sequence

import grain
import grain.python as grain_py
import numpy as np
import tensorflow_datasets as tfds

from langptune_jax.data import builder, core

TEXT_FEATURES = {"user_key", "prompt", "item_key", "text"}


def _config_for(split: str) -> str:
  if split in builder.USER_SPLITS:
    return "users"
  if split == builder.ITEM_SPLIT:
    return "items"
  raise ValueError(f"unknown split {split!r}; expected one of "
                   f"{', '.join(builder.USER_SPLITS + (builder.ITEM_SPLIT,))}")


def check_dataset(dataset_dir: str | os.PathLike) -> pathlib.Path:
  """The dataset folder, or a DataError when it is missing or incomplete."""
  path = pathlib.Path(dataset_dir).expanduser()
  if not (path / builder.STATS_FILE).is_file():
    raise core.DataError(f"no prepared dataset at {path} (missing {builder.STATS_FILE}); "
                         "run `langptune-jax prepare` first")
  return path


def load_stats(dataset_dir: str | os.PathLike) -> dict[str, Any]:
  """stats.json of a dataset (counts, filters, settings, `format` lengths and pad ids)."""
  path = check_dataset(dataset_dir) / builder.STATS_FILE
  try:
    with open(path) as f:
      stats = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise core.DataError(f"{path}: corrupt dataset file ({e}); run `langptune-jax prepare` "
                         "again") from None
  if not isinstance(stats, dict):
    raise core.DataError(f"{path}: corrupt dataset file (not a JSON object); run "
                         "`langptune-jax prepare` again")
  return stats


# (path, size, mtime) of files whose checksum matched: each file is hashed once per process.
_VERIFIED: set[tuple[str, int, int]] = set()


def verify_files(dataset_dir: str | os.PathLike, files: Sequence[str | os.PathLike]) -> None:
  """Checks `files` against the SHA-256 sums stats.json recorded when the dataset was built.

  A dataset written before checksums were recorded is not checked.
  """
  root = pathlib.Path(dataset_dir).expanduser()
  sums = load_stats(root).get(builder.CHECKSUMS)
  if not sums:
    return
  for file in files:
    file = pathlib.Path(file)
    st = file.stat()
    key = (str(file.resolve()), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
      continue
    name = file.resolve().relative_to(root.resolve()).as_posix()
    expected = sums.get(name)
    if expected is None:
      raise core.DataError(f"{file}: not listed in {root / builder.STATS_FILE}; the dataset "
                           "was changed after it was built; run `langptune-jax prepare` again")
    if builder.sha256_file(file) != expected:
      raise core.DataError(f"{file}: corrupt dataset file (checksum differs from "
                           f"{builder.STATS_FILE}); run `langptune-jax prepare` again")
    _VERIFIED.add(key)


@functools.lru_cache(maxsize=16)
def _features(folder: str):
  return tfds.features.FeatureConnector.from_config(folder)


def split_files(dataset_dir: str | os.PathLike, split: str) -> list[str]:
  folder = builder.config_dir(check_dataset(dataset_dir), _config_for(split))
  files = sorted(str(p) for p in folder.glob(f"{builder.NAME}-{split}.array_record-*"))
  root = check_dataset(dataset_dir)
  prefix = folder.relative_to(root).as_posix() + f"/{builder.NAME}-{split}.array_record-"
  for name in load_stats(root).get(builder.CHECKSUMS) or {}:
    if name.startswith(prefix) and not (root / name).is_file():
      raise core.DataError(f"{root / name}: dataset file missing; run `langptune-jax prepare` "
                           "again")
  if not files:
    raise core.DataError(f"split {split!r} has no array_record files in {folder}")
  # The split's records and its config's metadata (features.json, dataset_info.json, ...).
  metadata = [p for p in folder.iterdir() if p.is_file() and ".array_record-" not in p.name]
  verify_files(dataset_dir, files + sorted(metadata))
  return files


class _Decode(grain_py.MapTransform):
  """Deserializes a TFDS record to a dict of numpy values, dropping text if asked."""

  def __init__(self, folder: str, keep_text: bool):
    self._folder = folder
    self._keep_text = keep_text

  def map(self, record: bytes) -> dict[str, Any]:
    row = _features(self._folder).deserialize_example_np(record)
    if not self._keep_text:
      row = {k: v for k, v in row.items() if k not in TEXT_FEATURES}
    return row


def source(dataset_dir: str | os.PathLike, split: str) -> grain_py.ArrayRecordDataSource:
  """Random-access source of one split's serialized records."""
  return grain_py.ArrayRecordDataSource(split_files(dataset_dir, split))


def _shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"shard index {process_index} not in [0, {process_count})")
  return process_index, process_count


def _decode_fn(dataset_dir, split, keep_text):
  folder = str(builder.config_dir(dataset_dir, _config_for(split)))
  return _Decode(folder, keep_text)


def train_iterator(dataset_dir: str | os.PathLike, split: str, batch_size: int, *,
                   seed: int, num_epochs: int | None = None,
                   process_index: int | None = None, process_count: int | None = None,
                   num_workers: int = 0, keep_text: bool = False,
                   read_threads: int = 4, prefetch_batches: int = 4):
  """Shuffled, repeated, fixed-shape batches of this process's shard of `split`.

  `batch_size` is per process. Returns a grain DatasetIterator (checkpoint it
  with `get_state()` / `set_state()`).
  """
  index, count = _shard(process_index, process_count)
  ds = grain.MapDataset.source(source(dataset_dir, split))[index::count]
  if len(ds) < batch_size:
    raise core.DataError(f"split {split!r} has {len(ds)} rows on shard {index}/{count}, "
                         f"fewer than one batch of {batch_size}")
  decode = _decode_fn(dataset_dir, split, keep_text)
  ds = ds.shuffle(seed=seed).repeat(num_epochs).map(decode)
  ds = ds.batch(batch_size, drop_remainder=True)
  # Prefetch counts batches here; grain's default (500) would decode hundreds ahead.
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                               prefetch_buffer_size=prefetch_batches))
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it_ds)


class _PaddedShard(grain_py.RandomAccessDataSource):
  """Rows index, index+count, ... of a source, padded to `length` with row 0."""

  def __init__(self, src, index: int, count: int, length: int):
    self._src, self._index, self._count, self._length = src, index, count, length
    self._n = len(src)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, j: int):
    row = self._index + self._count * j
    valid = row < self._n
    return self._src[row if valid else 0], np.int32(valid)


def eval_iterator(dataset_dir: str | os.PathLike, split: str, batch_size: int, *,
                  process_index: int | None = None, process_count: int | None = None,
                  keep_text: bool = False, read_threads: int = 4,
                  prefetch_batches: int = 4):
  """One ordered pass over every row of `split`; padding rows have `valid` = 0.

  Rows are dealt round-robin to processes; each process yields
  ceil(ceil(N / count) / batch_size) batches of exactly `batch_size` rows.
  """
  index, count = _shard(process_index, process_count)
  src = source(dataset_dir, split)
  per_process = -(-len(src) // count)
  length = -(-per_process // batch_size) * batch_size
  decode = _decode_fn(dataset_dir, split, keep_text)

  def with_valid(pair):
    record, valid = pair
    row = decode.map(record)
    row["valid"] = valid
    return row

  ds = grain.MapDataset.source(_PaddedShard(src, index, count, length)).map(with_valid)
  ds = ds.batch(batch_size, drop_remainder=False)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                   prefetch_buffer_size=prefetch_batches)))


def load_split(dataset_dir: str | os.PathLike, split: str,
               columns: Sequence[str] | None = None) -> dict[str, Any]:
  """A whole split in memory: numeric columns stacked, text columns as lists of str."""
  src = source(dataset_dir, split)
  decode = _decode_fn(dataset_dir, split, keep_text=True)
  rows = [decode.map(src[i]) for i in range(len(src))]
  if not rows:
    raise core.DataError(f"split {split!r} of {dataset_dir} is empty")
  names = list(columns) if columns else list(rows[0])
  out: dict[str, Any] = {}
  for name in names:
    if name not in rows[0]:
      raise KeyError(f"split {split!r} has no column {name!r}; has {', '.join(rows[0])}")
    if name in TEXT_FEATURES:
      out[name] = [r[name].decode("utf-8") if isinstance(r[name], bytes) else str(r[name])
                   for r in rows]
    else:
      out[name] = np.stack([np.asarray(r[name]) for r in rows])
  return out
