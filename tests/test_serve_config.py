"""Validation of the serve.* and judge.* config sections."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))

import tiny  # noqa: E402

from langptune_jax import config as config_lib  # noqa: E402


def test_defaults_are_valid():
  cfg = tiny.get_config()
  config_lib.validate(cfg, num_devices=1)
  assert (cfg.serve.host, cfg.serve.port, cfg.serve.top_k) == ("127.0.0.1", 8000, 10)


def test_every_bad_serving_field_is_reported():
  cfg = tiny.get_config()
  cfg.serve.port = 70000
  cfg.serve.top_k = 0
  cfg.serve.host = ""
  cfg.judge.endpoint = "ftp://judge"
  cfg.judge.num_candidates = 1
  cfg.judge.max_users = -1
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(cfg, num_devices=1)
  message = str(info.value)
  for line in ("serve.port=70000: must be in [1, 65535]", "serve.top_k=0: must be >= 1",
               "serve.host='': must not be empty",
               "judge.endpoint='ftp://judge': must be empty or an http(s):// URL",
               "judge.num_candidates=1: must be >= 2",
               "judge.max_users=-1: must be >= 0 (0: all)"):
    assert line in message, message


def test_serving_fields_do_not_block_resuming_a_checkpoint():
  from langptune_jax.train import checkpoint
  a, b = tiny.get_config(), tiny.get_config()
  b.serve.port, b.judge.num_candidates = 9000, 10
  assert checkpoint.config_fingerprint(a) == checkpoint.config_fingerprint(b)
