"""The user split of the data pipeline on a hand-made source: empty splits are clear errors."""

import dataclasses

import numpy as np
import planted
import pytest

from configs import base
from langptune_jax import settings as settings_lib
from langptune_jax.data import core

# Every user reads items 0, 1, 2, 3 in this order: history (0, 1), target 2.
ITEMS_PER_USER = 4
CFG = dict(history_len=2, decoder_max_len=16, prompt_max_len=256, k_core=1,
           test_fraction=0.2, min_test_interactions=1, domain="movielens")


def word_tokenizer():
  tok = planted.word_tokenizer()
  tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
  return tok


def source(num_users: int) -> core.Source:
  user = np.repeat(np.arange(num_users), ITEMS_PER_USER)
  item = np.tile(np.arange(ITEMS_PER_USER), num_users)
  inter = core.Interactions.from_unsorted(user, item, ts=np.arange(len(user)),
                                          ref=np.arange(len(user)),
                                          rating=np.ones(len(user)))
  texts = {i: f"{planted.GENRES[i]} film" for i in range(ITEMS_PER_USER)}
  return core.Source(
      inter=inter, user_keys=[f"u{u}" for u in range(num_users)],
      item_keys=[f"i{i}" for i in range(ITEMS_PER_USER)],
      item_text=lambda ids: {i: texts[i] for i in ids},
      history_blocks=lambda hist, rows: [texts[int(hist.item[r])] for r in rows])


def build(num_users: int, **cfg):
  tok = word_tokenizer()
  data = settings_lib.from_config(base.get_config()).data
  return core.build_splits(source(num_users), dataclasses.replace(data, **dict(CFG, **cfg)),
                           tok, tok, core.FilterLog(), seed=0)


def test_enough_users_give_three_non_empty_splits():
  prepared = build(10)
  sizes = {name: len(split["user"]) for name, split in prepared.users.items()}
  assert sizes == {"train": 8, "val": 1, "test": 1}


def test_a_user_split_without_train_users_is_one_clear_error():
  with pytest.raises(core.DataError, match=r"user split \(0\.2\) of 1 users leaves an empty part "
                                           r"\(0 train, 1 held out\)"):
    build(1)


def test_a_user_split_without_held_out_users_is_one_clear_error():
  with pytest.raises(core.DataError, match=r"leaves an empty part \(3 train, 0 held out\)"):
    build(3, test_fraction=1e-10)


def test_val_test_halving_of_one_held_out_user_is_one_clear_error():
  with pytest.raises(core.DataError, match="val/test halving of 1 held-out users leaves an empty "
                                           "split"):
    build(5)
