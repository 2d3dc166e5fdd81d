"""Grain loaders over a prepared dataset: shapes, sharding coverage, iterator state."""

import fixtures_data as fx
import numpy as np
import pytest

from langptune_jax.data import core, loader, prepare


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, smollm2_gguf, minilm_dir):
  folder = tmp_path_factory.mktemp("loader")
  path, _ = prepare.prepare(fx.amazon_config(folder, smollm2_gguf, minilm_dir))
  return path


def test_train_batches_shapes_and_dtypes(dataset):
  it = loader.train_iterator(dataset, "train", 4, seed=0, process_index=0, process_count=1)
  batch = next(it)
  assert set(batch) == {"user", "history", "history_mask", "target", "prompt_tokens",
                        "prompt_mask"}
  assert batch["prompt_tokens"].shape == (4, 512) and batch["prompt_tokens"].dtype == np.int32
  assert batch["history"].shape == (4, 3) and batch["target"].shape == (4,)
  items = next(loader.train_iterator(dataset, "items", 3, seed=0, process_index=0,
                                     process_count=1))
  assert items["decoder_tokens"].shape == (3, 64) and items["decoder_mask"].dtype == np.int32
  with_text = next(loader.train_iterator(dataset, "train", 2, seed=0, process_index=0,
                                         process_count=1, keep_text=True))
  assert len(with_text["prompt"]) == 2


def test_train_epochs_are_seeded_permutations_without_remainder(dataset):
  # 14 train users, batch 4: 3 full batches per epoch, the remainder dropped.
  it = loader.train_iterator(dataset, "train", 4, seed=3, num_epochs=2, process_index=0,
                             process_count=1)
  batches = [b["user"] for b in it]
  assert all(b.shape == (4,) for b in batches)
  users = np.concatenate(batches)
  assert len(users) == 28 // 4 * 4
  first_epoch = users[:12]
  assert len(set(first_epoch.tolist())) == 12  # no repeats inside an epoch
  again = np.concatenate([b["user"] for b in loader.train_iterator(
      dataset, "train", 4, seed=3, num_epochs=2, process_index=0, process_count=1)])
  np.testing.assert_array_equal(users, again)
  other = np.concatenate([b["user"] for b in loader.train_iterator(
      dataset, "train", 4, seed=4, num_epochs=2, process_index=0, process_count=1)])
  assert not np.array_equal(users, other)


def test_train_shards_are_disjoint_and_complete(dataset):
  seen = []
  for index in range(2):
    it = loader.train_iterator(dataset, "train", 7, seed=0, num_epochs=1, process_index=index,
                               process_count=2)
    seen.append(set(np.concatenate([b["user"] for b in it]).tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(14))


def test_eval_pass_covers_each_row_once_across_processes(dataset):
  collected = []
  for split, n in (("train", 14), ("items", 9)):
    key = "user" if split == "train" else "item"
    rows, counts = [], []
    for index in range(2):
      batches = list(loader.eval_iterator(dataset, split, 4, process_index=index,
                                          process_count=2))
      counts.append(len(batches))
      for b in batches:
        assert b[key].shape == (4,)
        rows.extend(b[key][b["valid"] == 1].tolist())
    assert counts[0] == counts[1]  # same number of batches on every process
    assert sorted(rows) == list(range(n))
    collected.append(rows)
  # 14 users on 2 processes: 7 each -> two batches of 4, the last with one padding row.
  last = list(loader.eval_iterator(dataset, "train", 4, process_index=0, process_count=2))[-1]
  assert last["valid"].tolist() == [1, 1, 1, 0]


def test_iterator_state_round_trip(dataset):
  it = loader.train_iterator(dataset, "train", 4, seed=1, process_index=0, process_count=1)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it)["user"] for _ in range(4)]
  fresh = loader.train_iterator(dataset, "train", 4, seed=1, process_index=0, process_count=1)
  fresh.set_state(state)
  got = [next(fresh)["user"] for _ in range(4)]
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a, b)


def test_load_split_in_memory(dataset):
  items = loader.load_split(dataset, "items", columns=["item", "decoder_tokens", "text"])
  assert items["item"].tolist() == list(range(9))
  assert items["decoder_tokens"].shape == (9, 64) and isinstance(items["text"][0], str)
  stats = loader.load_stats(dataset)
  assert stats["format"]["num_items"] == 9 and stats["format"]["prompt_max_len"] == 512
  with pytest.raises(ValueError, match="unknown split"):
    loader.load_split(dataset, "nope")


def test_missing_dataset_and_too_small_shard(dataset, tmp_path):
  with pytest.raises(core.DataError, match="no prepared dataset"):
    loader.load_split(tmp_path, "train")
  with pytest.raises(core.DataError, match="fewer than one batch"):
    loader.train_iterator(dataset, "val", 8, seed=0, process_index=0, process_count=1)
