"""`langptune-jax prepare` end to end: summary table on success, one line on bad input."""

import os
import pathlib
import subprocess
import sys

import fixtures_data as fx
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _run(args, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, "-m", "langptune_jax.main", "prepare", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_prepare_command(tmp_path, smollm2_gguf, minilm_dir):
  reviews, meta = fx.write(tmp_path / "raw")
  common = ["--config=configs/base.py", f"--config.encoder.path={smollm2_gguf}",
            f"--config.decoder.path={minilm_dir}", "--config.data.source=amazon",
            f"--config.data.reviews={reviews}", f"--config.data.meta={meta}",
            *[f"--config.data.{k}={v}" for k, v in fx.SMALL_CFG.items()]]
  ok = _run([*common, f"--config.data.dataset_dir={tmp_path / 'ds'}"], tmp_path)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "k-core(3)" in ok.stdout and "malformed JSON" in ok.stdout
  assert "train            14" in ok.stdout
  assert (tmp_path / "ds" / "stats.json").is_file()

  bad = _run([*common, "--config.data.k_core=30", f"--config.data.dataset_dir={tmp_path / 'x'}"],
             tmp_path)
  assert bad.returncode != 0
  errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
  assert errors == ["error: k-core(30) left 0 of 25 users (114 interactions); lower data.k_core"]
  assert "Traceback" not in bad.stderr
  assert not (tmp_path / "x").exists()
