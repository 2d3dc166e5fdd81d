"""Model FLOPs, chip peak throughput, MFU and step timing.

FLOPs are counted analytically from a model's dimensions (a ``DecoderConfig``
or a ``BertConfig``): two FLOPs per multiply-accumulate of every matmul, plus
the attention score and value products. Element-wise work (norms, softmax,
activations) is ignored, as is usual for MFU. Model FLOPs count the work the
algorithm needs, not what rematerialisation recomputes.

Chip peaks are dense bf16 TFLOP/s per chip from the vendors' data sheets;
``--config.profile.peak_tflops`` overrides the table (and is the only source
on CPU).

:class:`StepTimer` times jitted steps with compilation separated from
execution (XLA traces of a step window: ``observability.ProfileWindow``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Callable

import jax

# --- model dimensions ------------------------------------------------------


def _dim(config, *names: str, default: Any = None) -> Any:
  """The first attribute of `config` among `names` (model configs name things differently)."""
  for name in names:
    value = getattr(config, name, None)
    if value is not None:
      return value
  if default is not None:
    return default
  raise ValueError(f"{type(config).__name__}: none of the fields {', '.join(names)} is set")


@dataclasses.dataclass(frozen=True)
class Dims:
  """The dimensions FLOPs depend on, read from a decoder or BERT config."""
  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  gated_mlp: bool  # Llama/Gemma: gate, up, down; BERT: up, down
  lm_head: bool  # decoders project onto the vocabulary; embedders don't
  causal: bool


def dims_of(config) -> Dims:
  """Reads :class:`Dims` from a ``DecoderConfig``, a ``BertConfig`` or anything alike."""
  if isinstance(config, Dims):
    return config
  family = str(getattr(config, "family", "")).lower()
  is_bert = family == "bert" or type(config).__name__.lower().startswith("bert")
  embed = int(_dim(config, "embed_dim", "hidden_size", "d_model"))
  heads = int(_dim(config, "num_heads", "num_attention_heads"))
  return Dims(
      vocab_size=int(_dim(config, "vocab_size")),
      embed_dim=embed,
      num_layers=int(_dim(config, "num_layers", "num_hidden_layers")),
      num_heads=heads,
      num_kv_heads=int(_dim(config, "num_kv_heads", "num_key_value_heads", default=heads)),
      head_dim=int(_dim(config, "head_dim", default=embed // heads)),
      mlp_dim=int(_dim(config, "mlp_dim", "intermediate_size", "hidden_dim")),
      gated_mlp=not is_bert,
      lm_head=not is_bert,
      causal=not is_bert,
  )


def matmul_params(config) -> dict[str, int]:
  """Weights that take part in a matmul per token, by group (embeddings are lookups)."""
  d = dims_of(config)
  q = d.embed_dim * d.num_heads * d.head_dim
  kv = 2 * d.embed_dim * d.num_kv_heads * d.head_dim
  o = d.num_heads * d.head_dim * d.embed_dim
  mlp = (3 if d.gated_mlp else 2) * d.embed_dim * d.mlp_dim
  return {
      "attention": d.num_layers * (q + kv + o),
      "mlp": d.num_layers * mlp,
      "lm_head": d.embed_dim * d.vocab_size if d.lm_head else 0,
  }


def lora_params(config, rank: int, targets=("q", "k", "v", "o", "gate", "up", "down",
                                             "lm_head")) -> int:
  """Adapter weights of rank `rank` on the named projections (rank x (in + out) each)."""
  if rank <= 0:
    return 0
  d = dims_of(config)
  e, qd, kvd = d.embed_dim, d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
  shapes = {"q": (e, qd), "k": (e, kvd), "v": (e, kvd), "o": (qd, e),
            "gate": (e, d.mlp_dim) if d.gated_mlp else None, "up": (e, d.mlp_dim),
            "down": (d.mlp_dim, e)}
  per_layer = sum(rank * sum(shapes[t]) for t in targets if t in shapes and shapes[t])
  total = d.num_layers * per_layer
  if "lm_head" in targets and d.lm_head:
    total += rank * (e + d.vocab_size)
  return total


def _attention_flops(d: Dims, context: float) -> float:
  """Scores (q.k) and weighted values (p.v) of one query over `context` keys."""
  return 2 * 2 * d.num_layers * d.num_heads * d.head_dim * context


def _mean_context(d: Dims, seq_len: int) -> float:
  # A causal token i attends to i + 1 positions; on average (T + 1) / 2.
  return (seq_len + 1) / 2 if d.causal else float(seq_len)


def forward_flops_per_token(config, seq_len: int, *, lora_rank: int = 0,
                            lora_targets=None) -> float:
  """Forward FLOPs per token of a full sequence of `seq_len` tokens (prefill, scoring, embedding)."""
  d = dims_of(config)
  n = sum(matmul_params(d).values())
  n += lora_params(d, lora_rank, **({"targets": lora_targets} if lora_targets else {}))
  return 2.0 * n + _attention_flops(d, _mean_context(d, seq_len))


def train_flops_per_token(config, seq_len: int, *, trainable_params: int | None = None,
                          lora_rank: int = 0, lora_targets=None) -> float:
  """Forward + backward FLOPs per token.

  The backward pass always propagates activation gradients through every
  matmul (as much work as the forward) and through attention (twice the
  forward), but computes weight gradients (2 FLOPs per weight) only for the
  weights that train. `trainable_params=None` means every weight trains (the
  familiar 6N rule); with LoRA pass the adapter count (or 0 for frozen).
  """
  d = dims_of(config)
  n = sum(matmul_params(d).values())
  n_lora = lora_params(d, lora_rank, **({"targets": lora_targets} if lora_targets else {}))
  n_all = n + n_lora
  if trainable_params is None:
    trainable_params = n_lora if lora_rank > 0 else n_all
  attention = _attention_flops(d, _mean_context(d, seq_len))
  forward = 2.0 * n_all + attention
  backward = 2.0 * n_all + 2.0 * attention + 2.0 * trainable_params
  return forward + backward


def decode_flops_per_token(config, context_len: float, *, lora_rank: int = 0,
                           lora_targets=None) -> float:
  """FLOPs of one decoded token attending to `context_len` cached positions."""
  d = dims_of(config)
  n = sum(matmul_params(d).values())
  n += lora_params(d, lora_rank, **({"targets": lora_targets} if lora_targets else {}))
  return 2.0 * n + _attention_flops(d, context_len)


def sample_flops(config, batch: int, prompt_len: int, new_tokens: int, *,
                 lora_rank: int = 0) -> float:
  """FLOPs of prefilling `batch` prompts and decoding `new_tokens` tokens each."""
  prefill = batch * prompt_len * forward_flops_per_token(config, prompt_len, lora_rank=lora_rank)
  # Decode step t attends to prompt_len + t + 1 positions; sum the arithmetic series.
  mean_context = prompt_len + (new_tokens + 1) / 2
  decode = batch * new_tokens * decode_flops_per_token(config, mean_context, lora_rank=lora_rank)
  return prefill + decode


# --- the project's steps (model FLOPs per call, for tokens/s and MFU) -------


def rlso_pass_flops(config, rows: int, prompt_len: int, response_len: int, *,
                    lora_rank: int = 0, trainable_params: int | None = None) -> float:
  """One RLSO pass: forward + backward of `rows` prompt+response sequences."""
  seq = prompt_len + response_len
  return rows * seq * train_flops_per_token(config, seq, lora_rank=lora_rank,
                                            trainable_params=trainable_params)


def logprobs_flops(config, rows: int, seq_len: int, *, lora_rank: int = 0,
                   with_reference: bool = True) -> float:
  """Scoring a rollout batch: the policy forward, plus the reference forward."""
  one = rows * seq_len * forward_flops_per_token(config, seq_len, lora_rank=lora_rank)
  return one * (2 if with_reference else 1)


def cl_step_flops(config, rows: int, seq_len: int, *,
                  trainable_params: int | None = None) -> float:
  """One CL update: profiles and target items, forward + backward each."""
  return 2 * rows * seq_len * train_flops_per_token(config, seq_len,
                                                    trainable_params=trainable_params)


def embed_flops(config, rows: int, seq_len: int) -> float:
  """Embedding `rows` texts of `seq_len` tokens (catalogue, profiles for rewards)."""
  return rows * seq_len * forward_flops_per_token(config, seq_len)


# --- chips -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_tflops: float  # dense bf16 per chip
  hbm_gib: float  # memory per chip (per device as JAX sees it)
  hbm_gbps: float = 0.0  # memory bandwidth per chip, GB/s (the decode roofline); 0: unknown


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275.0, 32.0, 1200.0),
    "v5e": Chip("v5e", 197.0, 16.0, 819.0),
    "v5p": Chip("v5p", 459.0, 95.0, 2765.0),
    "v6e": Chip("v6e", 918.0, 32.0, 1640.0),
    "a100": Chip("A100", 312.0, 80.0, 2039.0),
    "h100": Chip("H100", 989.0, 80.0, 3350.0),
    "h200": Chip("H200", 989.0, 141.0, 4800.0),
}

# Substrings of `jax.Device.device_kind` -> chip key; the first match wins, so
# the more specific names come first.
_DEVICE_KINDS = (
    ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"), ("tpu v5", "v5p"),
    ("v6 lite", "v6e"), ("v6e", "v6e"), ("tpu v4", "v4"),
    ("h200", "h200"), ("gh200", "h200"), ("h100", "h100"), ("a100", "a100"),
)


def chip(name: str) -> Chip:
  """A chip by name (case-insensitive: v4, v5e, v5p, v6e, A100, H100, H200)."""
  key = name.strip().lower()
  if key not in CHIPS:
    raise ValueError(f"unknown chip {name!r}; known: {', '.join(c.name for c in CHIPS.values())}")
  return CHIPS[key]


def chip_for_device(device: jax.Device | None = None) -> Chip | None:
  """The table entry for a device (default: the first one), or None (CPU, unknown)."""
  device = device or jax.devices()[0]
  kind = str(getattr(device, "device_kind", "")).lower()
  for pattern, key in _DEVICE_KINDS:
    if pattern in kind:
      return CHIPS[key]
  return None


def peak_tflops(override: float = 0.0, device: jax.Device | None = None) -> float:
  """Peak TFLOP/s per chip: `override` when > 0, else the table; 0 when unknown (no MFU)."""
  if override and override > 0:
    return float(override)
  found = chip_for_device(device)
  return found.peak_tflops if found else 0.0


def mfu(flops: float, seconds: float, num_devices: int, peak_tflops_per_device: float) -> float:
  """Model FLOPs utilisation: achieved / (devices x peak); 0 when the peak is unknown."""
  if seconds <= 0 or num_devices <= 0 or peak_tflops_per_device <= 0:
    return 0.0
  return flops / seconds / (num_devices * peak_tflops_per_device * 1e12)


# --- timing ----------------------------------------------------------------


_COMPILE_EVENT_PREFIX = "/jax/core/compile/"
_compile_seconds = threading.local()
_listener_installed = False


def _on_event_duration(name: str, seconds: float, **kwargs) -> None:
  del kwargs
  if name.startswith(_COMPILE_EVENT_PREFIX) and hasattr(_compile_seconds, "value"):
    _compile_seconds.value += seconds


def _install_listener() -> None:
  # JAX reports tracing, lowering and backend compile durations as monitoring
  # events; one process-wide listener adds them up for the timed call.
  global _listener_installed
  if not _listener_installed:
    jax.monitoring.register_event_duration_secs_listener(_on_event_duration)
    _listener_installed = True


class StepTimer:
  """Times a jitted step, keeping compile time apart from step time.

  ``step = timer.wrap(jitted_fn)`` returns a callable with the same arguments
  (works for ``jax.jit`` and ``nnx.jit`` alike). JAX's own compile events
  (tracing, lowering, XLA compilation) during a call are summed as compile
  time; a call that compiled is not counted as a step, since its run time
  includes one-off work. Each step waits for its outputs (so step times are
  real) unless ``sync=False``.

  ``timer.metrics(tokens=..., flops=...)`` then gives the last step's time,
  tokens/s, TFLOP/s per device and MFU, plus the accumulated compile time.
  """

  def __init__(self, name: str = "step", *, num_devices: int | None = None,
               peak_tflops_per_device: float | None = None, sync: bool = True,
               log: Callable[[str], Any] | None = logging.info):
    _install_listener()
    self.name = name
    self.num_devices = num_devices or jax.device_count()
    self.peak = peak_tflops() if peak_tflops_per_device is None else peak_tflops_per_device
    self.sync = sync
    self.log = log
    self.compile_time_s = 0.0  # JAX compile events, summed
    self.num_compiles = 0  # calls that compiled
    self.last_step_s = 0.0
    self.total_step_s = 0.0
    self.num_steps = 0

  def wrap(self, fn: Callable) -> Callable:
    def timed(*args, **kwargs):
      outer = getattr(_compile_seconds, "value", None)
      _compile_seconds.value = 0.0
      start = time.perf_counter()
      try:
        out = fn(*args, **kwargs)
        if self.sync:
          jax.block_until_ready(out)
      finally:
        elapsed = time.perf_counter() - start
        compiled = _compile_seconds.value
        # Nested timers: the outer call sees the inner compile time too.
        if outer is None:
          del _compile_seconds.value
        else:
          _compile_seconds.value = outer + compiled
      if compiled > 0:
        self.compile_time_s += compiled
        self.num_compiles += 1
        if self.log:
          self.log(f"{self.name}: compiled in {compiled:.2f}s (first call {elapsed:.2f}s)")
      else:
        self.last_step_s = elapsed
        self.total_step_s += elapsed
        self.num_steps += 1
      return out
    return timed

  @property
  def mean_step_s(self) -> float:
    return self.total_step_s / self.num_steps if self.num_steps else 0.0

  def metrics(self, *, tokens: float = 0.0, flops: float = 0.0, prefix: str | None = None) -> dict:
    """Throughput of the last timed step; keys are prefixed with `prefix` (default: the name)."""
    p = f"{self.name if prefix is None else prefix}/"
    s = self.last_step_s
    out = {p + "step_time_s": s, p + "compile_time_s": self.compile_time_s}
    if tokens and s > 0:
      out[p + "tokens_per_s"] = tokens / s
    if flops and s > 0:
      out[p + "tflops_per_device"] = flops / s / self.num_devices / 1e12
      if self.peak > 0:
        out[p + "mfu"] = mfu(flops, s, self.num_devices, self.peak)
    return out
