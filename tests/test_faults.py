"""Fault injection: damaged checkpoints, two runs on one work directory, bad input files,
lengths the models cannot hold, interrupted exports, the umask, and kill -9 resumes.

Each case breaks something the way a real failure would (a truncated file, a
deleted file, a second process, SIGKILL) on tiny models and small inputs, then
checks the tool reports it in one line and loses or half-writes nothing.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import fixtures_data as fx
import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
sys.path.insert(0, os.path.dirname(__file__))

import planted  # noqa: E402
import tiny  # noqa: E402

from langptune_jax import fs, model_limits, parallel, workdir_lock  # noqa: E402
from langptune_jax.config import ConfigError  # noqa: E402
from langptune_jax.data import builder, core, loader, movielens, prepare, review_scan  # noqa: E402
from langptune_jax.train import checkpoint as ckpt_lib  # noqa: E402
from langptune_jax.train import commands, loop  # noqa: E402
from langptune_jax.weights import export as export_lib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


# --- checkpoints ---------------------------------------------------------------

def planted_config(**overrides):
  cfg = tiny.get_config()
  cfg.rl.response_length = 6
  cfg.data.decoder_max_len = 10
  cfg.rl.kl_coef = 0.0
  cfg.rl.lr = cfg.cl.lr = 3e-3
  cfg.rl.num_lm_updates = cfg.cl.num_emb_updates = 2
  cfg.train.num_iterations = 1
  cfg.eval.baselines = ("popularity",)
  cfg.checkpoint.enabled = True
  cfg.checkpoint.every_steps = 1
  cfg.checkpoint.max_to_keep = 3
  for key, value in overrides.items():
    section, field = key.split("__")
    cfg[section][field] = value
  return cfg


def make_trainer(cfg, workdir):
  tok = planted.word_tokenizer()
  mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
  return loop.Trainer(cfg, str(workdir), data=planted.planted_data(tok),
                      encoder=planted.tiny_encoder(len(tok)), decoder=planted.tiny_decoder(len(tok)),
                      writer_tokenizer=tok, ranker_tokenizer=tok, mesh=mesh)


def params(trainer):
  return {"encoder": trainer.writer_state.trainable_state()["params"],
          "decoder": trainer.ranker_state.trainable_state()["params"]}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
  """A run stopped after 2 CL updates: checkpoints 0, 1, 2 at CL steps 0, 1, 2."""
  workdir = tmp_path_factory.mktemp("stopped")
  trainer = make_trainer(planted_config(train__stop_after_steps=2), workdir)
  trainer.run()
  trainer.close()
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
      "0", "1", "2"]
  return workdir


def _copy_run(stopped_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(stopped_run, workdir)
  return workdir


def _restore(workdir):
  trainer = make_trainer(planted_config(), workdir)
  try:
    return trainer.restore(), dataclasses.asdict(trainer.position), params(trainer)
  finally:
    trainer.close()


def _warnings(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("warning: checkpoint")]


def _truncate_an_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  """Cuts the largest array data file of the decoder's state in half."""
  files = [p for p in (step_dir / "decoder").glob("ocdbt.process_*/d/*") if p.is_file()]
  assert files, sorted(str(p) for p in step_dir.rglob("*"))
  victim = max(files, key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
  return victim


def test_truncated_array_file_falls_back_to_the_older_checkpoint(stopped_run, tmp_path, capfd):
  workdir = _copy_run(stopped_run, tmp_path)
  _truncate_an_array_file(workdir / "checkpoints" / "2")
  capfd.readouterr()
  restored, position, _ = _restore(workdir)
  assert restored and position == {"iteration": 0, "phase": "cl", "step": 1}
  lines = _warnings(capfd.readouterr().err)
  assert len(lines) == 1 and "checkpoints/2 is unreadable" in lines[0], lines
  assert "trying the next older one" in lines[0] and "checkpoints.unreadable/2-" in lines[0]
  moved = list((workdir / "checkpoints.unreadable").iterdir())
  assert [p.name.split("-")[0] for p in moved] == ["2"] and (moved[0] / "encoder").is_dir()
  assert not (workdir / "checkpoints" / "2").exists()


def test_missing_loop_metadata_falls_back_and_resumes_like_the_older_checkpoint(
    stopped_run, tmp_path, capfd):
  workdir = _copy_run(stopped_run, tmp_path)
  reference = _copy_run(stopped_run, tmp_path / "ref")
  shutil.rmtree(reference / "checkpoints" / "2")
  (workdir / "checkpoints" / "2" / "loop" / "metadata").unlink()
  restored, position, got = _restore(workdir)
  assert restored and position["step"] == 1
  assert len(_warnings(capfd.readouterr().err)) == 1
  _, _, want = _restore(reference)
  jax.tree.map(np.testing.assert_array_equal, want, got)
  # The run goes on from there and saves past the moved-aside step number.
  trainer = make_trainer(planted_config(train__stop_after_steps=1), workdir)
  trainer.run()
  trainer.close()
  assert (workdir / "checkpoints" / "2").is_dir()
  assert _restore(workdir)[1] == {"iteration": 0, "phase": "cl", "step": 2}


def test_no_readable_checkpoint_is_one_error_and_nothing_is_deleted(stopped_run, tmp_path,
                                                                     capfd):
  workdir = _copy_run(stopped_run, tmp_path)
  for step in ("0", "2"):
    _truncate_an_array_file(workdir / "checkpoints" / step)
  (workdir / "checkpoints" / "1" / "loop" / "metadata").unlink()
  capfd.readouterr()
  trainer = make_trainer(planted_config(), workdir)
  with pytest.raises(ckpt_lib.CheckpointUnreadableError,
                     match=r"no readable checkpoint in .*checkpoints: all 3 failed"):
    trainer.restore()
  trainer.close()
  assert len(_warnings(capfd.readouterr().err)) == 3
  assert sorted(p.name.split("-")[0] for p in (workdir / "checkpoints.unreadable").iterdir()) == [
      "0", "1", "2"]


def test_checkpoint_of_another_config_is_refused_not_set_aside(stopped_run, tmp_path):
  # Other array shapes (LoRA rank 8, not 4) must not pass for unreadable checkpoints.
  workdir = _copy_run(stopped_run, tmp_path)
  trainer = make_trainer(planted_config(lora__rank=8), workdir)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"lora\.rank=4 .*lora\.rank=8"):
    trainer.restore()
  trainer.close()
  assert not (workdir / "checkpoints.unreadable").exists()
  assert sorted(os.listdir(workdir / "checkpoints")) == ["0", "1", "2"]


