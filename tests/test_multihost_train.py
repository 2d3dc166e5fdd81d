"""The real `langptune-jax train` as 2 processes x 4 CPU devices equals 1 process x 8 devices.

Tiny random models (a 1-block Llama over the SmolLM2 vocabulary, a 1-layer BERT
over the MiniLM vocabulary) on a small MovieLens-100K slice; the dataset is
prepared once. One module-scoped fixture runs, each as its own command:

  two       2 processes x 4 devices, 2 iterations (zero-shot evaluation with
            baselines; per iteration CL phase, RL phase, evaluation, checkpoint;
            the final evaluation);
  straight  the same config as 1 process x 8 devices;
  resumed   `two`'s run directory as it was after its first iteration (later
            checkpoints removed), continued by 1 process x 8 devices: the
            checkpoint changes topology on restore;
  resumed_on_2  the same, continued by 1 process x 2 devices.

A second pair of 2-process runs (one iteration, 4 RL updates) gets SIGTERM on both
processes in its RL phase: both exit 0 at one step boundary, and the resumed run ends
where an uninterrupted 2-process run does.

Parameters and optimizer moments are read from the last checkpoint of each run,
metrics (evaluations and per-step training scalars) from the loop state saved
with it.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import serve_fixtures
from cpu_devices import xla_flags

pytestmark = pytest.mark.multiprocess

REPO = pathlib.Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5
TIMEOUT_S = 600

CONFIG = """
import sys
sys.path.insert(0, {configs!r})
import tiny


def get_config():
  c = tiny.get_config()
  c.encoder.path, c.decoder.path = {encoder!r}, {decoder!r}
  c.data.movielens_dir = {ml100k!r}
  c.data.dataset_dir = {dataset!r}
  c.data.history_len = 3
  c.data.prompt_max_len = 192
  c.data.max_users = 48
  c.rl.response_length = 8
  c.rl.num_lm_updates = 1
  c.rl.num_ppo_epochs = 1
  # Whitening divides by the spread of 16 rewards, about 0.01 on random models: float
  # rounding that differs between 2x4 and 1x8 reductions would then move a target's rank in
  # the second iteration and the loss by ~1e-3. Without it a moved rank stays below 1e-5.
  c.rl.whiten_rewards = False
  c.cl.num_emb_updates = 2
  c.train.cl_users = 16
  c.train.eval_every_iterations = 1
  c.eval.max_users = 8
  c.eval.baselines = ("reference_query", "popularity", "random")
  c.checkpoint.enabled = True
  c.checkpoint.every_steps = 100  # only phase-boundary and final checkpoints
  c.checkpoint.max_to_keep = 20
  c.train.num_iterations = 2
  c.logging.tensorboard = True
  return c
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def tiny_bert_dir(path: pathlib.Path, tokenizer_dir: str) -> str:
  """A 1-layer random BERT saved as an HF directory with the MiniLM tokenizer."""
  import torch
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=128)
  transformers.BertModel(config).save_pretrained(path)
  tokenizer.save_pretrained(str(path))
  return str(path)


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("JAX_") and k != "XLA_FLAGS"}
  env.update(XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)
  return env


def _command(name: str, config: pathlib.Path, workdir: pathlib.Path, *flags: str) -> list[str]:
  return [sys.executable, "-m", "langptune_jax.main", name, f"--config={config}",
          f"--workdir={workdir}", *flags]


def _wait(procs: list[subprocess.Popen], what: str) -> list[str]:
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for proc in procs:
      proc.kill()
    pytest.fail(f"{what} did not finish within {TIMEOUT_S} s")
  for i, (proc, log) in enumerate(zip(procs, logs)):
    assert proc.returncode == 0, f"{what} (process {i}) failed:\n{log[-4000:]}"
  return logs


def _start(argv, env) -> subprocess.Popen:
  return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def start_two_processes(config, workdir, *flags) -> list[subprocess.Popen]:
  port = _free_port()
  return [_start(_command("train", config, workdir, "--config.distributed.initialize=true",
                          *flags),
                 _env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                      JAX_PROCESS_ID=str(pid)))
          for pid in range(2)]


