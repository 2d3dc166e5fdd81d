"""Preemption, a dead peer and a changed topology, each the way it happens on a cluster.

- SIGTERM to a running ``langptune-jax train`` in its RL phase (and to a run in its CL
  phase): exit 0, one line, a checkpoint at a step boundary, and the resumed run ends where
  an uninterrupted one does.
- Two processes (coordinator on 127.0.0.1): SIGTERM to one makes both stop at the same
  step through JAX's preemption sync point; kill -9 of one ends the other within a
  bound set by ``distributed.heartbeat_timeout_seconds``.
- A checkpoint written on 8 devices resumes on 2, and one written on 2 resumes on 8.

Run as a script (``python tests/test_preemption.py worker PID PORT OUT MODE``), this file
is the 2-process worker.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent
HEARTBEAT_S = 10  # distributed.heartbeat_timeout_seconds of the 2-process workers
SLACK_S = 45  # start-up of the survivor's exit, on a loaded 2-core machine


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra):
  import jax  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  # The test session's compilation cache: identical steps compile once across the runs.
  return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
          "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "", **extra}


def _wait_for(predicate, timeout: float, what: str, procs=()):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    for proc in procs:
      if proc.poll() is not None:
        out = proc.stdout.read() if proc.stdout else ""
        pytest.fail(f"a process ended (rc {proc.returncode}) before {what}:\n{out[-3000:]}")
    time.sleep(0.1)
  pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _latest_checkpoint(workdir):
  """(loop JSON, flat trainable params as numpy) of the newest checkpoint in `workdir`."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  from langptune_jax.train import checkpoint as ckpt_lib
  ckpt = ckpt_lib.Checkpointer(str(pathlib.Path(workdir) / "checkpoints"))
  try:
    step = ckpt.latest_step()
    enc, dec, loop, _ = ckpt.restore(step, encoder_target=None, decoder_target=None)
  finally:
    ckpt.close()
  flat = traverse_util.flatten_dict({"encoder": enc["params"], "decoder": dec["params"]})
  return loop, {"/".join(map(str, k)): np.asarray(v) for k, v in flat.items()}


# --- SIGTERM to the train command ---------------------------------------------------------

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, smollm2_gguf, minilm_dir):
  """A 1-block random Llama (SmolLM2 tokenizer) and a 1-layer random BERT (MiniLM tokenizer)."""
  import serve_fixtures  # pylint: disable=g-import-not-at-top
  import torch
  import transformers

  root = tmp_path_factory.mktemp("models")
  encoder = serve_fixtures.tiny_writer_dir(root / "encoder", smollm2_gguf)
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
  torch.manual_seed(0)
  transformers.BertModel(transformers.BertConfig(
      vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "decoder")
  tokenizer.save_pretrained(str(root / "decoder"))
  return encoder, str(root / "decoder")


def _train_args(model_dirs, ml100k_dir, dataset_dir, workdir):
  overrides = {
      "encoder.path": model_dirs[0], "decoder.path": model_dirs[1],
      "data.movielens_dir": ml100k_dir, "data.dataset_dir": dataset_dir,
      "data.history_len": 3, "data.prompt_max_len": 192, "data.max_users": 48,
      "rl.num_lm_updates": 4, "rl.num_ppo_epochs": 1, "rl.response_length": 8,
      "cl.num_emb_updates": 1, "train.cl_users": 8, "eval.max_users": 8, "eval.baselines": "()",
      "eval.bootstrap_samples": 0, "checkpoint.every_steps": 100, "logging.tensorboard": False}
  return ["--config=configs/tiny.py", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in overrides.items())]


def _cli(command, args, **kwargs):
  env = _env(XLA_FLAGS=_xla_flags(8), JAX_DEFAULT_MATMUL_PRECISION="highest")
  return subprocess.Popen([sys.executable, "-m", "langptune_jax.main", command, *args], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **kwargs)


def _xla_flags(n):
  sys.path.insert(0, str(TESTS))
  from cpu_devices import xla_flags  # pylint: disable=g-import-not-at-top
  return xla_flags(n)


def _finish(proc, timeout=600):
  try:
    out = proc.communicate(timeout=timeout)[0]
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail(f"not finished within {timeout} s:\n{proc.communicate()[0][-3000:]}")
  return proc.returncode, out