# --- one run per work directory -----------------------------------------------------

def _cli(*args, cwd=REPO, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  return subprocess.run([sys.executable, "-m", "langptune_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_second_command_on_a_locked_workdir_exits_2_naming_the_holder(tmp_path):
  with workdir_lock.hold(tmp_path, "train"):
    with pytest.raises(workdir_lock.WorkdirLockedError, match=rf"`train` \(pid {os.getpid()} "):
      workdir_lock.acquire(tmp_path, "evaluate")
    result = _cli("train", "--config=configs/tiny.py", f"--workdir={tmp_path}")
  assert result.returncode == 2, result.stderr[-2000:]
  errors = result.stderr.strip().splitlines()
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert errors[0].startswith(f"error: workdir {tmp_path} is in use by `train` (pid "
                              f"{os.getpid()} on host ")
  assert not (tmp_path / workdir_lock.LOCK_NAME).exists()  # released and removed
  with workdir_lock.hold(tmp_path, "export"):  # free again
    pass


_HOLD = textwrap.dedent("""
  import fcntl, os, sys, time
  fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX)
  os.write(fd, sys.argv[2].encode())
  print("locked", flush=True)
  time.sleep(600)
""")


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
  path = tmp_path / workdir_lock.LOCK_NAME
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path),
                             "host=x pid=1 command=train"], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lock.WorkdirLockedError, match="`train` .pid 1 on host x"):
      workdir_lock.acquire(tmp_path, "train")
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir_lock.hold(tmp_path, "train"):  # kill -9 released the lock with the process
    assert f"pid={os.getpid()} " in path.read_text()