def train_two_processes(config, workdir, *flags) -> list[str]:
  return _wait(start_two_processes(config, workdir, *flags), "2-process train")


def train_one_process(config, workdir, *flags, devices: int = 8) -> str:
  return _wait([_start(_command("train", config, workdir, *flags), _env(devices))],
               f"1-process train on {devices} devices")[0]


@pytest.fixture(scope="module")
def job(tmp_path_factory, smollm2_gguf, minilm_dir, ml100k_dir) -> tuple[pathlib.Path, pathlib.Path]:
  """(config file, scratch folder): the tiny models and the dataset, prepared once."""
  tmp = tmp_path_factory.mktemp("multihost")
  encoder = serve_fixtures.tiny_writer_dir(tmp / "encoder", smollm2_gguf)
  decoder = tiny_bert_dir(tmp / "decoder", minilm_dir)
  config = tmp / "config.py"
  config.write_text(CONFIG.format(configs=str(REPO / "configs"), encoder=encoder,
                                  decoder=decoder, ml100k=str(ml100k_dir),
                                  dataset=str(tmp / "dataset")))
  _wait([_start(_command("prepare", config, tmp / "prepare"), _env(1))], "prepare")
  return config, tmp


@pytest.fixture(scope="module")
def runs(job):
  config, tmp = job
  dirs = {name: tmp / name for name in ("two", "straight", "resumed", "resumed_on_2")}
  logs = {"two": train_two_processes(config, dirs["two"]),
          "straight": [train_one_process(config, dirs["straight"])]}
  for name, devices in (("resumed", 8), ("resumed_on_2", 2)):
    shutil.copytree(dirs["two"], dirs[name])
    after_first = first_checkpoint_at(dirs[name], {"iteration": 1, "phase": "cl", "step": 0})
    for step in checkpoint_steps(dirs[name]):
      if step > after_first:
        shutil.rmtree(dirs[name] / "checkpoints" / str(step))
    logs[name] = [train_one_process(config, dirs[name], devices=devices)]
  return {name: (path, logs[name]) for name, path in dirs.items()}


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def loop_state(workdir: pathlib.Path, step: int) -> dict:
  return json.loads((workdir / "checkpoints" / str(step) / "loop" / "metadata").read_text())


def first_checkpoint_at(workdir: pathlib.Path, position: dict) -> int:
  return next(s for s in checkpoint_steps(workdir) if loop_state(workdir, s)["position"] == position)


def last_checkpoint(workdir: pathlib.Path) -> tuple[dict, dict]:
  """({name: array} of both train states, loop state) of a run's newest checkpoint."""
  import jax
  import orbax.checkpoint as ocp
  from absl import logging
  logging.set_verbosity(logging.ERROR)  # orbax warns about metadata a plain restore ignores
  step = workdir / "checkpoints" / str(checkpoint_steps(workdir)[-1])
  arrays = {}
  with ocp.PyTreeCheckpointer() as checkpointer:
    for part in ("encoder", "decoder"):
      meta = checkpointer.metadata(step / part)
      meta = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
      # Host arrays: this process has another topology than the one that saved.
      args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
      tree = checkpointer.restore(step / part, restore_args=args)
      for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arrays[part + jax.tree_util.keystr(path)] = np.asarray(value)
  loop = json.loads((step / "loop" / "metadata").read_text())
  return arrays, loop


def numbers(loop: dict) -> dict[str, float]:
  """Every evaluation metric and training scalar of a loop state (not timings), flat."""
  out = {}
  for i, entry in enumerate(loop["history"]):
    for section in ("results", "intervals", "vs_zero_shot"):
      flat = [((entry["tag"], entry["split"], section), entry[section])]
      while flat:
        key, node = flat.pop()
        if isinstance(node, dict):
          flat += [(key + (k,), v) for k, v in node.items()]
        else:
          out["/".join(map(str, (i,) + key))] = float(node)
  for curve in loop["curves"]:
    for key, value in curve.items():
      if key not in ("phase", "step") and "/" not in key:  # "cl/step_time_s": timings
        out[f"{curve['phase']}/{curve['step']}/{key}"] = float(value)
  return out


