"""The interpretability check: candidates, accuracy against chance, and a judge LLM that reads."""

import json

import numpy as np
import pytest

from langptune_jax.serve import judge

GENRE_ITEMS = {
    "horror": ["Night of the Living Dead: a horror film about zombies",
               "The Haunting: a horror movie in a ghost house"],
    "western": ["Rio Bravo: a western with cowboys and a sheriff",
                "Stagecoach: a western across the desert with outlaws"],
    "cartoon": ["Toy Story: an animated cartoon for children",
                "The Lion King: an animated cartoon for kids"],
    "romance": ["Sleepless in Seattle: a romance about two lovers",
                "Notting Hill: a romantic love story"],
    "war": ["Saving Private Ryan: a war film about soldiers",
            "Platoon: a war movie about soldiers in battle"],
    "science fiction": ["Alien: science fiction in outer space",
                        "Star Wars: science fiction with spaceships in space"],
}


def test_wilson_interval_contains_the_rate_and_stays_in_range():
  low, high = judge.wilson_interval(8, 10)
  assert 0.0 < low < 0.8 < high < 1.0
  assert judge.wilson_interval(0, 10)[0] == 0.0 and judge.wilson_interval(10, 10)[1] == 1.0
  narrow = judge.wilson_interval(80, 100)
  assert narrow[1] - narrow[0] < high - low


def test_candidates_hold_the_target_once_and_never_the_history():
  rng = np.random.default_rng(0)
  for _ in range(50):
    items, pos = judge.candidates(3, [0, 1, 2], 10, 4, rng)
    assert len(items) == len(set(items)) == 4 and items[pos] == 3
    assert not {0, 1, 2} & set(items)
  with pytest.raises(ValueError, match="judge.num_candidates=9"):
    judge.candidates(0, [1, 2], 5, 9, rng)


def test_accuracy_of_a_reader_and_of_a_blind_chooser():
  rng = np.random.default_rng(1)
  texts = [f"{g} {i}" for g in ("horror", "comedy") for i in range(20)]
  cases = [judge.candidates(t, [], len(texts), 4, rng) for t in rng.integers(0, 40, 200)]
  profiles = [texts[items[pos]].split()[0] + " fan" for items, pos in cases]

  def reader(profile, cands):  # picks a candidate of the profile's genre
    genre = profile.split()[0]
    return next(i for i, c in enumerate(cands) if c.startswith(genre))

  read = judge.accuracy(reader, profiles, cases, texts)
  blind = judge.accuracy(lambda p, c: 0, profiles, cases, texts)
  assert read["chance"] == blind["chance"] == 0.25 and read["total"] == 200
  assert read["interval95"][0] > 0.25 + 0.1  # genre halves the field: ~0.5+
  assert blind["interval95"][0] < 0.25 < blind["interval95"][1]


def _genre_cases(rng, n=4):
  genres = list(GENRE_ITEMS)
  texts = [t for g in genres for t in GENRE_ITEMS[g]]
  genre_of = [g for g in genres for _ in GENRE_ITEMS[g]]
  cases, names = [], []
  for target in range(len(texts)):
    others = [i for i in range(len(texts)) if genre_of[i] != genre_of[target]]
    items, pos = judge.candidates(target, [i for i in range(len(texts)) if i not in others], len(texts),
                                  n, rng)
    cases.append((items, pos))
    names.append(genre_of[target])
  return texts, cases, names


@pytest.mark.slow
def test_local_judge_picks_the_genre_the_profile_names(smollm2_gguf):
  texts, cases, genres = _genre_cases(np.random.default_rng(0))
  reader = judge.LocalJudge(smollm2_gguf)
  named = judge.accuracy(reader, [f"This user only watches {g} movies." for g in genres], cases,
                         texts)
  assert named["interval95"][0] > named["chance"], named
  # The same candidates with a profile naming no genre: near chance.
  vague = judge.accuracy(reader, ["This user watches movies."] * len(cases), cases, texts)
  assert named["correct"] > vague["correct"] + 3, (named, vague)


@pytest.mark.slow
def test_judge_command_writes_zero_shot_and_trained_accuracy(served_run, served_session, capsys,
                                                             smollm2_gguf):
  cfg, workdir = served_run
  result = judge.judge_run(cfg, served_session, judge.LocalJudge(smollm2_gguf))
  for name in ("zero_shot", "trained"):
    r = result[name]
    assert r["chance"] == 1 / cfg.judge.num_candidates and r["total"] == len(result["users"]) > 0
    assert 0 <= r["interval95"][0] <= r["accuracy"] <= r["interval95"][1] <= 1
  table = judge.format_table(result)
  assert "zero_shot" in table and "trained" in table
  json.dumps(result)