def test_stale_lock_held_by_an_orphan_is_taken_over(tmp_path, capfd):
  # The recorded holder (this host) is dead but another process still holds the file,
  # e.g. a forked worker that outlived its parent: the lock is stale and replaced.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  path = tmp_path / workdir_lock.LOCK_NAME
  orphan = subprocess.Popen([sys.executable, "-c", _HOLD, str(path),
                             f"host={socket.gethostname()} pid={dead} command=train"],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert orphan.stdout.readline().strip() == "locked"
    with workdir_lock.hold(tmp_path, "evaluate"):
      assert "command=evaluate" in path.read_text()
    assert f"taking over the stale lock {path}" in capfd.readouterr().err
  finally:
    orphan.send_signal(signal.SIGKILL)
    orphan.wait()


# --- bad input files ----------------------------------------------------------------

def _scan(path, item_index):
  return review_scan.scan_range(str(path), 0, None, item_index, max_examples=3)


def test_truncated_gzip_is_one_line(tmp_path):
  reviews, meta = fx.write(tmp_path, gz=True)
  for path in (reviews, meta):
    data = pathlib.Path(path).read_bytes()
    pathlib.Path(path).write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"Movies_and_TV.jsonl.gz: truncated or corrupt gzip "
                                       r"file \(EOFError"):
    _scan(reviews, {"C0": 0})
  from langptune_jax.data import amazon
  with pytest.raises(ValueError, match=r"meta_Movies_and_TV.jsonl.gz: truncated or corrupt"):
    list(amazon.open_lines(meta))


BAD_NUMBERS = [
    (b'{"user_id": "U", "parent_asin": "C0", "text": "t", "rating": 4, "timestamp": 1e400}',
     "review: timestamp NaN or infinite"),
    (b'{"user_id": "U", "parent_asin": "C0", "text": "t", "rating": 4, "timestamp": '
     + b"9" * 400 + b"}", "review: timestamp too large"),
    (b'{"user_id": "U", "parent_asin": "C0", "text": "t", "rating": NaN, "timestamp": 5}',
     "review: rating NaN or infinite"),
    (b'{"user_id": "U", "parent_asin": "C0", "text": "t", "rating": Infinity, "timestamp": 5}',
     "review: rating NaN or infinite"),
    (b'{"user_id": "U", "parent_asin": "C0", "text": "t", "rating": -1.0, "timestamp": 5}',
     "review: negative rating"),
    (b'{"user_id": "U", "parent_asin": "C0", "text": "t", "rating": 4, "timestamp": -5}',
     "review: negative timestamp"),
    (b'{"user_id": "U", "parent_asin": "C0", "text": "t", "rating": 4, "timestamp": NaN}',
     "review: timestamp NaN or infinite"),
]


def test_bad_numbers_in_reviews_are_skipped_and_counted(tmp_path):
  good = b'{"user_id": "U", "parent_asin": "C0", "text": "t", "rating": 4, "timestamp": 7}'
  path = tmp_path / "reviews.jsonl"
  path.write_bytes(b"\n".join([line for line, _ in BAD_NUMBERS] + [good]) + b"\n")
  chunk = _scan(path, {"C0": 0})
  assert list(chunk.ts) == [7] and list(chunk.rating) == [4.0]
  expected = {}
  for _, reason in BAD_NUMBERS:
    expected[reason] = expected.get(reason, 0) + 1
  assert chunk.skip_counts == expected


def test_bad_numbers_in_movielens_are_skipped_and_counted(tmp_path, ml100k_dir):
  folder = tmp_path / "ml"
  folder.mkdir()
  shutil.copy(pathlib.Path(ml100k_dir) / "ml-100k.item", folder / "ml-100k.item")
  lines = (pathlib.Path(ml100k_dir) / "ml-100k.inter").read_bytes().splitlines(keepends=True)
  head, rows = lines[0], lines[1:1001]
  cols = rows[0].decode().rstrip("\n").split("\t")
  bad = {"nan": "rating NaN or infinite", "-3": "negative rating"}
  extra = [("\t".join([cols[0], cols[1], r, cols[3]]) + "\n").encode() for r in bad]
  extra += [("\t".join([cols[0], cols[1], cols[2], t]) + "\n").encode()
            for t in ("1e400", "-1", "inf")]
  (folder / "ml-100k.inter").write_bytes(head + b"".join(rows + extra))
  cfg = tiny.get_config()
  cfg.data.movielens_dir = str(folder)
  cfg.data.max_users, cfg.data.k_core = 0, 1
  skips, log = core.SkipLog(), core.FilterLog()
  movielens.load(cfg.data, skips, log)
  assert skips.counts == {"rating NaN or infinite": 1, "negative rating": 1,
                          "timestamp NaN or infinite": 2, "negative timestamp": 1}


@pytest.fixture(scope="module")
def amazon_dataset(tmp_path_factory, smollm2_gguf, minilm_dir):
  """A prepared dataset whose raw reviews also hold a NaN rating and a 1e400 timestamp."""
  folder = tmp_path_factory.mktemp("amazon")
  config = fx.amazon_config(folder, smollm2_gguf, minilm_dir)
  with open(config.data.reviews, "ab") as f:
    f.write(BAD_NUMBERS[0][0] + b"\n" + BAD_NUMBERS[2][0] + b"\n")
  old = os.umask(0o022)
  try:
    path, stats = prepare.prepare(config)
  finally:
    os.umask(old)
  return config, path, stats


