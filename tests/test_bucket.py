"""A work directory in a (locally emulated) Cloud Storage bucket, end to end.

`train` writes its dataset, checkpoints, metrics, TensorBoard events, records,
report and lock into ``gs://bucket/run``, stops after one update, resumes from
the bucket; `evaluate` and `recommend` read the run back and `export` writes
into it; no local ``gs:`` folder appears.
"""

import io
import json
import os
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))

import fake_gcs  # noqa: E402
import serve_fixtures  # noqa: E402
from cpu_devices import xla_flags  # noqa: E402

from langptune_jax import config as config_lib  # noqa: E402
from langptune_jax import fs, observability, workdir_lock  # noqa: E402


@pytest.fixture(scope="module")
def bucket():
  with fake_gcs.emulated_bucket() as root:
    yield root


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
  """Runs the module in an empty folder: a bucket path mistaken for a local one lands here."""
  folder = tmp_path_factory.mktemp("cwd")
  before = os.getcwd()
  os.chdir(folder)
  yield folder
  os.chdir(before)


@pytest.fixture(scope="module")
def bucket_run(bucket, cwd, tmp_path_factory, smollm2_gguf, minilm_dir, ml100k_dir):
  """(config, workdir, metrics after the first stop) of a run stopped after one update, resumed."""
  from langptune_jax.train import commands
  writer = serve_fixtures.tiny_writer_dir(tmp_path_factory.mktemp("writer"), smollm2_gguf)
  cfg = serve_fixtures.serve_config(writer, minilm_dir, ml100k_dir)
  cfg.logging.tensorboard = True
  workdir = config_lib.resolve_workdir(cfg, f"{bucket}/run")
  cfg.train.stop_after_steps = 1
  with workdir_lock.hold(workdir, "train"):
    assert commands.train(cfg, workdir) == 0
  stopped = observability.read_jsonl(workdir)
  cfg.train.stop_after_steps = 0
  with workdir_lock.hold(workdir, "train"):
    assert commands.train(cfg, workdir) == 0
  return cfg, workdir, stopped


def test_workdir_stays_a_bucket_address(bucket, cwd):
  cfg = config_lib.load_config(os.path.join(os.path.dirname(__file__), "..", "configs",
                                            "tiny.py"))
  workdir = config_lib.resolve_workdir(cfg, f"{bucket}/elsewhere")
  assert os.fspath(workdir) == f"{bucket}/elsewhere"
  assert fs.join(workdir, "checkpoints") == f"{bucket}/elsewhere/checkpoints"
  local = config_lib.resolve_workdir(cfg, "runs/x")  # local paths: absolute, created
  assert local == cwd / "runs" / "x" and local.is_dir()
  assert not (cwd / "gs:").exists()


def test_lock_object_in_the_bucket(bucket):
  workdir = f"{bucket}/locked"
  with workdir_lock.hold(workdir, "train"):
    lock = fs.path(workdir) / workdir_lock.LOCK_NAME
    assert "command=train" in lock.read_text()
    with pytest.raises(workdir_lock.WorkdirLockedError, match="is in use by `train`"):
      workdir_lock.acquire(workdir, "evaluate")
  assert not lock.exists()
  with pytest.raises(FileExistsError):  # the create-if-absent primitive itself
    fs.create_new(f"{workdir}/x", b"1")
    fs.create_new(f"{workdir}/x", b"2")


def test_train_writes_everything_to_the_bucket_and_resumes(bucket_run, cwd):
  from langptune_jax.train import checkpoint as ckpt_lib
  _, workdir, stopped = bucket_run
  root = fs.path(workdir)
  names = {p.name for p in root.iterdir()}
  assert {"dataset", "checkpoints", "metrics.jsonl", "tensorboard", "profiles", "results.json",
          "results.md", "curves.png", "metrics.png"} <= names, names
  assert workdir_lock.LOCK_NAME not in names  # released
  assert ckpt_lib.has_checkpoint(root / "checkpoints")
  results = json.loads((root / "results.json").read_text())
  assert [(e["tag"], e["split"]) for e in results["evaluations"]] == [
      ("zero_shot", "val"), ("zero_shot", "test"), ("iteration_1", "val"), ("final", "test")]
  # Resumed, not restarted: the first run's lines are kept and no step is logged twice.
  lines = observability.read_jsonl(workdir)
  assert lines[:len(stopped)] == stopped and len(lines) > len(stopped)
  trained = [(line["step"], key) for line in lines for key in line
             if key.startswith(("rl/", "cl/"))]
  assert len(trained) == len(set(trained))
  with tempfile.TemporaryDirectory() as local:
    fs.download_tree(root / "tensorboard", local)
    assert observability.read_scalars(local)
  assert (root / "profiles" / "final.jsonl").read_text().count("\n") == results["users"]
  assert not (cwd / "gs:").exists() and not list(cwd.glob("**/gs:"))


def test_evaluate_recommend_and_export_use_the_bucket(bucket_run, cwd):
  from langptune_jax.serve import recommend
  from langptune_jax.train import commands
  cfg, workdir, _ = bucket_run
  with workdir_lock.hold(workdir, "evaluate"):
    assert commands.evaluate(cfg, workdir) == 0
  root = fs.path(workdir)
  written = json.loads((root / "evaluate_checkpoint_iteration_1_test.json").read_text())
  final = json.loads((root / "results.json").read_text())["evaluations"][-1]
  assert written["results"]["evaluate_checkpoint_iteration_1_test"] == pytest.approx(
      final["results"]["final"], abs=1e-6)
  out = io.StringIO()
  profile = "Enjoys tense horror films and thrillers from the nineties."  # no generation
  assert recommend.recommend(cfg, workdir, profile=profile, output_format="json", out=out) == 0
  answer = json.loads(out.getvalue())
  assert answer["profile"] == profile and len(answer["items"]) == int(cfg.serve.top_k)
  assert (root / "catalogue_index" / "meta.json").exists()
  with workdir_lock.hold(workdir, "export"):
    assert commands.export(cfg, workdir, overwrite=False) == 0
  for part in ("encoder", "decoder"):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (root / "export" / part).iterdir()}
  assert not (cwd / "gs:").exists()


def test_cli_names_the_bucket_workdir(bucket, cwd):
  env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
  config = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
  proc = subprocess.run(
      [sys.executable, "-m", "langptune_jax.main", "info", f"--config={os.path.abspath(config)}",
       f"--workdir={bucket}/cli"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"workdir: {bucket}/cli\n" in proc.stdout
  assert not (cwd / "gs:").exists()


def test_xla_trace_lands_in_the_bucket(bucket):
  import jax
  import jax.numpy as jnp
  import ml_collections
  profile = ml_collections.ConfigDict({"enabled": True, "start_step": 0, "num_steps": 1})
  x = jnp.ones((16, 16))
  with observability.ProfileWindow(profile, f"{bucket}/traced/profile") as window:
    for step in range(2):
      window.step(step, sync=x)
      x = jax.jit(jnp.tanh)(x)
  files = window.trace_files()
  assert len(files) == 1 and os.fspath(files[0]).startswith(f"{bucket}/traced/profile/plugins/")
  assert len(files[0].read_bytes()) > 0
