"""Multi-host helpers, and a real 2-process run (coordinator on 127.0.0.1).

The 2-process test starts two Python processes with 2 CPU devices each. They
join through ``distributed.initialize``, each feeds only its own rows of every
global batch, and together they run one CL update of a tiny BERT embedder and
one RLSO update pass (rewards shaped by KL and whitened, the REBEL loss
over all pairs, one AdamW step) of a tiny LoRA decoder on a data=2 x fsdp=2 mesh. Both must end
with identical parameters and gradients, equal to what one process computes with the same mesh
shape, and their user shards must be disjoint and cover every user.

Run as a script (``python tests/test_distributed.py worker PID PORT OUT``),
this file is the worker.
"""

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import types

import pytest

NUM_USERS = 30
CL_ROWS = 8
PROMPTS, GROUP = 4, 2


# --- the computation both the workers and the single-process reference run ---

def _iteration(mesh):
  """One CL update and one RLSO iteration; returns (flat params dict, metrics)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from langptune_jax import parallel
  from langptune_jax.models import bert, embedder, lora, presets, transformer
  from langptune_jax.train import contrastive, rlso
  from langptune_jax.train import state as state_lib

  opt = types.SimpleNamespace(lr=1e-3, lr_schedule="constant", warmup_steps=0, weight_decay=0.0,
                              adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6, max_grad_norm=0.0)
  rng = np.random.default_rng(0)  # the same global data on every process

  def batch(arrays):  # each process places only its own rows of the global batch
    return parallel.global_batch(arrays, mesh)

  # CL: InfoNCE on a tiny BERT embedder.
  bcfg = dataclasses.replace(presets.bert_config("tiny-bert"), num_layers=1)
  emb = embedder.Embedder(bert.Bert(bcfg, rngs=nnx.Rngs(0)), family="bert", pooling="mean")
  cl_state = state_lib.TrainState.create(emb, state_lib.adamw(opt, 10), nnx.Param, mesh)
  length = 12
  cl_data = {"profile_tokens": rng.integers(1, bcfg.vocab_size, (CL_ROWS, length), np.int32),
             "item_tokens": rng.integers(1, bcfg.vocab_size, (CL_ROWS, length), np.int32),
             "profile_mask": np.arange(length)[None] < rng.integers(3, length, (CL_ROWS, 1)),
             "item_mask": np.arange(length)[None] < rng.integers(3, length, (CL_ROWS, 1)),
             "item_ids": rng.permutation(100)[:CL_ROWS].astype(np.int32)}
  cl_data = {k: cl_data[k] for k in contrastive.BATCH_KEYS}
  cl_step = contrastive.make_cl_step(cl_state, mesh, temperature=0.1)
  cl_state.state, cl_metrics = cl_step(cl_state.state, batch(cl_data))

  # RLSO: tiny LoRA decoder; rollout tokens are given (sampling has its own tests).
  dcfg = presets.decoder_config("tiny-llama", num_layers=1)
  model = transformer.Decoder(dcfg, rngs=nnx.Rngs(1))
  lora.apply_lora(model, targets=("q", "v", "down"), rank=4, alpha=8.0, rngs=nnx.Rngs(2))
  rl_state = state_lib.TrainState.create(model, state_lib.adamw(opt, 10), nnx.LoRAParam, mesh)
  settings = rlso.RLSOSettings(group_size=GROUP, eta=1.0, kl_coef=0.1, whiten=True,
                               temperature=1.0, micro_batch_size=0)
  rows, p, r = PROMPTS * GROUP, 8, 6
  prompt = np.repeat(rng.integers(3, dcfg.vocab_size, (PROMPTS, p), np.int32), GROUP, axis=0)
  prompt_mask = np.repeat(np.arange(p)[None] >= rng.integers(0, 4, (PROMPTS, 1)), GROUP, axis=0)
  seq = {"prompt_tokens": prompt, "prompt_mask": prompt_mask,
         "response_tokens": rng.integers(3, dcfg.vocab_size, (rows, r), np.int32),
         "response_mask": np.arange(r)[None] < rng.integers(2, r + 1, (rows, 1))}
  # Rollout-time log-probs and rewards as the loop would have them (the
  # log-prob step is exercised by the sampling and RLSO tests).
  logp_old = -rng.random(rows).astype(np.float32) * 20
  logp_ref = logp_old - 0.1 * rng.random(rows).astype(np.float32)
  task_reward = rng.random(rows).astype(np.float32)
  total, kl = rlso.shaped_rewards(jnp.asarray(task_reward), jnp.asarray(logp_old),
                                  jnp.asarray(logp_ref), settings)
  pass_batch = dict(seq, logp_old=logp_old, total_reward=np.asarray(total),
                    task_reward=task_reward, kl=np.asarray(kl))
  pass_batch = {k: pass_batch[k] for k in rlso.PASS_KEYS}
  pass_batch = batch(pass_batch)

  # The RLSO gradient itself (one AdamW step from zero moments is ~lr * sign(g) and hides
  # a wrongly scaled gradient).
  @jax.jit
  def rl_grads(state, b):
    with parallel.use_mesh(mesh):
      policy, _ = nnx.merge(rl_state.graphdef, state)
      return rlso.rlso_loss_and_grads(policy, rl_state.wrt, b, settings)[2]

  grads = rl_grads(rl_state.state, pass_batch)
  rl_pass = rlso.make_rlso_pass(rl_state, mesh, settings)
  rl_state.state, rl_metrics = rl_pass(rl_state.state, pass_batch)

  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  host = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
  params = {}
  for name, tree in (("cl", nnx.state(cl_state.model, nnx.Param)),
                     ("rl", nnx.state(rl_state.model, nnx.Param)), ("rl_grad", grads)):
    full = multihost_utils.process_allgather(tree, tiled=True)
    for path, value in nnx.to_flat_state(full):
      params[f"{name}/" + "/".join(map(str, path))] = np.asarray(value.get_value())
  metrics = {"cl_loss": float(host(cl_metrics["loss"])), "rl_loss": float(host(rl_metrics["loss"])),
             "cl_grad_norm": float(host(cl_metrics["grad_norm"])),
             "rl_kl": float(host(rl_metrics.get("kl", 0.0)))}
  return params, metrics


def _worker(pid: int, port: int, out: str) -> None:
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  from cpu_devices import xla_flags  # pylint: disable=g-import-not-at-top
  os.environ["XLA_FLAGS"] = xla_flags(2)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np

  from langptune_jax import distributed, parallel

  jax.config.update("jax_default_matmul_precision", "highest")
  dist = types.SimpleNamespace(initialize=True, coordinator_address=f"127.0.0.1:{port}",
                               num_processes=2, process_id=pid)
  assert distributed.initialize(dist, log=lambda _: None)
  assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
  mesh = parallel.make_mesh(types.SimpleNamespace(data=2, fsdp=2, tensor=1))
  params, metrics = _iteration(mesh)
  users = distributed.shard_indices(NUM_USERS)
  np.savez(os.path.join(out, f"params_{pid}.npz"), **params)
  with open(os.path.join(out, f"result_{pid}.json"), "w") as f:
    json.dump({"users": users.tolist(), "metrics": metrics,
               "cl_rows": [distributed.local_rows(CL_ROWS, mesh).start,
                           distributed.local_rows(CL_ROWS, mesh).stop],
               "coordinator": distributed.is_coordinator()}, f)
  distributed.sync("done")
  distributed.shutdown()


# --- tests --------------------------------------------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_train_identically(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np

  from langptune_jax import parallel

  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  procs = [subprocess.Popen([sys.executable, __file__, "worker", str(pid), str(port),
                             str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for pid in range(2)]
  # The same iteration in this process, on a mesh of the same shape, while the
  # workers run.
  mesh = parallel.make_mesh(types.SimpleNamespace(data=2, fsdp=2, tensor=1),
                            devices=jax.devices()[:4])
  expected, metrics = _iteration(mesh)
  logs = []
  for proc in procs:
    try:
      logs.append(proc.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      pytest.fail("a worker did not finish within 400 s")
  for pid, proc in enumerate(procs):
    assert proc.returncode == 0, f"worker {pid} failed:\n{logs[pid][-3000:]}"

  results = [json.loads((tmp_path / f"result_{pid}.json").read_text()) for pid in range(2)]
  params = [dict(np.load(tmp_path / f"params_{pid}.npz")) for pid in range(2)]
  # Disjoint user shards that together cover everyone; disjoint batch rows.
  users = [set(r["users"]) for r in results]
  assert not users[0] & users[1] and users[0] | users[1] == set(range(NUM_USERS))
  rows = sorted(tuple(r["cl_rows"]) for r in results)
  assert rows == [(0, CL_ROWS // 2), (CL_ROWS // 2, CL_ROWS)]
  assert [r["coordinator"] for r in results] == [True, False]
  # Identical parameters and metrics on both processes.
  assert params[0].keys() == params[1].keys() and len(params[0]) > 10
  for key in params[0]:
    np.testing.assert_array_equal(params[0][key], params[1][key], err_msg=key)
  assert results[0]["metrics"] == results[1]["metrics"]

  # Multi-process results equal the single-process ones.
  assert expected.keys() == params[0].keys()
  assert any(k.startswith("rl_grad/") for k in expected)
  for key in expected:
    scale = np.abs(expected[key]).max() if key.startswith("rl_grad/") else 1.0
    np.testing.assert_allclose(params[0][key], expected[key], rtol=1e-5, atol=1e-6 * scale,
                               err_msg=key)
  for key, value in metrics.items():
    assert results[0]["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
  # The update did change the trained parameters.
  lora_b = [k for k in expected if k.startswith("rl/") and k.endswith("lora_b")]
  assert lora_b and any(np.abs(expected[k]).max() > 0 for k in lora_b)
  grad_b = [k for k in expected if k.startswith("rl_grad/") and k.endswith("lora_b")]
  assert grad_b and all(np.abs(expected[k]).max() > 1e-6 for k in grad_b)


def test_cluster_spec_from_config_and_environment(monkeypatch):
  from langptune_jax import distributed  # pylint: disable=g-import-not-at-top
  for name in (distributed.ENV_ADDRESS, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  off = types.SimpleNamespace(initialize=False, coordinator_address="", num_processes=0,
                              process_id=-1)
  assert distributed.cluster_spec(off) is None and distributed.cluster_spec(None) is None
  assert distributed.initialize(off) is False  # single process: nothing to join
  auto = distributed.cluster_spec(types.SimpleNamespace(**dict(vars(off), initialize=True)))
  assert auto.source == "auto" and auto.coordinator_address == ""
  cfg = types.SimpleNamespace(initialize=True, coordinator_address="10.0.0.2:1234",
                              num_processes=4, process_id=3)
  assert distributed.cluster_spec(cfg) == distributed.ClusterSpec("10.0.0.2:1234", 4, 3, "config")
  with pytest.raises(ValueError, match=r"distributed.process_id=4: must be in \[0, 4\)"):
    distributed.cluster_spec(types.SimpleNamespace(**dict(vars(cfg), process_id=4)))
  monkeypatch.setenv(distributed.ENV_ADDRESS, "host0:8476")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID must be set"):
    distributed.cluster_spec(off)
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, "x")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='x': expected an integer"):
    distributed.cluster_spec(off)
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, "1")
  assert distributed.cluster_spec(off) == distributed.ClusterSpec("host0:8476", 2, 1,
                                                                  "environment")
  # The config wins over the environment.
  assert distributed.cluster_spec(cfg).source == "config"


def test_shard_indices_are_disjoint_and_balanced():
  from langptune_jax import distributed  # pylint: disable=g-import-not-at-top
  for n, procs in ((30, 2), (10, 4), (3, 4), (0, 2)):
    shards = [distributed.shard_indices(n, pid, procs) for pid in range(procs)]
    assert sorted(i for s in shards for i in s.tolist()) == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_local_rows_single_process():
  import jax  # pylint: disable=g-import-not-at-top

  from langptune_jax import distributed, parallel
  mesh = parallel.make_mesh(types.SimpleNamespace(data=4, fsdp=2, tensor=1), devices=jax.devices())
  assert distributed.local_rows(16, mesh) == slice(0, 16)  # one process feeds everything
  assert distributed.is_coordinator()
  assert "process 0/1" in distributed.describe()


if __name__ == "__main__":
  if len(sys.argv) == 5 and sys.argv[1] == "worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  else:
    sys.exit("usage: test_distributed.py worker PID PORT OUTDIR")
