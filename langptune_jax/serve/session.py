"""One loaded run, answering one user at a time: write a profile, rank the catalogue with it.

A :class:`Session` holds the profile writer (trained, with its LoRA adapters,
and its zero-shot twin), the ranking decoder, the dataset and the catalogue
index. Every jitted call has one fixed shape (a prompt is one row of
``data.prompt_max_len``, a profile one row of ``data.decoder_max_len``), so
after the warm-up no request compiles anything. The models are gathered onto
one device: a single user's request is far too small to split over a mesh.
Profile writing goes through one lock (one generation at a time; a streamed
profile holds it for one piece at a time); ranking is lock-free.
"""

from __future__ import annotations

import dataclasses
import pathlib
import threading
from typing import Iterator

import jax
import numpy as np

from langptune_jax import sampling as sampling_lib
from langptune_jax import settings as settings_lib
from langptune_jax.data import prompts as prompts_lib
from langptune_jax.models import embedder as embedder_lib
from langptune_jax.serve import index as index_lib
from langptune_jax.serve.ranker import Ranker, on_one_device
from langptune_jax.train import profiles as profiles_lib
from langptune_jax.train.run_data import RunData
from langptune_jax.weights import tokenizer as tok_lib

# Tokens per streamed piece of a profile: a few words at a time, one compiled step each.
STREAM_TOKENS = 4


class UnknownError(ValueError):
  """A user id or item the dataset does not have (HTTP 404; exit 2 like every bad input)."""


def item_title(text: str) -> str:
  """The title line of an item text ("Title: X" -> X), else its first line."""
  first = text.strip().splitlines()[0] if text.strip() else ""
  return first[len("Title:"):].strip() if first.startswith("Title:") else first


@dataclasses.dataclass(frozen=True)
class Prompt:
  """The profile writer's input for one user, with what ranking must know about them."""

  tokens: np.ndarray  # int32 [1, P], left-padded
  mask: np.ndarray  # bool [1, P]
  history: tuple[int, ...]  # item ids, excluded from rankings
  target: int | None  # the held-out item, for dataset users
  user: int | None = None


