"""Both models of a config from shapes alone, and the bytes each device holds of them.

``langptune-jax plan`` (:mod:`langptune_jax.plan`) builds the training set-up
with ``nnx.eval_shape`` (no weights) and counts every leaf's shard shape.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from langptune_jax import parallel
from langptune_jax import settings as settings_lib
from langptune_jax.models import presets, transformer

# --- per-device bytes ----------------------------------------------------------

def _leaf_bytes(value, sharding) -> int:
  """Bytes one device holds of an array (abstract or not) with `sharding`."""
  shape = tuple(value.shape)
  local = sharding.shard_shape(shape) if sharding is not None else shape
  return int(math.prod(local)) * jnp.dtype(value.dtype).itemsize


def kv_cache_bytes(cfg: transformer.DecoderConfig, batch: int, cache_len: int, mesh,
                   rules=parallel.DEFAULT_RULES, dtype=None) -> int:
  """Per-device bytes of the KV cache: 2 x layers x [batch, kv_heads, len, head_dim]."""
  shape = (batch, cfg.num_kv_heads, cache_len, cfg.head_dim)
  spec = parallel.logical_to_spec(transformer.KV_AXES, rules, mesh)
  sharding = NamedSharding(mesh, parallel.fit_spec(spec, shape, mesh))
  item = jnp.dtype(dtype or cfg.compute_dtype).itemsize
  return 2 * cfg.num_layers * int(math.prod(sharding.shard_shape(shape))) * item


# --- abstract models -----------------------------------------------------------

@dataclasses.dataclass
class AbstractModel:
  """A train state from shapes alone (``ShapeDtypeStruct`` leaves with shardings)."""
  train_state: Any  # train.state.TrainState
  config: Any  # the architecture's config
  trainable_params: int
  total_params: int

  @property
  def state(self):
    return self.train_state.state

  @property
  def shardings(self):
    return self.train_state.shardings


def model_constructors(config) -> tuple[Callable[[], nnx.Module], Callable[[], nnx.Module]]:
  """Constructors of the encoder (LLM) and decoder (embedder) from presets or config.json."""
  from langptune_jax.models import bert  # pylint: disable=g-import-not-at-top
  from langptune_jax.models import embedder as embedder_lib  # pylint: disable=g-import-not-at-top
  settings = settings_lib.of(config)
  e, r = settings.encoder, settings.decoder
  ecfg = presets.decoder_config(e.preset, e.path, section="encoder",
                                dtype=e.dtype, param_dtype=e.param_dtype, remat=e.remat)
  if r.family == "bert":
    rcfg = presets.bert_config(r.preset, r.path, dtype=jnp.dtype(r.dtype),
                               param_dtype=jnp.dtype(r.param_dtype), remat=r.remat != "none")
    make_model = lambda: bert.Bert(rcfg, rngs=nnx.Rngs(0))  # noqa: E731
  else:
    rcfg = presets.decoder_config(r.preset, r.path, section="decoder", dtype=r.dtype,
                                  param_dtype=r.param_dtype, remat=r.remat)
    make_model = lambda: transformer.Decoder(rcfg, rngs=nnx.Rngs(0))  # noqa: E731

  def make_decoder():
    return embedder_lib.Embedder(make_model(), family=r.family, pooling=r.pooling,
                                 normalize=r.normalize)

  return (lambda: transformer.Decoder(ecfg, rngs=nnx.Rngs(0))), make_decoder


def abstract_setup(config, mesh, rules=parallel.DEFAULT_RULES, *, eos_ids=None,
                   pad_id: int = 0):
  """The training set-up of `config` (train.setup) from shapes alone.

  `eos_ids` default to the encoder config's (the tokenizer may add more; they
  change constants, not shapes).
  """
  from langptune_jax.train import setup  # pylint: disable=g-import-not-at-top
  make_encoder, make_decoder = model_constructors(config)
  if eos_ids is None:
    eos_ids = tuple(nnx.eval_shape(make_encoder).config.eos_ids) or (1,)
  return setup.build_abstract(config, make_encoder, make_decoder, eos_ids=eos_ids,
                              pad_id=pad_id, mesh=mesh, rules=rules)


def abstract_models(s) -> tuple[AbstractModel, AbstractModel]:
  """(writer, ranker) of an abstract set-up `s`, with their parameter counts."""
  return (AbstractModel(s.writer_state, s.writer_config, s.writer_trainable, s.writer_total),
          AbstractModel(s.ranker_state, s.ranker_config, s.ranker_trainable, s.ranker_total))


def encoder_model(config, mesh, rules=parallel.DEFAULT_RULES) -> AbstractModel:
  """The profile encoder (LLM) with LoRA / partial / full training and its AdamW."""
  return abstract_models(abstract_setup(config, mesh, rules))[0]


def split_state_bytes(m: AbstractModel) -> tuple[int, int, int]:
  """(frozen params, trainable params, optimizer state) per device."""
  flat_state = dict(nnx.to_flat_state(m.state))
  flat_shard = dict(nnx.to_flat_state(m.shardings))
  is_trainable = nnx.filterlib.to_predicate(m.train_state.wrt)
  frozen = trainable = opt = 0
  for path, var in flat_state.items():
    b = _leaf_bytes(var.get_value(), flat_shard[path].get_value())
    if path[0] == 1:  # (model, optimizer) was split as a pair
      opt += b
    elif is_trainable(path[1:], var):
      trainable += b
    else:
      frozen += b
  return frozen, trainable, opt


def lora_notes(config, m: AbstractModel) -> list[str]:
  """Where the set-up (train.setup.add_adapters) put the encoder's adapters, from its state."""
  settings = settings_lib.of(config)
  if settings.encoder.training != "lora":
    return []
  from langptune_jax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  paths = [path[1:] for path in dict(nnx.to_flat_state(m.state)) if path[0] == 0]
  sites = lora_lib.adapter_sites(paths)
  notes = [f"LoRA r={settings.lora.rank} on {len(sites)} layers"]
  if "head_lora" in sites:
    notes[0] += ("; the encoder ties its embeddings, so the lm_head adapter acts on the output "
                 "head only (the input embedding lookup is unchanged)")
  return notes


def struct_bytes(*structs) -> int:
  """Per-device bytes of abstract arrays (``ShapeDtypeStruct`` with shardings)."""
  return sum(_leaf_bytes(x, x.sharding) for x in jax.tree.leaves(structs))
