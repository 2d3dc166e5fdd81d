"""Source-independent preprocessing: k-core, length filters, user splits, targets.

Both sources (Amazon Reviews 2023, MovieLens) reduce their raw files to an
`Interactions` table of integer ids kept sorted by (user, timestamp, ref), where
`ref` is the record's position in its file (the tie-breaker that makes the time
order total). From there `build_splits` runs docs/method.md §2 steps 3-6 identically:

  length filters (data.filter_order: "authors" removes item-length and
  prompt-length users together, then one k-core; "iterative" alternates them
  with k-cores until stable) -> 80/20 user split by first interaction -> test
  items unseen in training -> test users with too few interactions ->
  history/target -> val/test halving. The catalogue (data.catalogue) is the
  items of training interactions (the authors') or every item left.

Every filter is recorded in a `FilterLog` (users/items/interactions before and
after); a filter that leaves nothing raises `DataError` naming the filter and
the config field to change.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import tqdm

from langptune_jax.data import prompts as prompts_lib
from langptune_jax.settings import DataSettings
from langptune_jax.weights import tokenizer as tok_lib


class DataError(ValueError):
  """Raised for unusable input data: missing files or filters that leave nothing."""


@dataclasses.dataclass
class SkipLog:
  """Skipped input records per reason, with the first few line numbers of each."""
  max_examples: int = 5
  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  def skip(self, reason: str, where: str) -> None:
    self.counts[reason] = self.counts.get(reason, 0) + 1
    ex = self.examples.setdefault(reason, [])
    if len(ex) < self.max_examples:
      ex.append(where)

  def as_dict(self) -> dict[str, Any]:
    return {r: {"count": c, "first": self.examples.get(r, [])}
            for r, c in sorted(self.counts.items())}


@dataclasses.dataclass
class Interactions:
  """Interaction table sorted by (user, ts, ref); ids index `user_keys`/`item_keys`."""
  # 24 bytes per interaction: the table of a 17M-review file stays ~0.4 GB.
  user: np.ndarray  # int32
  item: np.ndarray  # int32
  ts: np.ndarray  # int64
  ref: np.ndarray  # int32: record position in its file (line number or row)
  rating: np.ndarray  # float32

  @classmethod
  def from_unsorted(cls, user, item, ts, ref, rating) -> "Interactions":
    user, item, ref = (np.asarray(a, np.int32) for a in (user, item, ref))
    ts = np.asarray(ts, np.int64)
    rating = np.asarray(rating, np.float32)
    order = np.lexsort((ref, ts, user))
    return cls(user[order], item[order], ts[order], ref[order], rating[order])

  def take(self, mask: np.ndarray) -> "Interactions":
    return Interactions(self.user[mask], self.item[mask], self.ts[mask], self.ref[mask],
                        self.rating[mask])

  def __len__(self) -> int:
    return len(self.user)

  def counts(self) -> tuple[int, int, int]:
    """(users, items, interactions); ids are dense, so bincount beats np.unique."""
    if len(self.user) == 0:
      return 0, 0, 0
    return (int(np.count_nonzero(np.bincount(self.user))),
            int(np.count_nonzero(np.bincount(self.item))), len(self.user))

  def rank_in_user(self) -> np.ndarray:
    """Position of each interaction in its user's time-ordered list."""
    n = len(self.user)
    if n == 0:
      return np.zeros(0, np.int64)
    start = np.r_[True, self.user[1:] != self.user[:-1]]
    starts = np.flatnonzero(start)
    group = np.cumsum(start) - 1
    return np.arange(n) - starts[group]


class FilterLog:
  """Ordered record of every filter stage; raises DataError when one leaves nothing."""

  def __init__(self):
    self.stages: list[dict[str, Any]] = []

  def record(self, name: str, before: tuple[int, int, int], after: tuple[int, int, int],
             hint: str, **extra: Any) -> None:
    self.stages.append({
        "filter": name,
        "users_before": before[0], "users_after": after[0],
        "items_before": before[1], "items_after": after[1],
        "interactions_before": before[2], "interactions_after": after[2],
        **extra,
    })
    if after[0] == 0 or after[2] == 0:
      raise DataError(f"{name} left 0 of {before[0]} users ({before[2]} interactions); {hint}")