def test_bad_numbers_counted_in_stats_json_and_never_in_prompts(amazon_dataset):
  _, path, _ = amazon_dataset
  stats = json.loads((path / builder.STATS_FILE).read_text())
  assert stats["skipped"]["review: timestamp NaN or infinite"]["count"] == 1
  assert stats["skipped"]["review: rating NaN or infinite"]["count"] == 1
  prompts = loader.load_split(path, "train", ["prompt"])["prompt"]
  assert prompts and not any("nan" in p.lower() or "inf)" in p for p in prompts)


def test_truncated_split_file_names_the_file(amazon_dataset, tmp_path):
  _, path, _ = amazon_dataset
  copy = tmp_path / "dataset"
  shutil.copytree(path, copy)
  stats = json.loads((copy / builder.STATS_FILE).read_text())
  assert any(".array_record-" in name for name in stats[builder.CHECKSUMS])
  victim = sorted((builder.config_dir(copy, "users")).glob("langptune-train.array_record-*"))[0]
  victim.write_bytes(victim.read_bytes()[:-40])
  with pytest.raises(core.DataError, match=rf"{victim}: corrupt dataset file \(checksum"):
    loader.load_split(copy, "train")
  loader.load_split(copy, "val")  # the other splits still read
  victim.unlink()
  with pytest.raises(core.DataError, match=rf"{victim}: dataset file missing"):
    loader.load_split(copy, "train")
  (copy / builder.STATS_FILE).write_text('{"truncated": ')
  with pytest.raises(core.DataError, match=r"stats.json: corrupt dataset file"):
    loader.load_stats(copy)


