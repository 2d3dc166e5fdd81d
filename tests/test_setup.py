"""`plan` compiles the very steps `train` runs: same functions, shapes and shardings."""

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
sys.path.insert(0, os.path.dirname(__file__))

import planted  # noqa: E402
import tiny  # noqa: E402

from langptune_jax import parallel, plan_models  # noqa: E402
from langptune_jax import plan as plan_lib  # noqa: E402
from langptune_jax.train import loop  # noqa: E402
from langptune_jax.train import profiles as profiles_lib  # noqa: E402


def _config(training: str):
  cfg = tiny.get_config()
  cfg.data.prompt_max_len = 16  # the planted data's widths
  cfg.data.decoder_max_len = 8
  cfg.rl.response_length = 6
  cfg.rl.num_lm_updates = 1
  cfg.rl.num_ppo_epochs = 2
  # Decaying schedules bake their length into the update: a plan that counts
  # optimizer steps differently compiles another program.
  cfg.rl.lr_schedule = "linear"
  cfg.cl.lr_schedule = "linear"
  cfg.cl.num_emb_updates = 1
  cfg.encoder.training = training
  cfg.checkpoint.enabled = False
  return cfg


def _abstract(tree):
  """What a jitted step sees of its arguments: shape, dtype and (for arrays) sharding."""
  def leaf(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(leaf, tree)


def _signature(tree):
  """Comparable (shape, dtype, partition spec) leaves."""
  return [(tuple(x.shape), str(x.dtype),
           None if x.sharding is None else tuple(x.sharding.spec))
          for x in jax.tree.leaves(_abstract(tree))]


class _Recorder:
  """Wraps a step: keeps the abstract arguments of its first call."""

  def __init__(self, fn):
    self.fn, self.args = fn, None

  def __call__(self, *args):
    if self.args is None:
      self.args = _abstract(args)
    return self.fn(*args)


@pytest.mark.parametrize("training", ["lora", "partial"])
def test_plan_compiles_the_steps_train_runs(tmp_path, monkeypatch, training):
  cfg = _config(training)
  tok = planted.word_tokenizer()
  mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:8])
  trainer = loop.Trainer(cfg, str(tmp_path), data=planted.planted_data(tok),
                         encoder=planted.tiny_encoder(len(tok)),
                         decoder=planted.tiny_decoder(len(tok)), writer_tokenizer=tok,
                         ranker_tokenizer=tok, mesh=mesh)
  # Record what the training loop passes to each jitted step.
  recorders = {"rlso/logprobs": _Recorder(trainer.rlso_update.policy_logprobs),
               "rlso/update": _Recorder(trainer.rlso_update.rlso_pass),
               "cl/update": _Recorder(trainer.cl_step),
               "embed": _Recorder(trainer.steps.embed)}
  trainer.rlso_update.policy_logprobs = recorders["rlso/logprobs"]
  trainer.rlso_update.rlso_pass = recorders["rlso/update"]
  trainer.cl_step = recorders["cl/update"]
  trainer.steps = trainer.steps.__class__(**dict(vars(trainer.steps),
                                                 embed=recorders["embed"]))
  rollouts = []
  real_generate = profiles_lib.generate

  def generate(model, tokens, mask, settings, rng, greedy=False):
    rollouts.append(_abstract((tokens, mask, rng)))
    return real_generate(model, tokens, mask, settings, rng, greedy=greedy)

  monkeypatch.setattr(profiles_lib, "generate", generate)
  trainer.cl_phase(0)
  rollouts.clear()  # the CL phase's profile batches; keep the RL rollout's
  trainer.rl_phase(0)

  # The plan's set-up of the same config, on the same models and mesh.
  monkeypatch.setattr(plan_models, "model_constructors", lambda config: (
      lambda: planted.tiny_encoder(len(tok)), lambda: planted.tiny_decoder(len(tok))))
  planned = plan_models.abstract_setup(cfg, mesh, trainer.rules,
                                       eos_ids=trainer.sampling.eos_ids, pad_id=trainer.sampling.pad_id)
  plan_args = plan_lib.step_arguments(cfg, planned, mesh, trainer.rules)
  plan_fns = plan_lib.step_functions(planned)
  train_fns = plan_lib.step_functions(trainer.setup)

  for name, recorder in recorders.items():
    assert recorder.args is not None, name
    assert _signature(recorder.args) == _signature(plan_args[name]), name
    ours = train_fns[name].lower(*recorder.args).as_text()
    assert ours == plan_fns[name].lower(*plan_args[name]).as_text(), name
  # The rollout: the sampler gets host arrays and shards them itself, so compare
  # shapes and dtypes, then the two set-ups' sample programs on the plan's arguments.
  tokens, mask, rng = rollouts[0]
  assert [(x.shape, x.dtype) for x in (tokens, mask, rng)] == [
      (x.shape, x.dtype) for x in plan_args["sample"][1:]]
  state = _abstract(trainer.writer_state.state)
  assert (train_fns["sample"].lower(state, *plan_args["sample"][1:]).as_text()
          == plan_fns["sample"].lower(*plan_args["sample"]).as_text())
