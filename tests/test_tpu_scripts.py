"""tpu_scripts/ run locally: `launch.sh --local N` and the SLURM script's dry run.

`--local N` sends the exact worker command line a pod slice gets (common.sh's
`on_all_workers`) to N local shells with the JAX cluster variables set, so the
scripts' argument quoting, environment exports and log/pid files are exercised
without a cloud project. The SLURM dry run executes each task's inner shell as
srun would and prints its environment and command instead of starting it.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))

import serve_fixtures  # noqa: E402
from cpu_devices import xla_flags  # noqa: E402

pytestmark = pytest.mark.multiprocess

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tpu_scripts"
INSTRUCTION = "Describe this viewer's taste in 'two' sentences"  # quotes and spaces travel


def _launch(tmp_path, local: int, command: str, workdir, overrides: dict, devices: int):
  env = dict(os.environ, WORKDIR=str(workdir), COMMAND=command, REMOTE_VENV=sys.prefix,
             LOCAL_ROOT=str(tmp_path / "hosts"), LOCAL_DEVICES=str(devices),
             LOCAL_XLA_FLAGS=" ".join(f for f in xla_flags(devices).split()
                                      if "device_count" not in f))
  env.pop("XLA_FLAGS", None)
  args = [f"--config.{key}={value}" for key, value in overrides.items()]
  proc = subprocess.run(["bash", str(SCRIPTS / "launch.sh"), "--local", str(local),
                         "configs/tiny.py", *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  logs = [pathlib.Path(line.split(": log ", 1)[1]) for line in proc.stdout.splitlines()
          if ": log " in line]
  assert len(logs) == local, proc.stdout
  return [log.read_text() for log in logs]


def test_local_launch_runs_a_tiny_job(tmp_path, smollm2_gguf, minilm_dir, ml100k_dir):
  writer = serve_fixtures.tiny_writer_dir(tmp_path / "writer", smollm2_gguf)
  cfg = serve_fixtures.serve_config(writer, minilm_dir, ml100k_dir)
  overrides = {key: cfg[section][field] for key in (
      "encoder.path", "decoder.path", "data.movielens_dir", "data.history_len",
      "data.prompt_max_len", "data.decoder_max_len", "data.max_users",
      "decoder.embed_batch_size", "rl.response_length", "rl.num_lm_updates",
      "rl.num_ppo_epochs", "cl.num_emb_updates", "train.cl_users", "eval.greedy",
      "eval.max_users", "checkpoint.enabled", "checkpoint.every_steps", "logging.tensorboard")
      for section, field in [key.split(".")]}
  overrides["eval.baselines"] = "()"
  workdir = tmp_path / "run"
  # Two processes x 2 devices, as on a 2-host slice: one job, one report from process 0.
  logs = _launch(tmp_path, 2, "train", workdir, overrides, devices=2)
  assert "results:" in logs[0] and "results:" not in logs[1], logs[0][-3000:]
  assert (workdir / "results.json").is_file() and (workdir / "checkpoints").is_dir()
  for worker, log in enumerate(logs):
    # Each worker's pid file and latest-log link, as teardown.sh and logs.sh expect them.
    home = tmp_path / "hosts" / f"worker-{worker}" / "langptune-logs"
    assert (home / "run.pid").is_file() and (home / "latest.log").read_text() == log


def test_local_launch_joins_two_processes_with_the_arguments(tmp_path):
  logs = _launch(tmp_path, 2, "info", tmp_path / "run",
                 {"data.instruction": INSTRUCTION, "mesh.data": 1, "mesh.fsdp": 4}, devices=2)
  for index, log in enumerate(logs):
    assert f"process {index} of 2, 2 local" in log, log[-3000:]
    assert "devices: 4 x" in log and "mesh: data=1 x fsdp=4" in log, log[-3000:]
    assert f"data.instruction = {INSTRUCTION!r}" in log
    assert f"workdir: {tmp_path / 'run'}" in log


def test_launch_rejects_a_bad_local_count(tmp_path):
  proc = subprocess.run(["bash", str(SCRIPTS / "launch.sh"), "--local", "two", "configs/tiny.py"],
                        env=dict(os.environ, WORKDIR=str(tmp_path)), capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("error: --local N: N must be a positive number of processes, "
                                 "got 'two'")


def test_slurm_dry_run_environment_of_every_task(tmp_path):
  env = dict(os.environ, DRY_RUN="1", SLURM_JOB_ID="42", SLURM_NNODES="3",
             SLURM_JOB_NODELIST="gpu-a,gpu-b,gpu-c", SLURM_SUBMIT_DIR="/shared/lpt")
  env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
  proc = subprocess.run(["bash", str(SCRIPTS / "slurm_gpu.sbatch"), "configs/llama3_8b_movies_tv.py",
                         "--config.mesh.fsdp=24", f"--config.data.instruction={INSTRUCTION}"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  workdir = "/shared/lpt/runs/llama3_8b_movies_tv-42"
  assert lines[0] == f"job 42: 3 nodes, coordinator gpu-a:8476, workdir {workdir}"
  assert lines[1].startswith("srun: srun --ntasks=3 --ntasks-per-node=1 --kill-on-bad-exit=1")
  tasks = [line for line in lines if line.startswith("task ")]
  assert len(tasks) == 3
  for procid, line in enumerate(tasks):
    fields = dict(re.findall(r"(\w+)=(\S+)", line.split(" exec:")[0]))
    assert fields == {"JAX_COORDINATOR_ADDRESS": "gpu-a:8476", "JAX_NUM_PROCESSES": "3",
                      "JAX_PROCESS_ID": str(procid), "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
    argv = subprocess.run(["bash", "-c", f"printf '%s\\n'{line.split(' exec:')[1]}"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    assert argv == ["/shared/lpt/.venv/bin/langptune-jax", "train",
                    "--config=configs/llama3_8b_movies_tv.py", f"--workdir={workdir}",
                    "--config.distributed.initialize=True", "--config.mesh.fsdp=24",
                    f"--config.data.instruction={INSTRUCTION}"]