@pytest.mark.slow  # a CLI process that loads both tokenizers
def test_truncated_gzip_through_the_cli_is_one_line_and_leaves_no_dataset(
    tmp_path, smollm2_gguf, minilm_dir):
  reviews, meta = fx.write(tmp_path / "raw", gz=True)
  data = pathlib.Path(reviews).read_bytes()
  pathlib.Path(reviews).write_bytes(data[:len(data) * 2 // 3])
  result = _cli("prepare", "--config=configs/base.py", f"--config.encoder.path={smollm2_gguf}",
                f"--config.decoder.path={minilm_dir}", "--config.data.source=amazon",
                f"--config.data.reviews={reviews}", f"--config.data.meta={meta}",
                f"--workdir={tmp_path / 'run'}",
                *[f"--config.data.{k}={v}" for k, v in fx.SMALL_CFG.items()])
  assert result.returncode == 2
  errors = result.stderr.strip().splitlines()
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert errors[0].startswith(f"error: {reviews}: truncated or corrupt gzip file")
  assert sorted(os.listdir(tmp_path / "run")) == []


# --- lengths against the models ----------------------------------------------------------

def test_decoder_max_len_beyond_the_berts_positions_fails_before_any_work(
    tmp_path, minilm_dir, smollm2_gguf):
  cfg = tiny.get_config()
  cfg.encoder.path, cfg.decoder.path = str(smollm2_gguf), str(minilm_dir)
  cfg.data.decoder_max_len = 600
  with pytest.raises(ConfigError) as e:
    commands.build_trainer(cfg, str(tmp_path))
  assert str(e.value) == (f"data.decoder_max_len=600: must be <= 512, the "
                          f"max_position_embeddings of decoder.path={str(minilm_dir)!r}")
  assert os.listdir(tmp_path) == []  # no dataset, no checkpoints, no tensorboard
  cfg.data.decoder_max_len = 512
  cfg.data.prompt_max_len, cfg.rl.response_length = 8000, 500
  [line] = model_limits.problems(cfg)
  assert line.startswith("data.prompt_max_len=8000: prompt + rl.response_length = 8000 + 500 = "
                         "8500 must be <= 8192")


# --- export ---------------------------------------------------------------------------------

def _export_config(workdir):
  cfg = tiny.get_config()
  cfg.encoder.path = cfg.decoder.path = str(workdir / "no-model")  # never reached
  return cfg


def test_export_without_a_checkpoint_touches_nothing(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*checkpoints: train first"):
    commands.export(_export_config(tmp_path), str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_export_refuses_a_target_holding_the_users_files(tmp_path):
  (tmp_path / "checkpoints" / "0").mkdir(parents=True)
  (tmp_path / "export").mkdir()
  (tmp_path / "export" / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match=r"export target .*export is not empty; pass --overwrite"):
    commands.export(_export_config(tmp_path), str(tmp_path), overwrite=False)
  assert (tmp_path / "export" / "notes.txt").read_text() == "mine"
  assert sorted(os.listdir(tmp_path)) == ["checkpoints", "export"]
  with export_lib.staged_dir(tmp_path / "export", overwrite=True) as tmp:
    (tmp / "model.txt").write_text("new")
  assert os.listdir(tmp_path / "export") == ["model.txt"]


_KILLED_EXPORT = textwrap.dedent("""
  import os, signal, sys
  sys.path.insert(0, sys.argv[2])
  import planted
  from langptune_jax.weights import export as export_lib
  tok = planted.word_tokenizer()
  with export_lib.staged_dir(sys.argv[1], overwrite=True) as tmp:
    export_lib.export_decoder(planted.tiny_encoder(len(tok)), tmp / "encoder")
    os.kill(os.getpid(), signal.SIGKILL)  # before the tokenizer and the decoder are written
""")


def test_kill_9_during_export_leaves_the_previous_export_whole(tmp_path):
  out = tmp_path / "export"
  out.mkdir()
  (out / "encoder").mkdir()
  (out / "encoder" / "previous.txt").write_text("whole")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  killed = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(out),
                           os.path.dirname(__file__)], env=env, capture_output=True, text=True,
                          timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert sorted(os.listdir(out)) == ["encoder"]
  assert os.listdir(out / "encoder") == ["previous.txt"]
  # What the killed export wrote stays hidden (a dot folder), never in place.
  assert all(name.startswith(".export.tmp-") for name in os.listdir(tmp_path) if name != "export")


# --- the umask ------------------------------------------------------------------------------

def test_outputs_follow_the_umask(tmp_path, amazon_dataset):
  _, dataset, _ = amazon_dataset  # prepared under umask 022
  assert dataset.stat().st_mode & 0o777 == 0o755
  old = os.umask(0o027)
  try:
    assert fs.temp_dir(tmp_path, "x").stat().st_mode & 0o777 == 0o750
    tok = planted.word_tokenizer()
    out = export_lib.export_decoder(planted.tiny_encoder(len(tok)), tmp_path / "a" / "encoder")
  finally:
    os.umask(old)
  assert out.stat().st_mode & 0o777 == 0o750
  assert (out / "config.json").stat().st_mode & 0o777 == 0o640


# --- kill -9 resume (already holds; kept held) -------------------------------------------------

_KILLED_RUN = textwrap.dedent("""
  import os, signal, sys
  sys.path.insert(0, sys.argv[2])
  import conftest  # the same devices and compilation cache as this test process
  from orbax.checkpoint._src.path import atomicity
  import test_faults
  real = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if self._final_path.name == sys.argv[3]:  # written to the temporary folder, not renamed
      os.kill(os.getpid(), signal.SIGKILL)
    return await real(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize
  trainer = test_faults.make_trainer(test_faults.planted_config(), sys.argv[1])
  trainer.run()
""")


def _logged_values(curves):
  """Every logged value but the clock readings (compile and step times, throughput, MFU)."""
  clock = ("time", "per_s", "mfu", "tflops")
  return [{k: v for k, v in c.items() if not any(w in k for w in clock)} for c in curves]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  trainer = make_trainer(planted_config(), tmp_path_factory.mktemp("straight"))
  history = trainer.run()
  result = params(trainer), [h["results"] for h in history], list(trainer.curves)
  trainer.close()
  return result


def test_kill_9_mid_checkpoint_write_resumes_exactly(tmp_path, straight_run):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(tmp_path),
                           os.path.dirname(__file__), "2"], env=env,
                          capture_output=True, text=True, timeout=600)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  names = os.listdir(tmp_path / "checkpoints")
  assert "2" not in names and any(n.startswith("2.orbax-checkpoint-tmp") for n in names), names
  trainer = make_trainer(planted_config(), tmp_path)
  history = trainer.run()
  want_params, want_results, want_curves = straight_run
  jax.tree.map(np.testing.assert_array_equal, want_params, params(trainer))
  assert [h["results"] for h in history] == want_results
  assert _logged_values(trainer.curves) == _logged_values(want_curves)
  trainer.close()
