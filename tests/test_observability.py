"""Metrics files read back, progress output in logs, and XLA traces for a step window."""

import io
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from langptune_jax import observability as obs


def test_metrics_read_back_from_jsonl_and_tensorboard(tmp_path):
  with obs.MetricsWriter(tmp_path) as writer:
    writer.write(1, {"loss": jnp.float32(2.5), "reward": np.array([0.25]), "count": 3}, prefix="rl")
    writer.write(2, {"loss": 1.5, "kl": float("nan")}, prefix="rl")
    writer.write(2, {"ndcg@10": 0.125})
    writer.write_text(2, "profiles/sample", "likes sci-fi")
  rows = obs.read_jsonl(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 2, 2]
  assert rows[0]["rl/loss"] == 2.5 and rows[0]["rl/reward"] == 0.25 and rows[0]["rl/count"] == 3.0
  assert rows[1]["rl/kl"] == "nan"
  assert rows[2]["ndcg@10"] == 0.125
  assert rows[3]["profiles/sample"] == "likes sci-fi"
  scalars = obs.read_scalars(writer.tensorboard_dir)
  assert scalars["rl/loss"] == [(1, 2.5), (2, 1.5)]
  assert scalars["rl/reward"] == [(1, 0.25)]
  assert scalars["ndcg_10"] == [(2, 0.125)]  # TensorBoard tags allow [A-Za-z0-9_./-] only
  assert np.isnan(scalars["rl/kl"][0][1])


def test_jsonl_lines_are_flushed_before_close(tmp_path):
  writer = obs.MetricsWriter(tmp_path, tensorboard=False)
  writer.write(7, {"loss": 0.5})
  line = (tmp_path / obs.JSONL_NAME).read_text().strip()
  assert json.loads(line)["loss"] == 0.5
  writer.close()
  assert not (tmp_path / obs.TENSORBOARD_DIR).exists()


def test_appending_runs_and_bad_values(tmp_path):
  for step in (1, 2):
    with obs.MetricsWriter(tmp_path, tensorboard=False) as writer:
      writer.write(step, {"x": step})
  assert [r["x"] for r in obs.read_jsonl(tmp_path / obs.JSONL_NAME)] == [1.0, 2.0]
  with obs.MetricsWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(ValueError, match=r"metric 'eval/scores': expected a scalar .* shape \(3,\)"):
      writer.write(3, {"scores": np.ones(3)}, prefix="eval")


def test_disabled_writer_writes_nothing(tmp_path):
  with obs.MetricsWriter(tmp_path / "run", enabled=False) as writer:
    writer.write(1, {"loss": 1.0})
  assert not (tmp_path / "run").exists()
  with pytest.raises(FileNotFoundError, match="metrics file .* not found"):
    obs.read_jsonl(tmp_path / "run")
  with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
    obs.read_scalars(tmp_path)


def test_progress_logs_every_tenth_without_carriage_returns():
  stream = io.StringIO()
  items = list(obs.progress(range(100), desc="embed items", stream=stream))
  assert items == list(range(100))
  lines = stream.getvalue().splitlines()
  assert "\r" not in stream.getvalue()
  assert len(lines) == 10, lines
  assert lines[0].startswith("embed items:  10% 10/100")
  assert lines[-1].startswith("embed items: 100% 100/100") and lines[-1].endswith("done")


def test_progress_small_and_unknown_totals():
  stream = io.StringIO()
  assert list(obs.progress(iter("abc"), desc="gen", stream=stream)) == ["a", "b", "c"]
  assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[-1]]
  assert stream.getvalue().startswith("gen: 3 [")
  stream = io.StringIO()
  list(obs.progress(range(3), desc="three", stream=stream))
  assert [ln.split(" [")[0] for ln in stream.getvalue().splitlines()] == [
      "three:  33% 1/3", "three:  67% 2/3", "three: 100% 3/3"]


def test_progress_driven_by_hand():
  stream = io.StringIO()
  with obs.progress(desc="users", total=40, stream=stream) as bar:
    for _ in range(4):
      bar.update(10)
  lines = [ln.split(" [")[0] for ln in stream.getvalue().splitlines()]
  assert lines == ["users:  25% 10/40", "users:  50% 20/40", "users:  75% 30/40", "users: 100% 40/40"]
  assert stream.getvalue().rstrip().endswith("done")


def test_progress_on_a_terminal_is_a_tqdm_bar():
  stream = io.StringIO()
  bar = obs.progress(range(5), desc="bar", stream=stream, interactive=True)
  assert list(bar) == list(range(5))
  assert "\r" in stream.getvalue() and "5/5" in stream.getvalue()
  assert obs.progress(range(3), disable=True) == range(3)


def _profile(enabled=True, start=2, num=2):
  return ml_collections.ConfigDict({"enabled": enabled, "start_step": start, "num_steps": num})


def test_profile_window_records_a_trace(tmp_path):
  step_fn = jax.jit(lambda x: jnp.tanh(x @ x))
  x = jnp.ones((32, 32))
  active = []
  with obs.ProfileWindow(_profile(start=2, num=2), tmp_path / "trace") as window:
    for step in range(6):
      window.step(step, sync=x)
      active.append(window.active)
      with window.annotate(step):
        x = step_fn(x)
  assert active == [False, False, True, True, False, False]
  files = window.trace_files()
  assert len(files) == 1 and files[0].name.endswith(".xplane.pb") and files[0].stat().st_size > 0


def test_disabled_profile_window_records_nothing(tmp_path):
  window = obs.ProfileWindow(_profile(enabled=False), tmp_path / "trace")
  for step in range(4):
    window.step(step)
  window.close()
  assert not window.active and not (tmp_path / "trace").exists()
