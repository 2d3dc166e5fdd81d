"""The langptune-jax command line: usage, overrides, one-line errors and the command registry."""

import os
import pathlib
import subprocess
import sys

import pytest
from cpu_devices import xla_flags

from langptune_jax import main

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = "--config=configs/tiny.py"

# name -> argv after the program; all run concurrently once per session (they are slow to start).
CASES = {
    "help": ["--help"],
    "no_command": [],
    "info": ["info", TINY, "--config.rl.lr=1e-6", "--config.mesh.data=4", "--config.mesh.fsdp=2",
             "--config.eval.ks=(5, 10)", "--workdir={workdir}"],
    "bad_mesh": ["info", TINY, "--config.mesh.fsdp=3"],
    "bad_values": ["info", TINY, "--config.rl.top_p=0", "--config.cl.batch_size=12"],
    "unknown_field": ["info", TINY, "--config.rl.learning_rate=1e-6"],
    "bad_type": ["info", TINY, "--config.rl.lr=fast"],
    "missing_config_file": ["info", "--config=configs/missing.py"],
    "no_config": ["info"],
    "unknown_command": ["fly", TINY],
    "syntax_error": ["info", "--config={tmp}/broken.py"],
    "raising_config": ["info", "--config={tmp}/raising.py"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  workdir = tmp / "run"
  (tmp / "broken.py").write_text("def get_config(:\n")
  (tmp / "raising.py").write_text("def get_config():\n  raise ValueError('boom')\n")
  env = {**os.environ, "XLA_FLAGS": xla_flags(8),
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  procs = {}
  for name, args in CASES.items():
    argv = [a.replace("{workdir}", str(workdir)).replace("{tmp}", str(tmp)) for a in args]
    procs[name] = subprocess.Popen([sys.executable, "-m", "langptune_jax.main", *argv], cwd=REPO,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
  results = {}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    results[name] = (proc.returncode, out, err)
  results["workdir"] = workdir
  results["tmp"] = tmp
  return results


def _lines(text):
  return [ln for ln in text.splitlines() if ln.strip()]


def test_help_lists_commands(runs):
  code, out, _ = runs["help"]
  assert code == 0
  assert out.startswith("usage: langptune-jax <command>")
  for name in ("assets", "info", "demo"):
    assert any(ln.split()[:1] == [name] for ln in out.splitlines()), name


def test_no_command_prints_usage(runs):
  code, out, err = runs["no_command"]
  assert code == 2 and out == ""
  assert err.startswith("usage: langptune-jax <command>")


def test_info_applies_overrides(runs):
  code, out, err = runs["info"]
  assert code == 0, err
  assert "  rl.lr = 1e-06" in out.splitlines()
  assert "  eval.ks = (5, 10)" in out.splitlines()
  assert "mesh: data=4 x fsdp=2 x tensor=1; data-parallel size 8" in out
  assert f"workdir: {runs['workdir']}" in out
  assert runs["workdir"].is_dir()


@pytest.mark.parametrize("case,expected", [
    ("bad_mesh", ["error: mesh.fsdp=3: 8 devices are not divisible by the fixed axes' product 3 "
                  "(mesh.data=-1 takes the rest)"]),
    ("bad_values", ["error: rl.top_p=0.0: must be in (0, 1]",
                    "error: cl.batch_size=12: must be divisible by the data-parallel size 8 "
                    "(the mesh axes the batch is split over)"]),
    ("unknown_field", ["error: --config.rl.learning_rate: no such config field in configs/tiny.py"]),
    ("bad_type", ["error: flag --config.rl.lr=fast: could not convert string to float: 'fast'"]),
    ("missing_config_file", ["error: --config=configs/missing.py: config file not found"]),
    ("no_config", ["error: --config=PATH is required (e.g. --config=configs/tiny.py)"]),
    ("unknown_command", ["error: unknown command 'fly'; available: assets, info, demo"]),
])
def test_errors_are_one_line_each_with_exit_2(runs, case, expected):
  code, out, err = runs[case]
  assert code == 2
  if case == "unknown_command":  # later stages add commands to the list
    assert _lines(err)[0].startswith(expected[0].rsplit(", demo", 1)[0])
    assert len(_lines(err)) == 1
  else:
    assert _lines(err) == expected
  assert "Traceback" not in err and out == ""


def test_broken_config_files_are_one_line_errors(runs):
  tmp = runs["tmp"]
  code, out, err = runs["syntax_error"]
  assert code == 2 and _lines(err) == [
      f"error: --config={tmp}/broken.py: SyntaxError: invalid syntax (line 1)"]
  code, out, err = runs["raising_config"]
  assert code == 2 and _lines(err) == [
      f"error: flag --config={tmp}/raising.py: Error whilst parsing config file: ValueError: boom"]


def test_console_script_help():
  script = pathlib.Path(sys.executable).parent / "langptune-jax"
  if not script.exists():
    pytest.fail(f"{script} missing: install the package (make install)")
  result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and "commands:" in result.stdout


def test_registry_lists_only_existing_modules(monkeypatch):
  commands = dict(main.COMMANDS)
  commands["ghost"] = main.Command("langptune_jax.no_such_module:run", "not built yet")
  commands["ghost2"] = main.Command("no_such_package.sub:run", "not built yet")
  monkeypatch.setattr(main, "COMMANDS", commands)
  assert "ghost" not in main.available_commands()
  assert "ghost2" not in main.available_commands()
  assert {"assets", "info", "demo"} <= set(main.available_commands())
  assert "ghost" not in main.usage()


def test_demo_runs_available_stages_in_order(monkeypatch):
  calls = []
  for name in ("assets", "info", "prepare"):
    monkeypatch.setattr(main, f"_fake_{name}",
                        lambda config, workdir, name=name: calls.append((name, config)), raising=False)
  monkeypatch.setattr(main, "COMMANDS", {
      "assets": main.Command("langptune_jax.main:_fake_assets", "", needs_config=False),
      "info": main.Command("langptune_jax.main:_fake_info", ""),
      "prepare": main.Command("langptune_jax.main:_fake_prepare", ""),
      "train": main.Command("langptune_jax.no_such_module:run", ""),
  })
  assert main.demo_command("CONFIG", pathlib.Path("/tmp")) == 0
  assert calls == [("assets", None), ("info", "CONFIG"), ("prepare", "CONFIG")]
