"""No held-out user is trained on: every training batch and baseline fit sees train users only.

A whole tiny run (zero-shot evaluation with every baseline, one CL and one RL
phase, evaluation, final table) on the planted task, with the user ids of
every CL batch, RLSO prompt batch, profile-writing call of the CL phase and
baseline fit recorded; then the report carries intervals for every row.
"""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
sys.path.insert(0, os.path.dirname(__file__))

import test_train  # noqa: E402

from langptune_jax.rec import baselines as baselines_lib  # noqa: E402
from langptune_jax.train import report  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("leakage")
  cfg = test_train.planted_config(**test_train.RUN_OVERRIDES)
  cfg.eval.bootstrap_samples = 200
  cfg.eval.baselines = ("reference_query", "history", "popularity", "random", "sasrec")
  trainer = test_train.make_trainer(cfg, workdir, num_devices=1)
  seen = {"cl_profiles": set(), "rl_prompts": set(), "sasrec_sequences": [], "sasrec_fits": 0}
  write_profiles, rlso_update = trainer.write_profiles, trainer.rlso_update
  train_sasrec = baselines_lib.train_sasrec

  def spy_write_profiles(users, key, **kw):
    if kw.get("desc", "").startswith("iteration "):  # the CL phase's own profiles
      seen["cl_profiles"].update(users.user.tolist())
    return write_profiles(users, key, **kw)

  def spy_rlso_update(prompts, *args):
    seen["rl_prompts"].update(prompts.user.tolist())
    return rlso_update(prompts, *args)

  def spy_train_sasrec(sequences, *args, **kw):
    seen["sasrec_sequences"].extend(tuple(s.tolist()) for s in sequences)
    seen["sasrec_fits"] += 1
    return train_sasrec(sequences, *args, **kw)

  trainer.write_profiles = spy_write_profiles
  trainer.rlso_update = spy_rlso_update
  baselines_lib.train_sasrec = spy_train_sasrec
  try:
    history = trainer.run()
  finally:
    baselines_lib.train_sasrec = train_sasrec
  report.write_report(str(workdir), history, trainer.curves, tuple(cfg.eval.ks), 2)
  yield trainer, seen, workdir
  trainer.close()


def test_every_fit_sees_train_users_only(run):
  trainer, seen, _ = run
  data = trainer.data
  train = set(data.train.user.tolist())
  held_out = set(data.val.user.tolist()) | set(data.test.user.tolist())
  assert train and held_out and not train & held_out
  fitted = trainer.fitted_users
  assert set(fitted) == {"cl", "rl", "popularity", "sasrec", "history"}
  for name, users in fitted.items():
    assert users and users <= train, (name, sorted(users - train))
  # Independent of the record: what reached the CL profiles, the RLSO prompts and SASRec.
  assert seen["cl_profiles"] and seen["cl_profiles"] <= train
  assert seen["rl_prompts"] and seen["rl_prompts"] <= train
  train_sequences = {tuple(np.append(h[h >= 0], t).tolist())
                     for h, t in zip(data.train.history, data.train.target)}
  assert seen["sasrec_sequences"] and set(seen["sasrec_sequences"]) <= train_sequences


def test_baselines_are_fitted_once_for_both_splits(run):
  trainer, seen, _ = run
  zero_shot = [e for e in trainer.history if e["tag"] == "zero_shot"]
  assert sorted(e["split"] for e in zero_shot) == ["test", "val"]
  assert all({"sasrec", "history"} <= set(e["results"]) for e in zero_shot)
  assert seen["sasrec_fits"] == 1
  assert trainer.evaluator.fits == {}  # dropped once the splits were ranked


def test_final_table_is_on_test_with_intervals_and_cl_only(run):
  trainer, _, workdir = run
  tags = [(e["tag"], e["split"]) for e in trainer.history]
  assert tags == [("zero_shot", "val"), ("zero_shot", "test"), ("iteration_1", "val"),
                  ("final", "test")]
  results = json.loads((workdir / "results.json").read_text())
  assert results["split"] == "test" and results["users"] == len(trainer.data.test.head(16))
  methods = results["methods"]
  assert {"zero-shot profiles", "LangPTune",
          "CL only (zero-shot profiles, tuned decoder)"} <= set(methods)
  for name, values in methods.items():
    for metric, mean in values.items():
      ci = results["intervals"][name][metric]
      assert ci["lo"] <= mean + 1e-6 and mean <= ci["hi"] + 1e-6, (name, metric, ci)
  vs = results["vs_zero_shot"]
  assert "zero-shot profiles" not in vs and {"LangPTune", "random"} <= set(vs)
  d = vs["LangPTune"]["ndcg@10"]
  assert d["lo"] <= d["diff"] <= d["hi"] and 0.0 <= d["p_positive"] <= 1.0
  assert results["bootstrap"] == {"samples": 200, "confidence": 0.95, "seed": 0}
  md = (workdir / "results.md").read_text()
  assert "Split `test`" in md and "P>0=" in md
