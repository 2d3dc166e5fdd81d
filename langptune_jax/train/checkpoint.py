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
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

# Fields that may differ between the run that saved and the run that resumes.
_RESUME_SAFE_FIELDS = ("workdir", "checkpoint", "logging", "profile", "distributed", "mesh",
                       "train.num_iterations", "train.stop_after_steps", "eval", "serve", "judge")


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

  def close(self):
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