def compare(a: pathlib.Path, b: pathlib.Path) -> dict:
  """Largest differences between two runs' end states, and whether they are bit-identical."""
  (params_a, loop_a), (params_b, loop_b) = last_checkpoint(a), last_checkpoint(b)
  assert params_a.keys() == params_b.keys() and len(params_a) > 10
  nums_a, nums_b = numbers(loop_a), numbers(loop_b)
  assert nums_a.keys() == nums_b.keys() and len(nums_a) > 100
  param_diff = max(float(np.abs(params_a[k].astype(np.float64) - params_b[k]).max(initial=0.0))
                   for k in params_a)
  metric_diff = max(abs(nums_a[k] - nums_b[k]) for k in nums_a)
  worst = max(nums_a, key=lambda k: abs(nums_a[k] - nums_b[k]))
  return {"param_diff": param_diff, "metric_diff": metric_diff, "worst_metric": worst,
          "identical": all(np.array_equal(params_a[k], params_b[k]) for k in params_a)
          and nums_a == nums_b, "loops": (loop_a, loop_b), "params": (params_a, params_b)}


HISTORY = [("zero_shot", "val"), ("zero_shot", "test"), ("iteration_1", "val"),
           ("iteration_2", "val"), ("final", "test")]


def test_two_processes_run_the_whole_schedule(runs):
  workdir, logs = runs["two"]
  _, loop = last_checkpoint(workdir)
  assert loop["position"] == {"iteration": 2, "phase": "cl", "step": 0}
  assert [(e["tag"], e["split"]) for e in loop["history"]] == HISTORY
  assert [c["phase"] for c in loop["curves"]] == ["cl", "cl", "rl"] * 2
  # Only the coordinator reports and writes: one table, one line per metric record.
  assert "| method |" in logs[0] and "| method |" not in logs[1]
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  keys = [tuple(sorted(set(json.loads(line)) - {"time"})) + (json.loads(line)["step"],)
          for line in lines]
  assert len(keys) == len(set(keys)) > 5
  for name in ("results.md", "results.json", "curves.png", "metrics.png",
               "profiles/zero_shot.jsonl", "profiles/final.jsonl"):
    assert (workdir / name).is_file(), name
  assert not list(workdir.rglob("*.tmp")) and list((workdir / "tensorboard").iterdir())
  records = (workdir / "profiles" / "final.jsonl").read_text().splitlines()
  assert len(records) == loop["history"][-1]["users"]


def test_two_processes_equal_one_process(runs):
  result = compare(runs["two"][0], runs["straight"][0])
  print(f"2x4 vs 1x8: parameters max |diff| {result['param_diff']:.3g}, metrics max |diff| "
        f"{result['metric_diff']:.3g} ({result['worst_metric']}), "
        f"bit-identical: {result['identical']}")
  assert result["param_diff"] <= TOLERANCE
  assert result["metric_diff"] <= TOLERANCE, result["worst_metric"]
  two, one = result["loops"]
  # The same sampled profiles and target ranks: the random draws ignore the process count.
  assert two["zero_shot_texts"] == one["zero_shot_texts"]
  assert two["reference_ranks"] == one["reference_ranks"]
  params_two, _ = result["params"]
  adapters = [k for k in params_two if k.startswith("encoder") and "lora_b" in k]
  assert adapters and any(np.abs(params_two[k]).max() > 0 for k in adapters)  # it trained