def drop_duplicates(inter: Interactions, skips: SkipLog, reason: str,
                    where: str) -> Interactions:
  """Drops repeated (user, item) pairs, keeping the earliest; counts the rest."""
  # `inter` is sorted by (user, ts, ref): a stable sort on (user, item) keeps that
  # order inside each pair, so the first row of a pair is its earliest.
  pair = inter.user.astype(np.int64) * (int(inter.item.max(initial=0)) + 1) + inter.item
  order = np.argsort(pair, kind="stable")
  su, si = inter.user[order], inter.item[order]
  dup = np.zeros(len(order), bool)
  dup[1:] = (su[1:] == su[:-1]) & (si[1:] == si[:-1])
  dup_rows = np.zeros(len(order), bool)
  dup_rows[order[dup]] = True
  if dup_rows.any():
    skips.counts[reason] = skips.counts.get(reason, 0) + int(dup_rows.sum())
    ex = skips.examples.setdefault(reason, [])
    for ref in np.sort(inter.ref[dup_rows])[:skips.max_examples - len(ex)]:
      ex.append(f"{where}:{int(ref)}")
  return inter.take(~dup_rows)


def kcore(inter: Interactions, k: int) -> tuple[Interactions, int]:
  """Iterative k-core: drop users and items with < k interactions until stable.

  Returns the filtered table and the number of removal rounds.
  """
  if k <= 1 or len(inter) == 0:
    return inter, 0
  keep = np.ones(len(inter), bool)
  nu = int(inter.user.max()) + 1
  ni = int(inter.item.max()) + 1
  rounds = 0
  while True:
    uc = np.bincount(inter.user[keep], minlength=nu)
    ic = np.bincount(inter.item[keep], minlength=ni)
    bad = keep & ((uc[inter.user] < k) | (ic[inter.item] < k))
    if not bad.any():
      return inter.take(keep), rounds
    keep &= ~bad
    rounds += 1


def apply_kcore(inter: Interactions, k: int, log: FilterLog, name: str) -> Interactions:
  before = inter.counts()
  out, rounds = kcore(inter, k)
  log.record(f"{name}({k})", before, out.counts(), "lower data.k_core", rounds=rounds)
  return out


def first_users(inter: Interactions, max_users: int) -> Interactions:
  """Keeps the first `max_users` users by order of first interaction (0: all)."""
  if max_users <= 0:
    return inter
  order = users_by_first_interaction(inter)
  return inter.take(np.isin(inter.user, order[:max_users]))


def users_by_first_interaction(inter: Interactions) -> np.ndarray:
  """User ids ordered by (first timestamp, first ref, user id)."""
  rank = inter.rank_in_user()
  first = rank == 0
  u, t, r = inter.user[first], inter.ts[first], inter.ref[first]
  return u[np.lexsort((u, r, t))]


def _percentiles(lengths: Sequence[int]) -> dict[str, float]:
  if len(lengths) == 0:
    return {}
  a = np.asarray(lengths)
  return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
          "p99": float(np.percentile(a, 99)), "max": int(a.max()),
          "mean": float(a.mean())}


@dataclasses.dataclass
class Source:
  """What a raw source hands to `build_splits`."""
  inter: Interactions  # after the source's own filters and the first k-core
  user_keys: list[str]  # original user id per integer user id
  item_keys: list[str]  # original item id per integer item id
  item_text: Callable[[Iterable[int]], dict[int, str]]  # item ids -> item text
  history_blocks: Callable[[Interactions, np.ndarray], list[str]]  # rows -> block texts


@dataclasses.dataclass
class Prepared:
  """Final splits, ready to tokenize-pad and write."""
  users: dict[str, dict[str, Any]]  # split -> columns
  items: dict[str, Any]
  stats: dict[str, Any]


