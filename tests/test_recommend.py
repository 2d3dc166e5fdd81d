"""`recommend` on a trained run: each input kind, both formats, and every bad input."""

import io
import json
import os
import subprocess
import sys

import pytest

from langptune_jax.serve import recommend as recommend_lib

pytestmark = pytest.mark.slow  # the ranking model is the real MiniLM

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _run(cfg, workdir, session=None, **kwargs):
  """`recommend` in process, on the shared session (the CLI test below opens its own)."""
  cfg = cfg.copy_and_resolve_references()
  cfg.eval.greedy = False  # the tiny writer's greedy profiles are often empty
  out = io.StringIO()
  assert recommend_lib.recommend(cfg, workdir, out=out, session=session, **kwargs) == 0
  return out.getvalue()


def test_user_json_lists_top_k_without_history(served_run, served_session):
  cfg, workdir = served_run
  user = served_session.user_ids()[2]
  prompt = served_session.dataset_prompt(user)
  out = json.loads(_run(cfg, workdir, served_session, user=user, output_format="json"))
  assert out["user"] == user and isinstance(out["profile"], str)
  items = out["items"]
  assert [r["rank"] for r in items] == list(range(1, cfg.serve.top_k + 1))
  assert not {r["item"] for r in items} & set(prompt.history)
  assert all(r["is_target"] == (r["item"] == prompt.target) for r in items)


def test_history_file_and_text_format(served_run, served_session, tmp_path):
  cfg, workdir = served_run
  history = tmp_path / "history.txt"
  history.write_text(f"{served_session.titles[4].upper()}\n\n7\n")
  text = _run(cfg, workdir, served_session, history=str(history))
  assert text.startswith("profile:\n") and "rank    score  target  title" in text
  rows = text.split("title\n", 1)[1].strip().splitlines()
  assert len(rows) == cfg.serve.top_k
  shown = {r.split(None, 2)[2].strip() for r in rows}
  assert not shown & {served_session.titles[4], served_session.titles[7]}


def test_profile_skips_generation(served_run, served_session):
  cfg, workdir = served_run
  out = json.loads(_run(cfg, workdir, served_session, profile="westerns with cowboys",
                        output_format="json"))
  assert out["profile"] == "westerns with cowboys"
  assert [r["item"] for r in out["items"]] == [
      r["item"] for r in served_session.rank("westerns with cowboys")]
  assert all(r["is_target"] is None for r in out["items"])


@pytest.mark.parametrize("kwargs,message", [
    ({}, "give exactly one of --user, --history, --profile (got none)"),
    ({"user": 1, "profile": "x"}, "(got --user, --profile)"),
    ({"user": 99999}, "unknown user id 99999"),
    ({"profile": ""}, "profile is empty"),
    ({"profile": "drama " * 100}, "the ranking model reads at most data.decoder_max_len=48"),
    ({"history": "/no/such/file"}, "--history=/no/such/file: file not found"),
])
def test_bad_input_raises_one_clear_error(served_run, served_session, kwargs, message):
  cfg, workdir = served_run
  with pytest.raises((ValueError, FileNotFoundError)) as info:
    _run(cfg, workdir, served_session, **kwargs)
  assert message in str(info.value)


def test_unknown_title_in_history(served_run, served_session, tmp_path):
  cfg, workdir = served_run
  history = tmp_path / "h.txt"
  history.write_text("0\nThe Film That Never Was (1901)\n")
  with pytest.raises(ValueError, match="history line 2: unknown item 'The Film That Never Was"):
    _run(cfg, workdir, served_session, history=str(history))


def _write_config(path, cfg):
  """A config file that rebuilds the fixture's config (the CLI reads configs from files)."""
  path.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
      "import serve_fixtures\n\n\n"
      "def get_config():\n"
      f"  return serve_fixtures.serve_config({cfg.encoder.path!r}, {cfg.decoder.path!r}, "
      f"{cfg.data.movielens_dir!r})\n")
  return str(path)


def test_cli_prints_json_and_one_line_errors(served_run, served_session, tmp_path):
  cfg, workdir = served_run
  config = _write_config(tmp_path / "serve_config.py", cfg)
  base = [sys.executable, "-m", "langptune_jax.main", "recommend", f"--config={config}"]
  env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  history = tmp_path / "history.txt"
  history.write_text("0\nThe Film That Never Was (1901)\n")
  runs = {
      "ok": base + [f"--workdir={workdir}", "--profile=space adventure", "--format=json"],
      "unknown_user": base + [f"--workdir={workdir}", "--user=99999"],
      "unknown_title": base + [f"--workdir={workdir}", f"--history={history}"],
      "long_profile": base + [f"--workdir={workdir}", "--profile=" + "drama " * 100],
      "empty_profile": base + [f"--workdir={workdir}", "--profile= "],
      "no_checkpoint": base + [f"--workdir={tmp_path / 'empty'}", "--user=1"],
  }
  procs = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env, stdin=subprocess.DEVNULL)
           for name, argv in runs.items()}
  results = {name: (p.wait(timeout=900), *p.communicate()) for name, p in procs.items()}
  code, out, err = results["ok"]
  assert code == 0, err
  assert [r["item"] for r in json.loads(out)["items"]] == [
      r["item"] for r in served_session.rank("space adventure")]
  for name, message in [
      ("unknown_user", "error: unknown user id 99999"),
      ("unknown_title", "error: history line 2: unknown item 'The Film That Never Was (1901)'"),
      ("long_profile", "error: profile is 102 tokens; the ranking model reads at most "
                       "data.decoder_max_len=48"),
      ("empty_profile", "error: profile is empty"),
      ("no_checkpoint", "error: no checkpoint in ")]:
    code, out, err = results[name]
    assert code == 2, (name, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), err
    assert "Traceback" not in err
