"""The memory plan's report: per-step bytes, the resident state and a verdict per chip.

:mod:`langptune_jax.plan` fills a :class:`Plan`; this module only holds and
formats it (text for the terminal, a dict for plan.json).
"""

from __future__ import annotations

import dataclasses

from langptune_jax import flops

GiB = 1024 ** 3
HEADROOM = 0.9  # usable fraction of HBM (runtime, fragmentation, XLA's own buffers)
VERDICT_CHIPS = ("v4", "v5e", "v5p", "v6e", "a100", "h100", "h200")

@dataclasses.dataclass
class StepPlan:
  """Per-device bytes of one jitted step (what is not resident state)."""
  name: str
  shape: str  # human-readable batch shape
  kv_cache: int = 0
  temporaries: int | None = None  # None: the backend gave no memory analysis
  io: int = 0  # arguments + outputs - aliased, minus the resident state passed in
  compile_s: float = 0.0
  error: str | None = None

  def extra(self) -> int:
    """Bytes this step needs on top of the resident state."""
    return self.io + (self.temporaries or 0)


@dataclasses.dataclass
class Plan:
  mesh: dict[str, int]
  num_devices: int
  backend: str
  models: list[str]
  resident: dict[str, int]  # per-device bytes of state that lives through training
  steps: list[StepPlan]
  notes: list[str] = dataclasses.field(default_factory=list)
  processes: int = 1  # hosts the mesh spans; each holds num_devices / processes devices
  micro_batches: dict[str, int | None] = dataclasses.field(default_factory=dict)  # --chip

  @property
  def resident_bytes(self) -> int:
    return sum(self.resident.values())

  def total(self, step: StepPlan) -> int:
    return self.resident_bytes + step.extra()

  @property
  def peak_bytes(self) -> int:
    return max([self.total(s) for s in self.steps if s.error is None] or [self.resident_bytes])

  @property
  def peak_step(self) -> str:
    ok = [s for s in self.steps if s.error is None]
    return max(ok, key=self.total).name if ok else "-"

  @property
  def devices_per_host(self) -> int:
    return self.num_devices // self.processes

  def per_host(self, per_device: int) -> int:
    """Accelerator memory of one host's devices together."""
    return per_device * self.devices_per_host

  def fits(self, chip: flops.Chip, headroom: float = HEADROOM) -> bool:
    return self.peak_bytes <= chip.hbm_gib * GiB * headroom

  def to_dict(self) -> dict:
    return {"mesh": self.mesh, "num_devices": self.num_devices, "backend": self.backend,
            "models": self.models, "resident": self.resident,
            "resident_bytes": self.resident_bytes,
            "steps": [dict(dataclasses.asdict(s), total=self.total(s)) for s in self.steps],
            "peak_bytes": self.peak_bytes, "peak_step": self.peak_step,
            "fits": {flops.CHIPS[c].name: self.fits(flops.CHIPS[c]) for c in VERDICT_CHIPS},
            "headroom": HEADROOM, "notes": self.notes, "processes": self.processes,
            "devices_per_host": self.devices_per_host,
            "per_host": {"resident_bytes": self.per_host(self.resident_bytes),
                         "peak_bytes": self.per_host(self.peak_bytes)},
            "micro_batches": self.micro_batches}

  def format(self) -> str:
    mesh = " x ".join(f"{a}={s}" for a, s in self.mesh.items())
    lines = [f"Memory plan per device: mesh {mesh} ({self.num_devices} {self.backend} devices)"]
    lines += [f"  {m}" for m in self.models]
    lines.append("")
    lines.append("resident state (lives through training):")
    for name, b in self.resident.items():
      lines.append(f"  {name:<28s} {_gib(b):>10s}")
    lines.append(f"  {'total':<28s} {_gib(self.resident_bytes):>10s}")
    lines.append("")
    header = (f"{'step':<18s} {'batch':<26s} {'kv cache':>10s} {'temporaries':>12s} "
              f"{'other i/o':>10s} {'total':>10s}")
    lines += [header, "-" * len(header)]
    for s in self.steps:
      if s.error is not None:
        lines.append(f"{s.name:<18s} {s.shape:<26s} failed to compile: {s.error}")
        continue
      temp = "n/a" if s.temporaries is None else _gib(s.temporaries)
      lines.append(f"{s.name:<18s} {s.shape:<26s} {_gib(s.kv_cache):>10s} {temp:>12s} "
                   f"{_gib(max(s.io - s.kv_cache, 0)):>10s} {_gib(self.total(s)):>10s}")
    lines.append("")
    lines.append(f"peak per device: {_gib(self.peak_bytes)} ({self.peak_step})")
    if self.processes > 1:
      lines.append(f"per host ({self.processes} hosts x {self.devices_per_host} devices): "
                   f"resident {_gib(self.per_host(self.resident_bytes))}, "
                   f"peak {_gib(self.per_host(self.peak_bytes))} ({self.peak_step})")
    partial = any(s.temporaries is None for s in self.steps if s.error is None)
    for key in VERDICT_CHIPS:
      chip = flops.CHIPS[key]
      verdict = "fits" if self.fits(chip) else "does NOT fit"
      lines.append(f"  {verdict} on {chip.name} ({chip.hbm_gib:g} GiB, {HEADROOM:.0%} usable)"
                   + (" - without temporaries" if partial else ""))
    lines += [f"note: {n}" for n in self.notes]
    return "\n".join(lines)


def _gib(b: int | float) -> str:
  return f"{b / GiB:.3f} GiB" if b >= GiB / 100 else f"{b / 2 ** 20:.2f} MiB"