def _in_rl_phase(workdir):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return path.exists() and '"rl/' in path.read_text()


@pytest.mark.multiprocess
def test_sigterm_in_the_rl_phase_checkpoints_and_resumes_exactly(model_dirs, ml100k_dir,
                                                                   tmp_path):
  # One run at a time: concurrent JAX processes on this 2-core machine have hung at a
  # collective of emulated devices.
  dataset = tmp_path / "dataset"  # prepared by the first run, shared by the others
  code, out = _finish(_cli("train", _train_args(model_dirs, ml100k_dir, dataset,
                                                tmp_path / "straight")))
  assert code == 0, out[-3000:]
  workdir = tmp_path / "run"
  run = _cli("train", _train_args(model_dirs, ml100k_dir, dataset, workdir))
  _wait_for(lambda: _in_rl_phase(workdir), 600, "the first RL update", [run])
  run.send_signal(signal.SIGTERM)
  code, out = _finish(run)
  assert code == 0, out[-3000:]
  said = [line for line in out.splitlines() if line.startswith("preempted:")]
  assert len(said) == 1 and "run the same command to resume" in said[0], out[-3000:]
  assert not (workdir / "results.md").exists()
  loop, _ = _latest_checkpoint(workdir)
  position = loop["position"]
  # A boundary inside the RL phase: after an update, before its last one.
  assert position["phase"] == "rl" and 1 <= position["step"] < 4, position
  assert f"rl step {position['step']}" in said[0]

  code, out = _finish(_cli("train", _train_args(model_dirs, ml100k_dir, dataset, workdir)))
  assert code == 0 and "preempted" not in out, out[-3000:]
  want_loop, want = _latest_checkpoint(tmp_path / "straight")
  got_loop, got = _latest_checkpoint(workdir)
  assert got_loop["position"] == want_loop["position"] == {"iteration": 1, "phase": "cl",
                                                           "step": 0}
  assert want.keys() == got.keys() and len(want) > 4
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6, err_msg=key)
  results = [json.loads((d / "results.json").read_text())["evaluations"]
             for d in (tmp_path / "straight", workdir)]
  assert [e["results"] for e in results[1]] == [e["results"] for e in results[0]]


