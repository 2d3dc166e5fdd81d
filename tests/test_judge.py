"""The interpretability check: candidates, accuracy against chance, and a judge LLM that reads."""

import json

import numpy as np
import planted
import pytest

from langptune_jax import sampling
from langptune_jax.serve import judge


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


def _trained_word_judge(steps=120):
  """A tiny Llama over the planted word vocabulary, trained to continue a profile with an item
  of the genre it names, and the profile-free prompt with an item of any genre."""
  import optax
  from flax import nnx

  tokenizer = planted.word_tokenizer()
  model = planted.tiny_encoder(len(tokenizer.get_vocab()), num_layers=1)
  texts = []
  for genre in planted.GENRES:
    for filler in planted.FILLERS:
      item = f"{genre} {filler}"
      texts += [judge.CONTEXT.format(profile=f"user likes {genre}") + item,
                judge.NEUTRAL + item]
  ids = tokenizer(texts, padding=True)
  tokens, mask = np.asarray(ids["input_ids"]), np.asarray(ids["attention_mask"], bool)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return -sampling.token_logprobs(model, tokens, mask).sum() / mask.sum()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  for _ in range(steps):
    step(model, optimizer)
  return judge.LocalJudge(model, tokenizer)


def test_a_tiny_judge_picks_the_genre_the_profile_names():
  reader = _trained_word_judge()
  genres = list(planted.GENRES)
  texts = [f"{g} {f}" for g in genres for f in planted.FILLERS[:4]]
  genre_of = [t.split()[0] for t in texts]
  rng = np.random.default_rng(0)
  cases, profiles, wrong = [], [], []
  for target in range(len(texts)):
    same = [i for i in range(len(texts)) if genre_of[i] == genre_of[target]]
    cases.append(judge.candidates(target, same, len(texts), 4, rng))  # negatives: other genres
    profiles.append(f"user likes {genre_of[target]}")
    wrong.append(f"user likes {genres[(genres.index(genre_of[target]) + 1) % len(genres)]}")
  named = judge.accuracy(reader, profiles, cases, texts)
  assert named["interval95"][0] > named["chance"], named
  misled = judge.accuracy(reader, wrong, cases, texts)  # a profile naming another genre
  assert misled["accuracy"] < named["accuracy"], (named, misled)


@pytest.mark.slow
def test_judge_command_writes_zero_shot_and_trained_accuracy(served_run, served_session, capsys,
                                                             monkeypatch):
  from langptune_jax.serve import load
  cfg, workdir = served_run
  monkeypatch.setattr(load, "open_session", lambda *args, **kwargs: served_session)
  assert judge.run(cfg, workdir) == 0  # the default judge: the offline SmolLM2
  result = json.loads((workdir / "judge.json").read_text())
  users = served_session.data.split(str(cfg.eval.split)).user
  assert result["users"] == [int(u) for u in users] and result["num_candidates"] == 4
  for name in ("zero_shot", "trained"):
    r = result[name]
    assert r["chance"] == 0.25 and r["total"] == len(result["users"]) > 0
    assert 0 <= r["interval95"][0] <= r["accuracy"] <= r["interval95"][1] <= 1
    assert r["accuracy"] == r["correct"] / r["total"]
  table = capsys.readouterr().out
  print(table)
  assert f"{len(users)} users of {cfg.eval.split}, 4 candidates each (chance 0.250)" in table
  for name in ("zero_shot", "trained"):
    r = result[name]
    assert (f"{r['accuracy']:>8.3f}  [{r['interval95'][0]:.3f}, {r['interval95'][1]:.3f}]  "
            f"({r['correct']}/{r['total']})") in table