class Session:
  """A loaded run: profile writing and ranking for single users."""

  def __init__(self, config, *, writer, zero_shot_writer, ranker: embedder_lib.Embedder,
               writer_tokenizer, ranker_tokenizer, data: RunData, index_dir: pathlib.Path,
               sampling: profiles_lib.SamplingSettings, warm_up: bool = True,
               stream_tokens: int = STREAM_TOKENS):
    self.settings = settings = settings_lib.of(config)
    self.writer, self.zero_shot_writer = on_one_device(writer), on_one_device(zero_shot_writer)
    self.writer_tokenizer, self.ranker_tokenizer = writer_tokenizer, ranker_tokenizer
    self.data = data
    self.sampling = sampling
    self.stream_tokens = int(stream_tokens)
    self.prompt_len = settings.data.prompt_max_len
    self.profile_len = settings.data.decoder_max_len
    self.top_k = settings.serve.top_k
    self._lock = threading.Lock()
    self.ranker = Ranker(ranker, ranker_tokenizer, self.profile_len)
    self.titles = [item_title(t) for t in data.item_text]
    self._by_title: dict[str, int] = {}
    for i, title in enumerate(self.titles):
      self._by_title.setdefault(title.casefold(), i)
    self._users = {int(u): (name, row) for name in ("train", "val", "test")
                   for row, u in enumerate(data.split(name).user)}
    digest = index_lib.fingerprint(self.ranker.state, data.item_text, self.profile_len)
    self.item_embeddings, self.index_rebuilt = index_lib.load_or_build(
        index_dir / index_lib.INDEX_DIR, digest, self.ranker.embed_rows, data.item_tokens,
        data.item_mask, settings.decoder.embed_batch_size)
    if warm_up:
      self.warm_up()

  # --- users and items ---------------------------------------------------------

  def user_ids(self) -> list[int]:
    return sorted(self._users)

  def dataset_prompt(self, user: int) -> Prompt:
    if user not in self._users:
      raise UnknownError(f"unknown user id {user} (the dataset has ids {min(self._users)}.."
                         f"{max(self._users)})")
    name, row = self._users[user]
    split = self.data.split(name)
    history = tuple(int(i) for i in split.history[row] if i >= 0)
    return Prompt(split.prompt_tokens[row:row + 1], split.prompt_mask[row:row + 1].astype(bool),
                  history, int(split.target[row]), user)

  def resolve_items(self, lines: list[str]) -> list[int]:
    """History lines (item ids or titles, blank lines skipped) -> item ids."""
    items = []
    for number, line in enumerate(lines, 1):
      text = line.strip()
      if not text:
        continue
      if text.isdigit() and int(text) < len(self.titles):
        items.append(int(text))
      elif text.casefold() in self._by_title:
        items.append(self._by_title[text.casefold()])
      else:
        raise UnknownError(f"history line {number}: unknown item {text!r} (not an item id "
                           f"0..{len(self.titles) - 1} nor a catalogue title)")
    if not items:
      raise ValueError("history is empty: give at least one item id or title")
    return items

  def history_prompt(self, items: list[int]) -> Prompt:
    """The training prompt for a typed history (item texts, no ratings)."""
    content = prompts_lib.prompt_content(prompts_lib.resolve_instruction(self.settings.data),
                                         [self.data.item_text[i] for i in items])
    text = prompts_lib.wrap_chat(self.writer_tokenizer, content)
    ids = tok_lib.batch_encode(self.writer_tokenizer, [text], add_special_tokens=False)[0]
    if len(ids) > self.prompt_len:
      raise ValueError(f"history of {len(items)} items is {len(ids)} prompt tokens; the profile "
                       f"writer reads at most data.prompt_max_len={self.prompt_len}")
    pad = self.sampling.pad_id
    tokens, mask = tok_lib.pad_batch([ids], self.prompt_len, pad, left=True)
    return Prompt(tokens, mask.astype(bool), tuple(items), None)

  # --- profiles ----------------------------------------------------------------

  def _settings(self, temperature: float | None) -> tuple[profiles_lib.SamplingSettings, bool]:
    """(sampling settings, greedy) for a requested temperature (0: greedy; None: rl.temperature)."""
    temperature = self.sampling.temperature if temperature is None else float(temperature)
    if temperature < 0 or not np.isfinite(temperature):
      raise ValueError(f"temperature={temperature}: must be >= 0 (0: greedy)")
    return dataclasses.replace(self.sampling, temperature=temperature or 1.0), temperature == 0

  def write_profile(self, prompt: Prompt, *, seed: int = 0, temperature: float | None = None,
                    zero_shot: bool = False) -> str:
    """One profile, written as training and evaluation write them."""
    settings, greedy = self._settings(temperature)
    model = self.zero_shot_writer if zero_shot else self.writer
    with self._lock:
      out = profiles_lib.write_profiles(
          model, prompt.tokens, prompt.mask, settings=settings,
          writer_tokenizer=self.writer_tokenizer, ranker_tokenizer=self.ranker_tokenizer,
          decoder_max_len=self.profile_len, batch_size=1, rng=jax.random.key(int(seed)),
          greedy=greedy, desc="writing a profile")
    return out.texts[0]

  def stream_profile(self, prompt: Prompt, *, seed: int = 0, temperature: float | None = None,
                     zero_shot: bool = False) -> Iterator[str]:
    """The profile as it is written: its text so far every `stream_tokens` tokens.

    The last text is the one :meth:`write_profile` returns for the same
    arguments (same key, same steps). Bad arguments raise here, before the
    first text; the lock is held for one piece at a time, so a slow reader
    never stalls other requests.
    """
    settings, greedy = self._settings(temperature)
    model = self.zero_shot_writer if zero_shot else self.writer
    # write_profiles draws batch i with fold_in(key, i); a single user is batch 0.
    rng = jax.random.fold_in(jax.random.key(int(seed)), 0)
    pieces = sampling_lib.sample_stream(
        model, prompt.tokens, prompt.mask, rng=rng, max_new_tokens=settings.max_new_tokens,
        chunk_tokens=self.stream_tokens, temperature=settings.temperature, top_k=settings.top_k,
        top_p=settings.top_p, eos_ids=settings.eos_ids, pad_id=settings.pad_id, greedy=greedy,
        cache_size=settings.cache_size)
    eos = set(settings.eos_ids)

    def texts():
      tokens: list[int] = []
      while True:
        with self._lock:
          piece = next(pieces, None)
        if piece is None:
          return
        tokens.extend(int(t) for t in piece[0])
        end = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
        row = np.asarray([tokens[:end]], np.int32)
        yield profiles_lib.decode_responses(self.writer_tokenizer, row,
                                            np.ones_like(row, bool))[0]

    return texts()

  # --- ranking -----------------------------------------------------------------

  def check_profile(self, text) -> str:
    return self.ranker.check_profile(text)

  def rank(self, text: str, *, exclude=(), target: int | None = None, k: int | None = None,
           previous=None) -> list[dict]:
    """Top-k items for a profile text: rank, item, score, title, is_target, move.

    `move` is how many places an item rose (+) or fell (-) against `previous`
    (a ranked list of item ids), None when it was not in that list.
    """
    k = self.top_k if k is None else int(k)
    top, scores = self.ranker.top_k(text, self.item_embeddings, k, exclude)
    before = {int(item): r for r, item in enumerate(previous or (), 1)}
    return [{"rank": r, "item": int(i), "score": round(float(score), 6),
             "title": self.titles[i], "is_target": None if target is None else int(i) == target,
             "move": before[int(i)] - r if int(i) in before else None}
            for r, (i, score) in enumerate(zip(top, scores), 1)]

  def warm_up(self) -> None:
    """Compiles every shape a request uses, so requests never compile."""
    self.ranker.warm_up()
    self.rank("warm up")
    if self._users:
      prompt = self.dataset_prompt(self.user_ids()[0])
      for temperature in (0.0, 1.0):
        self.write_profile(prompt, temperature=temperature)
        for _ in self.stream_profile(prompt, temperature=temperature):
          pass
