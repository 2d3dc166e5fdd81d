"""MovieLens-100K on the real recbole files, checked against an independent recount."""

import collections
import math

import fixtures_data as fx
import numpy as np
import pytest

from langptune_jax.data import core, loader, prepare


def _raw(ml100k_dir):
  rows = []
  with open(ml100k_dir / "ml-100k.inter") as f:
    next(f)
    for n, line in enumerate(f, start=2):
      u, i, r, t = line.rstrip("\n").split("\t")
      rows.append((u, i, float(r), int(float(t)), n))
  return rows


def _kcore(rows, k):
  while True:
    uc = collections.Counter(r[0] for r in rows)
    ic = collections.Counter(r[1] for r in rows)
    kept = [r for r in rows if uc[r[0]] >= k and ic[r[1]] >= k]
    if len(kept) == len(rows):
      return rows
    rows = kept


@pytest.fixture(scope="module")
def built(tmp_path_factory, ml100k_dir, smollm2_gguf, minilm_dir):
  folder = tmp_path_factory.mktemp("ml")
  config = fx.make_config(smollm2_gguf, minilm_dir, folder / "dataset", source="movielens",
                          domain="movielens", movielens_dir=str(ml100k_dir),
                          **fx.ALTERNATIVE_PROTOCOL)
  path, stats = prepare.prepare(config)
  return path, stats


@pytest.mark.slow
def test_counts_match_independent_recount(built, ml100k_dir):
  path, stats = built
  rows = _kcore(_raw(ml100k_dir), 5)
  users = {r[0] for r in rows}
  items = {r[1] for r in rows}
  assert stats["filters"][0]["users_after"] == len(users) == 943
  assert stats["filters"][0]["items_after"] == len(items)
  assert stats["splits"]["items"]["items"] == len(items)
  n_train = math.floor(len(users) * 0.8)
  assert stats["users_before_split"] == {"train": n_train, "held_out": len(users) - n_train}
  val, test = stats["splits"]["val"]["users"], stats["splits"]["test"]["users"]
  assert val == (val + test) // 2 and val + test <= len(users) - n_train


@pytest.mark.slow
def test_history_target_and_item_text(built, ml100k_dir):
  path, _ = built
  items = loader.load_split(path, "items")
  toy = items["item_key"].index("1")
  assert items["text"][toy] == "Title: Toy Story\nRelease year: 1995\nGenres: Animation, Children's, Comedy"
  rows = _kcore(_raw(ml100k_dir), 5)
  by_user = collections.defaultdict(list)
  for u, i, r, t, n in rows:
    by_user[u].append((t, n, i, r))
  train = loader.load_split(path, "train")
  for row in (0, 1, len(train["user"]) - 1):
    ordered = [x[2] for x in sorted(by_user[train["user_key"][row]])]
    history = ordered[:4]
    target = next(i for i in ordered[4:] if i not in history)
    assert [items["item_key"][j] for j in train["history"][row]] == history
    assert items["item_key"][train["target"][row]] == target
  prompt = train["prompt"][0]
  assert "The user has rated (out of 5.0) following movies" in prompt
  assert "\nRating from the user: " in prompt
  assert prompt.endswith("<|im_start|>assistant\n")
  assert np.all(train["prompt_mask"].sum(1) < 1024)


def test_missing_movielens_dir(tmp_path, smollm2_gguf, minilm_dir):
  config = fx.make_config(smollm2_gguf, minilm_dir, tmp_path / "d", source="movielens",
                          movielens_dir=str(tmp_path / "nowhere"))
  with pytest.raises(core.DataError, match="data.movielens_dir not found"):
    prepare.prepare(config)


def test_bad_movielens_lines_are_counted(tmp_path, ml100k_dir, smollm2_gguf, minilm_dir):
  folder = tmp_path / "ml"
  folder.mkdir()
  (folder / "ml-100k.item").write_bytes((ml100k_dir / "ml-100k.item").read_bytes())
  lines = (ml100k_dir / "ml-100k.inter").read_bytes().splitlines(keepends=True)[:3001]
  lines += [b"1\t99999\t3\t881250949\n", b"1\t2\tx\t881250949\n", b"broken\n",
            lines[1]]  # unknown item, bad rating, wrong columns, duplicate
  (folder / "ml-100k.inter").write_bytes(b"".join(lines))
  config = fx.make_config(smollm2_gguf, minilm_dir, tmp_path / "d", source="movielens",
                          movielens_dir=str(folder), k_core=2, min_test_interactions=2,
                          keep_duplicate_reviews=False)
  _, stats = prepare.prepare(config)
  assert {k: v["count"] for k, v in stats["skipped"].items()} == {
      "unknown item": 1, "unparsable rating/timestamp": 1, "wrong number of columns": 1,
      "duplicate (user, item)": 1}
  assert stats["skipped"]["duplicate (user, item)"]["first"] == ["ml-100k.inter:3005"]