def test_sigterm_in_the_cl_phase_stops_at_the_next_step_boundary(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import test_faults  # pylint: disable=g-import-not-at-top

  from langptune_jax.train import loop as loop_lib
  straight = test_faults.make_trainer(test_faults.planted_config(), tmp_path / "straight")
  straight.run()
  want = test_faults.params(straight)
  straight.close()
  before = signal.getsignal(signal.SIGTERM)
  trainer = test_faults.make_trainer(test_faults.planted_config(), tmp_path / "run")
  cl_step = trainer.cl_step

  def cl_step_then_sigterm(*args):
    out = cl_step(*args)
    os.kill(os.getpid(), signal.SIGTERM)  # the notice arrives during the first CL update
    return out

  trainer.cl_step = cl_step_then_sigterm
  trainer.run()
  assert trainer.preempted and not trainer.finished
  assert trainer.position == loop_lib.LoopPosition(0, "cl", 1)
  trainer.close()
  assert signal.getsignal(signal.SIGTERM) == before  # the handler lives only as long as the run
  assert _latest_checkpoint(tmp_path / "run")[0]["position"] == {"iteration": 0, "phase": "cl",
                                                                 "step": 1}
  resumed = test_faults.make_trainer(test_faults.planted_config(), tmp_path / "run")
  resumed.run()
  assert resumed.finished and not resumed.preempted
  jax.tree.map(np.testing.assert_array_equal, want, test_faults.params(resumed))
  resumed.close()


# --- two processes: the sync point and a dead peer --------------------------------------------

def _worker(pid: int, port: int, out: str, mode: str) -> None:
  """Steps with a collective each; asks the preemption watch at every step boundary."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, str(REPO))
  sys.path.insert(0, str(TESTS))
  from cpu_devices import xla_flags  # pylint: disable=g-import-not-at-top
  os.environ["XLA_FLAGS"] = xla_flags(2)
  import jax  # pylint: disable=g-import-not-at-top

  from langptune_jax import distributed, parallel, preemption

  dist = types.SimpleNamespace(initialize=True, coordinator_address=f"127.0.0.1:{port}",
                               num_processes=2, process_id=pid,
                               heartbeat_timeout_seconds=HEARTBEAT_S,
                               initialization_timeout_seconds=120)
  distributed.initialize(dist, log=lambda _: None)
  mesh = parallel.make_mesh(types.SimpleNamespace(data=4, fsdp=1, tensor=1))
  total = jax.jit(lambda x: x.sum())
  progress = pathlib.Path(out) / f"steps_{pid}"
  with distributed.exit_on_lost_peer(), preemption.Watch() as watch:
    for step in range(100_000):
      rows = np.arange(8, dtype=np.float32) + step
      # Every process passes the whole global batch; each places only its own rows.
      value = float(total(parallel.global_batch({"x": rows}, mesh)["x"]))
      assert value == 8 * step + 28
      progress.write_text(str(step))
      if watch.reached(step):
        print(f"process {pid} stopped at step {step}", flush=True)
        break
      time.sleep(0.05)
  distributed.sync("done")
  distributed.shutdown()


def _start_workers(tmp_path, mode):
  port = _free_port()
  return [subprocess.Popen([sys.executable, __file__, "worker", str(pid), str(port),
                            str(tmp_path), mode], env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for pid in range(2)]


def _steps_done(tmp_path, pid):
  path = tmp_path / f"steps_{pid}"
  try:
    return int(path.read_text() or -1)
  except (FileNotFoundError, ValueError):
    return -1


@pytest.mark.multiprocess
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  procs = _start_workers(tmp_path, "steps")
  try:
    _wait_for(lambda: min(_steps_done(tmp_path, p) for p in range(2)) >= 3, 300,
              "3 steps on both processes", procs)
    signalled_at = max(_steps_done(tmp_path, p) for p in range(2))
    procs[1].send_signal(signal.SIGTERM)  # one host gets the maintenance notice
    results = [_finish(p, timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for pid, (code, out) in enumerate(results):
    assert code == 0, f"process {pid}:\n{out[-3000:]}"
  stops = [[line for line in out.splitlines() if " stopped at step " in line]
           for _, out in results]
  assert all(len(s) == 1 for s in stops), stops
  steps = [int(s[0].rsplit(" ", 1)[1]) for s in stops]
  assert steps[0] == steps[1] >= signalled_at, (steps, signalled_at)


@pytest.mark.multiprocess
@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "coordinator"])
def test_killed_peer_ends_the_other_process_within_the_bound(tmp_path, victim):
  procs = _start_workers(tmp_path, "steps")
  survivor = procs[1 - victim]
  try:
    _wait_for(lambda: min(_steps_done(tmp_path, p) for p in range(2)) >= 3, 300,
              "3 steps on both processes", procs)
    procs[victim].kill()
    killed_at = time.monotonic()
    code, out = _finish(survivor, timeout=HEARTBEAT_S + SLACK_S + 60)
    elapsed = time.monotonic() - killed_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  print(f"survivor of a killed {['coordinator', 'worker'][victim]}: exit {code} after "
        f"{elapsed:.1f} s")
  assert code != 0 and elapsed < HEARTBEAT_S + SLACK_S, (code, elapsed, out[-3000:])
  # Either its next collective failed (our line, exit 3) or, blocked, JAX ended it once the
  # dead process had missed its heartbeats (JAX's line, abort).
  errors = [line for line in out.splitlines() if line.startswith("error: ")]
  if code == 3:
    assert len(errors) == 1 and "another process of this run died" in errors[0], out[-3000:]
    assert f"process {1 - victim} of 2" in errors[0]
  else:
    assert not errors and "another task died" in out, out[-3000:]


def test_lost_peer_errors_become_one_line(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top

  from langptune_jax import distributed
  gloo = RuntimeError("UNKNOWN: Gloo AllGather failed: [pair.cc:547] Connection closed by peer "
                      "[127.0.0.1]:2976\nmore detail")
  assert distributed.lost_peer_message(gloo) is None  # a single process has no peers
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  line = distributed.lost_peer_message(gloo)
  assert line.startswith("process 1 of 2: another process of this run died") and "\n" not in line
  assert "Connection closed by peer" in line and "resume from the last checkpoint" in line
  assert distributed.lost_peer_message(ValueError("shapes (3,) and (4,) differ")) is None
  with pytest.raises(ValueError, match="differ"), distributed.exit_on_lost_peer():
    raise ValueError("shapes (3,) and (4,) differ")  # any other error propagates as before


# --- topology change ---------------------------------------------------------------------

_DEVICES_RUN = textwrap.dedent("""
  import os, sys
  tests, workdir, n, stop, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
  sys.path.insert(0, tests)
  from cpu_devices import xla_flags
  os.environ["XLA_FLAGS"] = xla_flags(n)
  import jax, numpy as np
  jax.config.update("jax_default_matmul_precision", "highest")
  from flax import traverse_util
  import planted, test_faults
  from langptune_jax import parallel
  from langptune_jax.train import loop

  def flat(trainer):
    tree = {"encoder": trainer.writer_state.trainable_state()["params"],
            "decoder": trainer.ranker_state.trainable_state()["params"]}
    return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}

  # One small evaluation at the start and one at the end; checkpoints at phase ends and the stop.
  cfg = test_faults.planted_config(train__stop_after_steps=stop, checkpoint__every_steps=100,
                                   eval__baselines=(), eval__max_users=8, eval__split="test",
                                   eval__bootstrap_samples=0, train__eval_every_iterations=0)
  tok = planted.word_tokenizer()
  trainer = loop.Trainer(cfg, workdir, data=planted.planted_data(tok),
                         encoder=planted.tiny_encoder(len(tok)),
                         decoder=planted.tiny_decoder(len(tok)), writer_tokenizer=tok,
                         ranker_tokenizer=tok, mesh=parallel.make_mesh(cfg.mesh))
  arrays = {}
  if trainer.restore():
    restored = flat(trainer)
    arrays.update({"restored/" + k: np.asarray(v) for k, v in restored.items()})
    arrays["restored_devices"] = np.array([len(v.sharding.device_set) for v in restored.values()])
  trainer.run()
  arrays.update({"final/" + k: np.asarray(v) for k, v in flat(trainer).items()})
  arrays["finished"] = np.array(trainer.finished)
  trainer.close()
  np.savez(out, **arrays)