class _PromptCache:
  """Prompt text and encoder ids per history (tuple of refs), built in batches."""

  def __init__(self, source: Source, instruction: str, enc_tok, desc: str,
               ending: str = "trimmed"):
    self.source = source
    self.ending = ending
    self.instruction = instruction
    self.enc_tok = enc_tok
    self.text: dict[tuple[int, ...], str] = {}
    self.ids: dict[tuple[int, ...], np.ndarray] = {}
    self.desc = desc
    self.seconds = 0.0  # time spent in the tokenizer

  def lengths(self, inter: Interactions, history_len: int) -> dict[int, int]:
    """Encoder token count of each user's prompt (first `history_len` interactions)."""
    hist = inter.take(inter.rank_in_user() < history_len)
    bounds = np.flatnonzero(np.r_[True, hist.user[1:] != hist.user[:-1], True])
    keys = {}
    missing_rows = []
    for a, b in zip(bounds[:-1], bounds[1:]):
      key = tuple(int(r) for r in hist.ref[a:b])
      keys[int(hist.user[a])] = key
      if key not in self.ids:
        missing_rows.append((key, a, b))
    if missing_rows:
      rows = np.concatenate([np.arange(a, b) for _, a, b in missing_rows])
      blocks = self.source.history_blocks(hist, rows)
      texts, pos = [], 0
      for key, a, b in tqdm.tqdm(missing_rows, desc=f"{self.desc}: prompts", unit="user",
                                 disable=None, leave=False):
        content = prompts_lib.prompt_content(self.instruction, blocks[pos:pos + b - a])
        pos += b - a
        texts.append(prompts_lib.wrap_chat(self.enc_tok, content, self.ending))
      # The chat template already carries BOS where the model wants one.
      start = time.perf_counter()
      ids = tok_lib.batch_encode(self.enc_tok, texts, add_special_tokens=False)
      self.seconds += time.perf_counter() - start
      for (key, _, _), text, seq in zip(missing_rows, texts, ids):
        self.text[key] = text
        self.ids[key] = np.asarray(seq, np.int32)  # a quarter of a list's memory
    self._last_keys = keys
    return {u: len(self.ids[k]) for u, k in keys.items()}

  def key_of(self, user: int) -> tuple[int, ...]:
    return self._last_keys[user]


