"""One trained run shared by the recommend, serve and judge tests (session-scoped).

Profile writer: a 1-block random Llama over the SmolLM2 vocabulary (its chat
template included); ranking model: the real all-MiniLM-L6-v2, so genre words
in a profile move MovieLens items whose text names that genre. One short
training iteration on MovieLens-100K leaves a checkpoint with trained adapters.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))


def tiny_writer_dir(path, tokenizer_source: str) -> str:
  """A 1-block random Llama saved as an HF directory with the SmolLM2 tokenizer."""
  import torch
  import transformers

  from langptune_jax.weights import tokenizer as tok_lib
  tokenizer = tok_lib.load_tokenizer(tokenizer_source)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  tokenizer.save_pretrained(str(path))
  return str(path)


def serve_config(writer_dir, minilm_dir, ml100k_dir):
  import jax
  import tiny

  from langptune_jax import config as config_lib
  cfg = tiny.get_config()
  cfg.encoder.path, cfg.decoder.path = str(writer_dir), str(minilm_dir)
  cfg.data.movielens_dir = str(ml100k_dir)
  cfg.data.history_len = 3
  cfg.data.prompt_max_len = 192
  cfg.data.decoder_max_len = 48
  cfg.data.max_users = 24
  cfg.decoder.embed_batch_size = 64
  cfg.rl.response_length = 8
  cfg.rl.num_lm_updates = 1
  cfg.rl.num_ppo_epochs = 1
  cfg.cl.num_emb_updates = 1
  cfg.train.cl_users = 8
  cfg.eval.greedy = True
  cfg.eval.max_users = 8
  cfg.eval.baselines = ()
  cfg.checkpoint.enabled = True
  cfg.checkpoint.every_steps = 100
  cfg.logging.tensorboard = False
  cfg.judge.num_candidates = 4
  config_lib.validate(cfg, num_devices=jax.device_count())
  return cfg


@pytest.fixture(scope="session")
def served_run(tmp_path_factory, smollm2_gguf, minilm_dir, ml100k_dir):
  """(config, workdir) of a finished training run with a checkpoint.

  With LANGPTUNE_SERVE_TEST_RUN=DIR the run is kept in DIR and reused by later sessions
  (for working on these tests; CI trains afresh).
  """
  from langptune_jax.serve.load import has_checkpoint
  from langptune_jax.train import commands
  kept = os.environ.get("LANGPTUNE_SERVE_TEST_RUN")
  root = pathlib.Path(kept) if kept else tmp_path_factory.mktemp("serve")
  writer_dir, workdir = root / "writer", root / "run"
  if not (writer_dir / "config.json").is_file():
    tiny_writer_dir(writer_dir, smollm2_gguf)
  cfg = serve_config(writer_dir, minilm_dir, ml100k_dir)
  if not has_checkpoint(workdir):
    assert commands.train(cfg, str(workdir)) == 0
  return cfg, workdir


@pytest.fixture(scope="session")
def served_session(served_run):
  """The loaded, warmed-up session of `served_run`."""
  from langptune_jax.serve.load import open_session
  cfg, workdir = served_run
  return open_session(cfg, workdir)


@contextlib.contextmanager
def live_server(session):
  """The app on a free local port, served by uvicorn in a thread; yields its base URL."""
  import socket

  import uvicorn

  from langptune_jax.serve.app import create_app
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(create_app(session), host="127.0.0.1", port=port,
                                         log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  for _ in range(600):
    if server.started:
      break
    time.sleep(0.05)
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(timeout=30)


def genres_of(session, item: int) -> set[str]:
  """The genres a MovieLens item text lists."""
  for line in session.data.item_text[item].splitlines():
    if line.startswith("Genres:"):
      return {g.strip() for g in line[len("Genres:"):].split(",")}
  return set()
