"""Where the training schedule is, and the ways a run stops before its end."""

from __future__ import annotations

import dataclasses

from langptune_jax import settings as settings_lib


class NonFiniteLossError(FloatingPointError):
  """A loss became NaN or inf; the run stops and keeps its last good checkpoint."""


class StopRequested(Exception):
  """Raised internally once ``train.stop_after_steps`` updates have run."""


class Preempted(StopRequested):
  """Raised internally at the step boundary all processes agreed on after a SIGTERM."""


@dataclasses.dataclass(frozen=True)
class LoopPosition:
  """Where the schedule is: the next step to run of `phase` in `iteration`."""

  iteration: int = 0
  phase: str = "cl"
  step: int = 0

  def global_step(self, settings: settings_lib.Settings) -> int:
    cl_steps = settings.cl.num_emb_updates
    offset = 0 if self.phase == "cl" else cl_steps
    return self.iteration * (cl_steps + settings.rl.num_lm_updates) + offset + self.step
