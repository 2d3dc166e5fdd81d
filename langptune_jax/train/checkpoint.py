"""Checkpoints of a LangPTune run with orbax.

A checkpoint holds, per step:
  * ``encoder`` / ``decoder``: the trainable parameters and optimizer state of
    each model (under LoRA only the adapters; frozen weights are reloaded from
    the base checkpoint, so checkpoints stay small),
  * ``loop``: JSON with the loop position (iteration, phase, step), the RNG
    seed state, the data-iterator states and a fingerprint of the config,
  * ``profiles``: JSON with the stored profiles of the current CL phase.

Saves are atomic (orbax writes to a temporary directory and renames it), so an
interrupted save never looks like a complete checkpoint. Restoring takes
abstract target arrays with shardings, which also lets a run resume on a
different number of devices.

A checkpoint that fails to read (a truncated array file, a missing metadata
file) is reported in one line, moved aside to ``<checkpoints>.unreadable/`` and
the next older one is tried: a damaged checkpoint costs the steps since the one
before it, never the run. Nothing the run could not read is deleted.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

# Fields that may differ between the run that saved and the run that resumes.
_RESUME_SAFE_FIELDS = ("workdir", "checkpoint", "logging", "profile", "distributed", "mesh",
                       "train.num_iterations", "train.stop_after_steps", "eval", "baselines",
                       "serve", "judge")


class CheckpointMismatchError(ValueError):
  """Raised when a checkpoint was written by an incompatible configuration."""


def config_fingerprint(config) -> dict[str, Any]:
  """The config values that must match for a checkpoint to be restored."""
  flat = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if any(name == f or name.startswith(f + ".") for f in _RESUME_SAFE_FIELDS):
        continue
      if hasattr(value, "items"):
        walk(name + ".", value)
      else:
        flat[name] = list(value) if isinstance(value, tuple) else value

  walk("", config)
  return flat


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
  """One clear line naming the first config field that differs."""
  for key in sorted(set(saved) | set(current)):
    if saved.get(key) != current.get(key):
      raise CheckpointMismatchError(
          f"checkpoint {path} was written with {key}={saved.get(key)!r} but this run has "
          f"{key}={current.get(key)!r}; use another --workdir or --config.checkpoint.resume=False")


class CheckpointUnreadableError(ValueError):
  """Raised when checkpoints exist but none of them can be read."""


def unreadable_dir(directory) -> epath.Path:
  """Where checkpoints that failed to read are moved: next to the checkpoint folder."""
  directory = epath.Path(directory)
  return directory.parent / f"{directory.name}.unreadable"


def has_checkpoint(directory) -> bool:
  """Whether `directory` holds a finished checkpoint step, without creating anything."""
  directory = epath.Path(directory)
  return directory.is_dir() and any(p.name.isdigit() and p.is_dir() for p in directory.iterdir())


def _one_line(error: BaseException) -> str:
  lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
  text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
  return text if len(text) <= 300 else text[:297] + "..."


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with the run's item layout."""

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    self.directory = epath.Path(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, *, encoder, decoder, loop: dict, profiles: dict | None = None,
           force: bool = True) -> None:
    args = {
        "encoder": ocp.args.StandardSave(encoder),
        "decoder": ocp.args.StandardSave(decoder),
        "loop": ocp.args.JsonSave(loop),
        "profiles": ocp.args.JsonSave(profiles or {}),
    }
    self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    self.manager.wait_until_finished()

  def restore(self, step: int, *, encoder_target, decoder_target):
    """Restores onto abstract targets (``jax.ShapeDtypeStruct`` with shardings)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        encoder=ocp.args.StandardRestore(encoder_target),
        decoder=ocp.args.StandardRestore(decoder_target),
        loop=ocp.args.JsonRestore(),
        profiles=ocp.args.JsonRestore(),
    ))
    return restored["encoder"], restored["decoder"], restored["loop"], restored["profiles"]

  def restore_latest(self, *, encoder_target, decoder_target,
                     check: Callable[[dict], None] | None = None):
    """(step, encoder, decoder, loop, profiles) of the newest readable checkpoint, or None.

    Each checkpoint that fails to read is reported on stderr, moved aside and the
    next older one is tried; with none readable, CheckpointUnreadableError.
    `check(loop)` runs on the loop JSON before any array is read: what it raises
    (a checkpoint of another config) is not a read failure and propagates.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
    for step in steps:
      try:
        loop = self.manager.restore(
            step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))["loop"]
      except Exception as e:  # a missing or corrupt loop file
        self._set_aside(step, e, last=step == steps[-1])
        continue
      if check is not None:
        check(loop)
      try:
        return (step, *self.restore(step, encoder_target=encoder_target,
                                    decoder_target=decoder_target))
      except Exception as e:  # any unreadable array or metadata file
        self._set_aside(step, e, last=step == steps[-1])
    raise CheckpointUnreadableError(
        f"no readable checkpoint in {self.directory}: all {len(steps)} failed to read and were "
        f"moved to {unreadable_dir(self.directory)}; fix or remove them, or use another --workdir")

  def _set_aside(self, step: int, error: Exception, *, last: bool) -> None:
    target = self._move_aside(step)
    older = "no older one left" if last else "trying the next older one"
    print(f"warning: checkpoint {self.directory / str(step)} is unreadable ({_one_line(error)});"
          f" moved to {target}; {older}", file=sys.stderr, flush=True)

  def _move_aside(self, step: int) -> epath.Path:
    """Renames a checkpoint step out of the manager's folder (process 0 renames)."""
    aside = unreadable_dir(self.directory)
    target = aside / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      n = 0
      while target.exists():
        n += 1
        target = aside / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}-{n}"
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint_moved_aside_{step}")
    self.manager.reload()
    return target

  def close(self):
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
