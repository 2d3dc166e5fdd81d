"""The in-memory view of a prepared dataset that the training loop works on.

The loop needs whole splits at once (profiles are regenerated for every train
and validation user in each CL phase, and the catalogue is re-embedded in each
RL phase), so it holds them as numpy arrays; batches are drawn from them by
index with seeded permutations, which makes the data position part of the loop
position and resumption exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class UserSplit:
  user: np.ndarray  # int32 [U]
  prompt_tokens: np.ndarray  # int32 [U, P], left-padded
  prompt_mask: np.ndarray  # bool [U, P]
  history: np.ndarray  # int32 [U, H], -1 = padding
  target: np.ndarray  # int32 [U]
  prompt_text: list[str] = dataclasses.field(default_factory=list)

  def __len__(self) -> int:
    return int(self.user.shape[0])

  def take(self, index) -> "UserSplit":
    index = np.asarray(index)
    texts = [self.prompt_text[i] for i in index] if self.prompt_text else []
    return UserSplit(self.user[index], self.prompt_tokens[index], self.prompt_mask[index],
                     self.history[index], self.target[index], texts)

  def head(self, n: int) -> "UserSplit":
    return self if n <= 0 or n >= len(self) else self.take(np.arange(n))

  def last_history_item(self) -> np.ndarray:
    """The most recent history item of each user (the reference-query baseline).

    -1 for a user whose history is all padding; the padding may sit on either side.
    """
    valid = self.history >= 0
    width = self.history.shape[1]
    last = width - 1 - np.argmax(valid[:, ::-1], axis=1)
    items = self.history[np.arange(len(self)), last]
    return np.where(valid.any(axis=1), items, -1).astype(self.history.dtype)


@dataclasses.dataclass
class RunData:
  train: UserSplit
  val: UserSplit
  test: UserSplit
  item_tokens: np.ndarray  # int32 [N, L], right-padded decoder tokens
  item_mask: np.ndarray  # [N, L]
  item_text: list[str]

  @property
  def num_items(self) -> int:
    return int(self.item_tokens.shape[0])

  def split(self, name: str) -> UserSplit:
    if name not in ("train", "val", "test"):
      raise ValueError(f"eval.split={name!r}: expected train, val or test")
    return getattr(self, name)

  def train_item_counts(self) -> np.ndarray:
    """Interactions per item in the training users' histories and targets (popularity)."""
    counts = np.zeros(self.num_items, np.int64)
    hist = self.train.history[self.train.history >= 0]
    np.add.at(counts, hist, 1)
    np.add.at(counts, self.train.target, 1)
    return counts