def test_two_process_checkpoint_resumes_in_one_process(runs):
  resumed, logs = runs["resumed"]
  _, loop = last_checkpoint(resumed)
  assert [(e["tag"], e["split"]) for e in loop["history"]] == HISTORY
  assert "| method |" in logs[0]
  # The copied log holds `two`'s 2 iterations; the resumed run added only the second again.
  keys = [k for line in (resumed / "metrics.jsonl").read_text().splitlines()
          for k in json.loads(line)]
  losses = [k.split("/")[0] for k in keys if k.endswith("/loss") and k[:3] in ("cl/", "rl/")]
  assert (losses.count("cl"), losses.count("rl")) == (2 * 2 + 2, 2 + 1)
  result = compare(resumed, runs["straight"][0])
  print(f"2x4 then 1x8 vs 1x8 throughout: parameters max |diff| {result['param_diff']:.3g}, "
        f"metrics max |diff| {result['metric_diff']:.3g}, bit-identical: {result['identical']}")
  assert result["param_diff"] <= TOLERANCE
  assert result["metric_diff"] <= TOLERANCE, result["worst_metric"]


def test_two_process_checkpoint_resumes_on_two_devices(runs):
  resumed, _ = runs["resumed_on_2"]
  _, loop = last_checkpoint(resumed)
  assert loop["position"] == {"iteration": 2, "phase": "cl", "step": 0}
  assert [(e["tag"], e["split"]) for e in loop["history"]] == HISTORY
  result = compare(resumed, runs["straight"][0])
  print(f"2x4 then 1x2 vs 1x8 throughout: parameters max |diff| {result['param_diff']:.3g}, "
        f"metrics max |diff| {result['metric_diff']:.3g}")
  # Reductions over 2 devices instead of 8 round differently: the same run, not the same bits.
  assert result["param_diff"] <= 10 * TOLERANCE
  assert result["metric_diff"] <= 10 * TOLERANCE, result["worst_metric"]


# One iteration with 4 RL updates, so that a step boundary falls inside the RL phase.
PREEMPT_FLAGS = ("--config.train.num_iterations=1", "--config.rl.num_lm_updates=4",
                 "--config.eval.baselines=()")


def test_sigterm_to_both_processes_in_the_rl_phase_resumes_exactly(job):
  config, tmp = job
  straight, workdir = tmp / "preempt_straight", tmp / "preempted"
  train_two_processes(config, straight, *PREEMPT_FLAGS)
  procs = start_two_processes(config, workdir, *PREEMPT_FLAGS)
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + TIMEOUT_S
  while not (metrics.exists() and '"rl/' in metrics.read_text()):
    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
      for proc in procs:
        proc.kill()
      pytest.fail("the 2-process run ended or timed out before its first RL update:\n"
                  + procs[0].communicate()[0][-3000:])
    time.sleep(0.1)
  for proc in procs:  # what a pod's maintenance event or SLURM's scancel sends every host
    proc.send_signal(signal.SIGTERM)
  logs = _wait(procs, "the preempted 2-process train")
  for log in logs:
    said = [line for line in log.splitlines() if line.startswith("preempted:")]
    assert len(said) == 1 and "run the same command to resume" in said[0], log[-3000:]
  assert not (workdir / "results.md").exists()
  _, loop = last_checkpoint(workdir)
  position = loop["position"]
  assert position["phase"] == "rl" and 1 <= position["step"] < 4, position
  assert all(f"rl step {position['step']}" in log for log in logs)

  train_two_processes(config, workdir, *PREEMPT_FLAGS)
  result = compare(workdir, straight)
  print(f"preempted and resumed vs uninterrupted (2x4 both): parameters max |diff| "
        f"{result['param_diff']:.3g}, metrics max |diff| {result['metric_diff']:.3g}, "
        f"bit-identical: {result['identical']}")
  assert result["param_diff"] <= 1e-6 and result["metric_diff"] <= 1e-6, result["worst_metric"]
  resumed_loop, straight_loop = result["loops"]
  assert resumed_loop["position"] == straight_loop["position"]
  assert [e["results"] for e in resumed_loop["history"]] == [
      e["results"] for e in straight_loop["history"]]