def build_splits(source: Source, cfg: DataSettings, enc_tok, dec_tok, log: FilterLog,
                 seed: int) -> Prepared:
  """docs/method.md §2 steps 3-6 on a source's interaction table (`cfg`: the data section)."""
  history_len, dec_max, prompt_max = cfg.history_len, cfg.decoder_max_len, cfg.prompt_max_len
  k, test_fraction, min_test = cfg.k_core, cfg.test_fraction, cfg.min_test_interactions
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"data.test_fraction={test_fraction} must be in (0, 1)")
  if history_len < 1:
    raise ValueError(f"data.history_len={history_len} must be >= 1")
  inter = source.inter

  # Step 3: item texts and the decoder length filter.
  items_now = np.unique(inter.item)
  item_text = source.item_text(items_now.tolist())
  item_ids_list = items_now.tolist()
  start = time.perf_counter()
  dec_ids = {i: np.asarray(seq, np.int32) for i, seq in zip(item_ids_list, tok_lib.batch_encode(
      dec_tok, [item_text[i] for i in item_ids_list], add_special_tokens=True))}
  item_tokenize_seconds = time.perf_counter() - start
  long_items = np.array([i for i in item_ids_list if len(dec_ids[i]) > dec_max], np.int64)
  bad_users = np.unique(inter.user[np.isin(inter.item, long_items)])
  instruction = prompts_lib.resolve_instruction(cfg)
  cache = _PromptCache(source, instruction, enc_tok, "prompt filter",
                       ending=cfg.prompt_ending)
  filter_order = cfg.filter_order
  if filter_order == "authors":
    # Steps 3-4 as the authors do them: both length filters on the post-k-core table,
    # their users removed together, then one k-core.
    lengths = cache.lengths(inter, history_len)
    long_users = np.array([u for u, n in lengths.items() if n > prompt_max], np.int64)
    before = inter.counts()
    inter = inter.take(~np.isin(inter.user, np.union1d(bad_users, long_users)))
    log.record(f"item text > {dec_max} decoder tokens or prompt > {prompt_max} encoder tokens",
               before, inter.counts(), "raise data.decoder_max_len or data.prompt_max_len",
               long_items=int(len(long_items)), long_item_users=int(len(bad_users)),
               long_prompt_users=int(len(long_users)))
    inter = apply_kcore(inter, k, log, "k-core after length filters")
  elif filter_order == "iterative":
    before = inter.counts()
    inter = inter.take(~np.isin(inter.user, bad_users))
    log.record(f"item text > {dec_max} decoder tokens", before, inter.counts(),
               "raise data.decoder_max_len", long_items=int(len(long_items)))
    inter = apply_kcore(inter, k, log, "k-core after item length")
    # Prompt length filter, then k-core, until neither removes anything.
    for _ in range(20):
      lengths = cache.lengths(inter, history_len)
      long_users = np.array([u for u, n in lengths.items() if n > prompt_max], np.int64)
      if len(long_users) == 0:
        break
      before = inter.counts()
      inter = inter.take(~np.isin(inter.user, long_users))
      log.record(f"prompt > {prompt_max} encoder tokens", before, inter.counts(),
                 "raise data.prompt_max_len or lower data.history_len")
      inter = apply_kcore(inter, k, log, "k-core after prompt length")
  else:
    raise ValueError(f"data.filter_order={filter_order!r}: expected authors or iterative")
  all_items = np.unique(inter.item)

  # Step 5: users split by order of first interaction.
  order = users_by_first_interaction(inter)
  n_train = int(math.floor(len(order) * (1.0 - test_fraction) + 1e-9))
  train_users, held_users = order[:n_train], order[n_train:]
  if len(train_users) == 0 or len(held_users) == 0:
    raise DataError(f"user split ({test_fraction}) of {len(order)} users leaves an empty "
                    f"part ({len(train_users)} train, {len(held_users)} held out); "
                    "change data.test_fraction or provide more users")
  in_train = np.isin(inter.user, train_users)
  train_items = np.unique(inter.item[in_train])
  catalogue_kind = cfg.catalogue
  if catalogue_kind not in ("train_items", "all_items"):
    raise ValueError(f"data.catalogue={catalogue_kind!r}: expected train_items or all_items")
  # The authors re-index items to those of training interactions: nothing else is ranked.
  catalogue = train_items if catalogue_kind == "train_items" else all_items
  before = inter.take(~in_train).counts()
  held = inter.take(~in_train & np.isin(inter.item, train_items))
  log.record("held-out interactions on items unseen in training", before, held.counts(),
             "raise data.k_core or lower data.test_fraction")
  hc = np.bincount(held.user, minlength=int(inter.user.max()) + 1)
  before = held.counts()
  held = held.take(hc[held.user] >= min_test)
  log.record(f"held-out users < {min_test} interactions", before, held.counts(),
             "lower data.min_test_interactions")
  train = inter.take(in_train)

  # Step 6: history = first history_len interactions; target = first later new item.
  def targets(part: Interactions, name: str) -> tuple[Interactions, dict[int, int]]:
    bounds = np.flatnonzero(np.r_[True, part.user[1:] != part.user[:-1], True])
    tgt = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
      hist = set(part.item[a:min(b, a + history_len)].tolist())
      for j in range(a + history_len, b):
        if int(part.item[j]) not in hist:
          tgt[int(part.user[a])] = int(part.item[j])
          break
    before = part.counts()
    out = part.take(np.isin(part.user, np.fromiter(tgt, np.int64, len(tgt))))
    log.record(f"{name} users without a target", before, out.counts(),
               "lower data.history_len")
    return out, tgt

  train, train_tgt = targets(train, "train")
  held, held_tgt = targets(held, "held-out")
  held_sorted = [u for u in order if u in held_tgt]
  perm = np.random.default_rng(seed).permutation(len(held_sorted))
  half = len(held_sorted) // 2
  val_set = {held_sorted[i] for i in perm[:half]}
  if half == 0 or len(held_sorted) - half == 0:
    raise DataError(f"val/test halving of {len(held_sorted)} held-out users leaves an empty "
                    "split; provide more users or lower data.min_test_interactions")

  # Final prompts (a held-out user's history may have changed).
  cache.desc = "final prompts"
  item_order = np.sort(catalogue)  # original ids follow first appearance in the source
  item_index = {int(i): n for n, i in enumerate(item_order)}
  finals: dict[str, tuple[Interactions, dict[int, int], dict[int, tuple[int, ...]]]] = {}
  for name, part, tgt, keep in (
      ("train", train, train_tgt, None),
      ("val", held, held_tgt, lambda u: u in val_set),
      ("test", held, held_tgt, lambda u: u not in val_set)):
    if keep is not None:
      part = part.take(np.array([keep(int(u)) for u in part.user], bool))
    lengths = cache.lengths(part, history_len)
    too_long = np.array([u for u, n in lengths.items() if n > prompt_max], np.int64)
    before = part.counts()
    part = part.take(~np.isin(part.user, too_long))
    log.record(f"{name} final prompt > {prompt_max} encoder tokens", before, part.counts(),
               "raise data.prompt_max_len")
    keys = {int(u): cache.key_of(int(u)) for u in np.unique(part.user)}
    finals[name] = (part, tgt, keys)

  # Dense user indices over the final users, in order of first interaction.
  final_users = set()
  for part, _, _ in finals.values():
    final_users.update(np.unique(part.user).tolist())
  user_index = {int(u): n for n, u in enumerate(u for u in order.tolist() if u in final_users)}
  splits: dict[str, dict[str, Any]] = {}
  prompt_lengths = []
  for name, (part, tgt, keys) in finals.items():
    hist = part.take(part.rank_in_user() < history_len)
    users = sorted(keys, key=lambda u: user_index[u])
    history = np.full((len(users), history_len), -1, np.int32)
    rows = {u: n for n, u in enumerate(users)}
    pos = np.zeros(len(users), np.int64)
    for u, i in zip(hist.user.tolist(), hist.item.tolist()):
      r = rows[u]
      history[r, pos[r]] = item_index[i]
      pos[r] += 1
    prompt_lengths.extend(len(cache.ids[keys[u]]) for u in users)
    splits[name] = {
        "user": np.array([user_index[u] for u in users], np.int32),
        "user_key": [source.user_keys[u] for u in users],
        "history": history,
        "history_mask": (history >= 0).astype(np.int32),
        "target": np.array([item_index[tgt[u]] for u in users], np.int32),
        "prompt": [cache.text[keys[u]] for u in users],
        "prompt_ids": [cache.ids[keys[u]] for u in users],
        "num_interactions": int(len(part)),
    }
  items = {
      "item": np.arange(len(item_order), dtype=np.int32),
      "item_key": [source.item_keys[i] for i in item_order.tolist()],
      "text": [item_text[i] for i in item_order.tolist()],
      "decoder_ids": [dec_ids[i] for i in item_order.tolist()],
  }
  stats = {
      "splits": {
          **{name: {"users": int(len(s["user"])), "interactions": s["num_interactions"],
                    "items": int(len(np.unique(np.concatenate(
                        [s["history"][s["history"] >= 0], s["target"]]))))}
             for name, s in splits.items()},
          "items": {"items": int(len(item_order))},
      },
      "users_before_split": {"train": int(len(train_users)), "held_out": int(len(held_users))},
      "seconds": {"tokenize_items": item_tokenize_seconds, "tokenize_prompts": cache.seconds},
      "length_percentiles": {
          "decoder_tokens_per_item": _percentiles([len(x) for x in items["decoder_ids"]]),
          "encoder_tokens_per_prompt": _percentiles(prompt_lengths),
      },
  }
  return Prepared(users=splits, items=items, stats=stats)
