"""The train, evaluate and export commands end to end, on MovieLens-100K with small models.

Encoder: a tiny random Llama saved as an HF directory with the SmolLM2
tokenizer; decoder: the real all-MiniLM-L6-v2. One module-scoped run trains
with checkpoints, then `evaluate` and `export` work from its run directory.
"""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))

import serve_fixtures  # noqa: E402
import tiny  # noqa: E402

from langptune_jax import config as config_lib  # noqa: E402
from langptune_jax import parallel  # noqa: E402
from langptune_jax.models import embedder as embedder_lib  # noqa: E402
from langptune_jax.train import commands  # noqa: E402

CL_USERS = 24


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, smollm2_gguf):
  """A 1-block random Llama over the SmolLM2 vocabulary, with its tokenizer."""
  return serve_fixtures.tiny_writer_dir(tmp_path_factory.mktemp("tiny_encoder"), smollm2_gguf)


def run_config(encoder_dir, minilm_dir, ml100k_dir):
  cfg = tiny.get_config()
  cfg.encoder.path, cfg.decoder.path = str(encoder_dir), str(minilm_dir)
  cfg.data.movielens_dir = str(ml100k_dir)
  cfg.data.history_len = 3
  cfg.data.prompt_max_len = 192
  cfg.data.max_users = 96
  cfg.rl.response_length = 8
  cfg.train.cl_users = CL_USERS
  cfg.eval.greedy = True  # the same profiles whoever asks: train's last evaluation, evaluate
  cfg.eval.baselines = ("reference_query", "popularity")
  cfg.checkpoint.enabled = True
  cfg.checkpoint.every_steps = 100  # only the phase-boundary and final checkpoints
  config_lib.validate(cfg, num_devices=jax.device_count())
  return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory, encoder_dir, minilm_dir, ml100k_dir):
  """A run stopped after its first update, inspected, then resumed to the end."""
  workdir = tmp_path_factory.mktemp("run")
  cfg = run_config(encoder_dir, minilm_dir, ml100k_dir)
  cfg.train.stop_after_steps = 1
  assert commands.train(cfg, str(workdir)) == 0
  trainer = commands.build_trainer(cfg, str(workdir))
  try:
    assert trainer.restore()
    stopped = {"position": dataclasses.asdict(trainer.position), "profiles": trainer.profiles}
  finally:
    trainer.close()
  cfg.train.stop_after_steps = 0
  assert commands.train(cfg, str(workdir)) == 0
  return cfg, workdir, stopped


def test_cl_phase_trains_on_train_cl_users_profiles(trained):
  _, _, stopped = trained
  assert stopped["position"]["phase"] == "cl", stopped["position"]
  # The CL phase wrote (and checkpointed) profiles for exactly train.cl_users users.
  assert len(stopped["profiles"].texts) == CL_USERS
  assert stopped["profiles"].ranker_tokens.shape[0] == CL_USERS


def test_resumed_run_finishes_with_both_evaluations(trained):
  _, workdir, _ = trained
  results = json.loads((workdir / "results.json").read_text())
  assert [(e["tag"], e["split"]) for e in results["evaluations"]] == [
      ("zero_shot", "val"), ("zero_shot", "test"), ("iteration_1", "val"), ("final", "test")]
  assert results["split"] == "test" and results["intervals"]
  assert (workdir / "results.md").exists() and (workdir / "curves.png").exists()


def test_evaluate_reproduces_the_final_evaluation(trained, capsys):
  cfg, workdir, _ = trained
  assert commands.evaluate(cfg, str(workdir)) == 0
  final = json.loads((workdir / "results.json").read_text())["evaluations"][-1]
  written = json.loads((workdir / "evaluate_checkpoint_iteration_1_test.json").read_text())
  ours = written["results"]["evaluate_checkpoint_iteration_1_test"]
  assert ours == pytest.approx(final["results"]["final"], abs=1e-6)
  # Baselines and zero-shot rows are the ones kept from before training.
  assert set(written["results"]) == {"evaluate_checkpoint_iteration_1_test", "reference_query",
                                     "popularity", "zero_shot", "cl_only"}
  for name in ("reference_query", "popularity", "zero_shot", "cl_only"):
    assert written["results"][name] == pytest.approx(final["results"][name], abs=1e-6)
  assert written["vs_zero_shot"]["evaluate_checkpoint_iteration_1_test"]
  assert "LangPTune (evaluate checkpoint iteration 1 test)" in capsys.readouterr().out


def test_export_matches_the_trained_models(trained):
  cfg, workdir, _ = trained
  assert commands.export(cfg, str(workdir)) == 0
  trainer = commands.build_trainer(cfg, str(workdir))
  try:
    assert trainer.restore()
    tokens = np.asarray(trainer.data.val.prompt_tokens[:2])
    mask = np.asarray(trainer.data.val.prompt_mask[:2])
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)  # left padding
    causal = np.tril(np.ones((tokens.shape[1],) * 2, bool))[None] & mask[:, None, :]
    with parallel.use_mesh(trainer.mesh, trainer.rules):
      ours, _ = trainer.writer_state.model(jnp.asarray(tokens), jnp.asarray(positions),
                                            jnp.asarray(causal))
      item_tokens, item_mask = trainer.data.item_tokens[:4], trainer.data.item_mask[:4]
      our_items = trainer.ranker_state.model(jnp.asarray(item_tokens), jnp.asarray(item_mask))
  finally:
    trainer.close()

  encoder = transformers.AutoModelForCausalLM.from_pretrained(workdir / "export" / "encoder")
  with torch.no_grad():
    theirs = encoder(input_ids=torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long),
                     position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[valid], theirs[valid], atol=1e-4)

  bert = transformers.AutoModel.from_pretrained(workdir / "export" / "decoder")
  with torch.no_grad():
    hidden = bert(input_ids=torch.tensor(item_tokens, dtype=torch.long),
                  attention_mask=torch.tensor(item_mask, dtype=torch.long)).last_hidden_state
  m = torch.tensor(item_mask, dtype=torch.float32)[..., None]
  pooled = (hidden * m).sum(1) / m.sum(1)
  theirs_items = torch.nn.functional.normalize(pooled, dim=-1).numpy()
  np.testing.assert_allclose(np.asarray(our_items), theirs_items, atol=1e-5)
  # Training moved the decoder away from the MiniLM it started from.
  source = embedder_lib.load_embedder("bert", cfg.decoder.path, pooling="mean")
  assert float(jnp.max(jnp.abs(source(jnp.asarray(item_tokens), jnp.asarray(item_mask))
                               - our_items))) > 1e-4
  # The exported tokenizer is the encoder's, chat template included.
  exported = transformers.AutoTokenizer.from_pretrained(workdir / "export" / "encoder")
  assert exported.chat_template and len(exported) == encoder.config.vocab_size