""")


def _devices_run(workdir, n, stop, out):
  return subprocess.Popen([sys.executable, "-c", _DEVICES_RUN, str(TESTS), str(workdir), str(n),
                           str(stop), str(out)], env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.mark.multiprocess
def test_checkpoint_resumes_on_another_number_of_devices(tmp_path):
  # One run of 4 updates (2 CL, 2 RL) in three processes, one after another: 8 devices to the
  # end of the CL phase, 2 devices for one RL update, 8 devices to the end.
  chain = ((8, 2), (2, 1), (8, 0))
  runs = []
  for i, (devices, stop) in enumerate(chain):
    code, out = _finish(_devices_run(tmp_path / "run", devices, stop, tmp_path / f"{i}.npz"))
    assert code == 0, out[-3000:]
    runs.append(dict(np.load(tmp_path / f"{i}.npz")))
  assert [bool(r["finished"]) for r in runs] == [False, False, True]
  keys = [k[len("final/"):] for k in runs[0] if k.startswith("final/")]
  assert len(keys) > 4
  for (devices, _), before, after in zip(chain[1:], runs, runs[1:]):
    for key in keys:  # read back exactly, laid out over this process's devices
      np.testing.assert_array_equal(after["restored/" + key], before["final/" + key], key)
    assert devices in after["restored_devices"] and set(after["restored_devices"]) <= {1, devices}
    moved = [k for k in keys if not np.array_equal(after["final/" + k], before["final/" + k])]
    assert moved, f"on {devices} devices the resumed updates changed nothing"
    assert all(np.isfinite(after["final/" + k]).all() for k in keys)


if __name__ == "__main__":
  if len(sys.argv) == 6 and sys.argv[1] == "worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
  else:
    sys.exit("usage: test_preemption.py worker PID PORT OUTDIR MODE")
