"""Host-side helpers of the training loop: learning-rate schedules, prompt groups, user splits."""

import ml_collections
import numpy as np
import pytest

from langptune_jax.train import rlso
from langptune_jax.train import state as state_lib
from langptune_jax.train.run_data import UserSplit


def opt_config(kind, warmup=0, lr=1e-3):
  return ml_collections.ConfigDict(dict(lr=lr, lr_schedule=kind, warmup_steps=warmup))


def values(schedule, steps):
  return np.array([float(schedule(s)) for s in steps])


def test_constant_schedule_with_linear_warmup():
  schedule = state_lib.learning_rate_schedule(opt_config("constant", warmup=4), total_steps=20)
  np.testing.assert_allclose(values(schedule, [0, 1, 2, 4, 10, 19]),
                             [0, 2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
  plain = state_lib.learning_rate_schedule(opt_config("constant"), total_steps=20)
  np.testing.assert_allclose(values(plain, [0, 19]), [1e-3, 1e-3], rtol=1e-6)


def test_linear_schedule_decays_to_zero_after_warmup():
  schedule = state_lib.learning_rate_schedule(opt_config("linear", warmup=2), total_steps=12)
  # Warm-up 0 -> lr over 2 steps, then lr -> 0 over the remaining 10.
  np.testing.assert_allclose(values(schedule, [0, 1, 2, 7, 12]), [0, 5e-4, 1e-3, 5e-4, 0],
                             rtol=1e-6, atol=1e-12)


def test_cosine_schedule_halves_at_midpoint():
  schedule = state_lib.learning_rate_schedule(opt_config("cosine"), total_steps=10)
  np.testing.assert_allclose(values(schedule, [0, 5, 10]), [1e-3, 5e-4, 0], rtol=1e-6,
                             atol=1e-12)


def test_unknown_schedule_is_one_clear_error():
  with pytest.raises(ValueError, match="lr_schedule='step': expected constant, linear or cosine"):
    state_lib.learning_rate_schedule(opt_config("step"), total_steps=10)


def test_repeat_prompts_is_prompt_major():
  out = rlso.repeat_prompts({"t": np.array([[1, 1], [2, 2], [3, 3]]), "y": [7, 8, 9]}, 2)
  np.testing.assert_array_equal(out["t"], [[1, 1], [1, 1], [2, 2], [2, 2], [3, 3], [3, 3]])
  np.testing.assert_array_equal(out["y"], [7, 7, 8, 8, 9, 9])


def test_shuffle_groups_moves_whole_groups_and_differs_between_passes():
  group, prompts = 3, 10
  rows = np.arange(prompts * group)
  batch = {"row": rows, "prompt": rows // group, "tokens": np.stack([rows, -rows], axis=1)}
  rng = np.random.default_rng(0)
  passes = [rlso.shuffle_groups(batch, group, rng) for _ in range(2)]
  for out in passes:
    # Every key is permuted alike, every prompt's rows stay together and in order.
    np.testing.assert_array_equal(out["prompt"], out["row"] // group)
    np.testing.assert_array_equal(out["tokens"], np.stack([out["row"], -out["row"]], axis=1))
    blocks = out["row"].reshape(prompts, group)
    np.testing.assert_array_equal(blocks - blocks[:, :1], np.tile(np.arange(group), (prompts, 1)))
    assert sorted(out["row"].tolist()) == rows.tolist()
  order = [out["prompt"][::group].tolist() for out in passes]
  assert order[0] != list(range(prompts)) and order[0] != order[1]
  # Seeded: the same generator state gives the same passes.
  again = rlso.shuffle_groups(batch, group, np.random.default_rng(0))
  np.testing.assert_array_equal(again["row"], passes[0]["row"])


def test_last_history_item_handles_padding_on_either_side():
  history = np.array([[4, 5, 6], [7, -1, -1], [-1, -1, 8], [-1, -1, -1]], np.int32)
  n = len(history)
  split = UserSplit(np.arange(n), np.zeros((n, 2), np.int32), np.ones((n, 2), bool), history,
                    np.zeros(n, np.int32))
  np.testing.assert_array_equal(split.last_history_item(), [6, 7, 8, -1])
