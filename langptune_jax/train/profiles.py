"""Writing user profiles with the encoder, and turning them into decoder inputs.

Profiles are generated in fixed-size batches of prompts (the last batch is
padded with copies, then dropped) so the sampler compiles once per shape. The
generated tokens are decoded to text on the host and re-tokenized with the
decoder's tokenizer; a profile that fills the whole decoder window was cut and
is marked ``truncated`` (it earns the penalty reward in the RL phase).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from langptune_jax import distributed, observability, parallel, sampling
from langptune_jax import settings as settings_lib
from langptune_jax.models import embedder as embedder_lib


@dataclasses.dataclass
class Profiles:
  """Profiles of a set of users, aligned with the rows given to :func:`write_profiles`."""

  texts: list[str]
  ranker_tokens: np.ndarray  # int32 [U, L], right-padded
  ranker_mask: np.ndarray  # [U, L]
  truncated: np.ndarray  # bool [U]
  response_tokens: np.ndarray | None = None  # int32 [U, N]
  response_mask: np.ndarray | None = None  # bool [U, N]


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  stop_at_eos: bool
  eos_ids: tuple[int, ...]
  pad_id: int
  cache_size: int | None = None

  @classmethod
  def from_config(cls, config, eos_ids, pad_id) -> "SamplingSettings":
    """From the ``rl`` and ``encoder`` sections of `config` (Settings or a validated config)."""
    s = settings_lib.of(config)
    return cls(s.rl.response_length, s.rl.temperature, s.rl.top_k, s.rl.top_p,
               s.rl.stop_at_eos, tuple(int(e) for e in eos_ids), int(pad_id),
               s.encoder.cache_size or None)


def eos_ids(tokenizer, model) -> tuple[int, ...]:
  """The ids that end a profile: those of the encoder's config and its tokenizer's EOS."""
  ids = set()
  source = getattr(model.config, "eos_ids", None)
  if source:
    ids.update(int(i) for i in (source if isinstance(source, (list, tuple)) else [source]))
  if getattr(tokenizer, "eos_token_id", None) is not None:
    ids.add(int(tokenizer.eos_token_id))
  if not ids:
    raise ValueError("the encoder has no EOS token id (neither its config nor its tokenizer)")
  return tuple(sorted(ids))


def generate(model, prompt_tokens, prompt_mask, settings: SamplingSettings, rng,
             greedy: bool = False) -> sampling.SampleOutput:
  return sampling.sample(
      model, prompt_tokens, prompt_mask, rng=rng, max_new_tokens=settings.max_new_tokens,
      temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
      eos_ids=settings.eos_ids, pad_id=settings.pad_id, stop_at_eos=settings.stop_at_eos,
      greedy=greedy, cache_size=settings.cache_size)


def decode_responses(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  """Response token rows -> profile texts (masked tokens and special tokens dropped)."""
  rows = [row[m.astype(bool)].tolist() for row, m in zip(np.asarray(tokens), np.asarray(mask))]
  return [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def to_ranker_inputs(texts: list[str], tokenizer, max_len: int):
  tokens, mask = embedder_lib.tokenize_texts(tokenizer, texts, max_len)
  return tokens, mask, np.asarray(embedder_lib.is_truncated(mask), bool)


def padded_batches(arrays, batch_size: int, desc: str):
  """Yields (real rows, batch): `batch_size` rows of every array at a time, with a progress bar.

  The last batch is padded with copies of its last row, so every batch has one shape
  (one compilation); callers keep the first `real rows` of each result.
  """
  num = arrays[0].shape[0]
  for start in observability.progress(range(0, num, batch_size), desc=desc):
    stop = min(start + batch_size, num)
    pad = batch_size - (stop - start)
    yield stop - start, [np.concatenate([a[start:stop]] + [a[stop - 1:stop]] * pad) for a in arrays]


def write_profiles(model, prompt_tokens: np.ndarray, prompt_mask: np.ndarray, *,
                   settings: SamplingSettings, writer_tokenizer, ranker_tokenizer,
                   decoder_max_len: int, batch_size: int, rng: jax.Array, greedy: bool = False,
                   mesh=None, rules=parallel.DEFAULT_RULES, desc: str = "writing profiles",
                   keep_tokens: bool = False) -> Profiles:
  """Generates one profile per prompt row, `batch_size` prompts at a time."""
  num = prompt_tokens.shape[0]
  if num == 0:
    raise ValueError(f"{desc}: no users to write profiles for")
  texts, responses, masks = [], [], []
  with parallel.use_mesh(mesh, rules):
    batches = padded_batches((prompt_tokens, prompt_mask), batch_size, desc)
    for i, (real, (tok, msk)) in enumerate(batches):
      out = generate(model, tok, msk, settings, jax.random.fold_in(rng, i), greedy=greedy)
      out_tokens, out_mask = distributed.to_host((out.tokens, out.response_mask))
      out_tokens, out_mask = out_tokens[:real], out_mask[:real]
      texts.extend(decode_responses(writer_tokenizer, out_tokens, out_mask))
      if keep_tokens:
        responses.append(out_tokens)
        masks.append(out_mask)
  tokens, mask, truncated = to_ranker_inputs(texts, ranker_tokenizer, decoder_max_len)
  return Profiles(texts, tokens, mask, truncated,
                  np.concatenate(responses) if keep_tokens else None,
                  np.concatenate(masks) if keep_tokens else None)


@nnx.jit
def _reference_sums(model, reference, prompt_tokens, prompt_mask, response_tokens, response_mask):
  return sampling.reference_sequence_logprobs(reference, model, prompt_tokens, prompt_mask,
                                              response_tokens, response_mask)


def reference_logprobs(model, reference, prompt_tokens: np.ndarray, prompt_mask: np.ndarray,
                       response_tokens: np.ndarray, response_mask: np.ndarray, *,
                       batch_size: int, mesh=None, rules=parallel.DEFAULT_RULES,
                       desc: str = "scoring profiles") -> np.ndarray:
  """Each response's summed token log-prob (T=1) under the frozen reference writer, [U].

  `reference` is the run's :class:`models.finetune.ReferencePolicy`; rows go
  `batch_size` at a time (the last batch padded with copies of its last row).
  """
  dp = parallel.data_parallel_size(mesh, rules) if mesh is not None else 1
  batch_size = -(-batch_size // dp) * dp
  arrays = (prompt_tokens, prompt_mask, response_tokens, response_mask)
  sums = []
  with parallel.use_mesh(mesh, rules):
    for real, rows in padded_batches(arrays, batch_size, desc):
      if mesh is not None:
        rows = list(parallel.global_batch(dict(enumerate(rows)), mesh, rules).values())
      out = _reference_sums(model, reference, *rows)
      sums.append(np.asarray(distributed.to_host(out))[:real])
  return np.concatenate(sums)
