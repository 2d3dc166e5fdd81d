"""BERT encoder (all-MiniLM, mxbai-embed-large, ...) in Flax NNX, and its HF loader.

The network is the plain post-LayerNorm BERT encoder: word + position +
token-type embeddings, then blocks of self-attention and a GELU feed-forward
layer, each followed by a residual add and LayerNorm. There is no pooler head;
pooling lives in :mod:`langptune_jax.models.embedder`.

:func:`load_bert` reads a local Hugging Face directory (``config.json`` and
``model.safetensors`` or a sharded ``model.safetensors.index.json``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from langptune_jax import parallel
from langptune_jax.models import layers

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf), as torch's nn.GELU()
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape and numerics of a BERT encoder."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32
  remat: bool = False  # recompute each block in the backward pass (saves activation memory)
  # 'einsum': explicit scores, any key mask. 'fused': jax.nn.dot_product_attention with
  # per-row key lengths (cuDNN flash attention on GPU in bf16), which needs RIGHT padding.
  attention: str = "einsum"

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"BertConfig.hidden_act={self.hidden_act!r}: expected one of "
                       f"{', '.join(_ACTIVATIONS)}")
    if self.attention not in ("einsum", "fused"):
      raise ValueError(f"BertConfig.attention={self.attention!r}: expected 'einsum' or 'fused'")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"BertConfig.hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def config_from_hf(hf: dict, **overrides) -> BertConfig:
  """A :class:`BertConfig` from the dict of an HF ``config.json`` (BERT family)."""
  model_type = hf.get("model_type", "bert")
  if model_type not in ("bert",):
    raise ValueError(f"config.json model_type={model_type!r}: only 'bert' is supported here")
  position_type = hf.get("position_embedding_type", "absolute")
  if position_type != "absolute":
    raise ValueError(f"config.json position_embedding_type={position_type!r}: only 'absolute' "
                     "is supported")
  try:
    kwargs = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(hf["num_attention_heads"]),
        intermediate_size=int(hf["intermediate_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        hidden_act=str(hf.get("hidden_act", "gelu")),
    )
  except KeyError as e:
    raise ValueError(f"config.json: missing field {e.args[0]!r} for a BERT model") from None
  kwargs.update(overrides)
  return BertConfig(**kwargs)


# --- modules -----------------------------------------------------------------

class BertEmbeddings(nnx.Module):
  """word + absolute position + token type embeddings, then LayerNorm."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    init = layers.default_init()
    self.word = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                             param_dtype=cfg.param_dtype, rngs=rngs)
    self.position = nnx.Param(
        init(rngs.params(), (cfg.max_position_embeddings, cfg.hidden_size), cfg.param_dtype),
        out_sharding=("length", "embed"))
    self.token_type = nnx.Param(
        init(rngs.params(), (cfg.type_vocab_size, cfg.hidden_size), cfg.param_dtype),
        out_sharding=(None, "embed"))
    self.norm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype)
    self.dtype = cfg.dtype

  def __call__(self, tokens: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    length = tokens.shape[1]
    x = self.word(tokens)
    x = x + self.position[...][:length].astype(self.dtype)[None]
    x = x + jnp.take(self.token_type[...].astype(self.dtype), token_type_ids, axis=0)
    return parallel.constrain(self.norm(x), ("activation_batch", "length", "embed"))


class BertAttention(nnx.Module):
  """Bidirectional multi-head self-attention with key padding mask."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    kw = dict(use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.query = layers.Linear(d, d, axes=("embed", "heads"), **kw)
    self.key = layers.Linear(d, d, axes=("embed", "heads"), **kw)
    self.value = layers.Linear(d, d, axes=("embed", "heads"), **kw)
    self.out = layers.Linear(d, d, axes=("heads", "embed"), **kw)
    self.num_heads, self.head_dim, self.dtype = cfg.num_heads, cfg.head_dim, cfg.dtype
    self.fused = cfg.attention == "fused"

  def _split(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    x = x.reshape(b, t, self.num_heads, self.head_dim)
    return parallel.constrain(x, ("activation_batch", "length", "heads", "head_dim"))

  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    q = self._split(self.query(x)) * jnp.asarray(self.head_dim ** -0.5, self.dtype)
    k = self._split(self.key(x))
    v = self._split(self.value(x))
    if self.fused:
      # Right padding: the real keys of a row are its first `length` positions.
      lengths = jnp.sum(key_mask, axis=1, dtype=jnp.int32)
      ctx = jax.nn.dot_product_attention(q, k, v, scale=1.0, key_value_seq_lengths=lengths)
    else:
      # Scores and softmax in float32 whatever the compute dtype.
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
      scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
      ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    ctx = parallel.constrain(ctx, ("activation_batch", "length", "heads", "head_dim"))
    b, t = ctx.shape[:2]
    y = self.out(ctx.reshape(b, t, self.num_heads * self.head_dim))
    return parallel.constrain(y, ("activation_batch", "length", "embed"))


class BertMlp(nnx.Module):
  """up-projection, GELU, down-projection."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.up = layers.Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.down = layers.Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)
    self.act = _ACTIVATIONS[cfg.hidden_act]

  def __call__(self, x: jax.Array) -> jax.Array:
    h = parallel.constrain(self.act(self.up(x)), ("activation_batch", "length", "mlp"))
    return parallel.constrain(self.down(h), ("activation_batch", "length", "embed"))


class BertLayer(nnx.Module):
  """One post-LN encoder block."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    ln = dict(eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.attn = BertAttention(cfg, rngs=rngs)
    self.attn_norm = layers.LayerNorm(cfg.hidden_size, **ln)
    self.mlp = BertMlp(cfg, rngs=rngs)
    self.mlp_norm = layers.LayerNorm(cfg.hidden_size, **ln)

  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    x = self.attn_norm(x + self.attn(x, key_mask))
    x = self.mlp_norm(x + self.mlp(x))
    return parallel.constrain(x, ("activation_batch", "length", "embed"))


class Bert(nnx.Module):
  """BERT encoder: ``(tokens [B,T], attention_mask [B,T]) -> hidden states [B,T,D]``."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = BertEmbeddings(cfg, rngs=rngs)
    self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

  def __call__(self, tokens: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    if tokens.ndim != 2:
      raise ValueError(f"Bert: tokens must be [batch, length], got shape {tokens.shape}")
    if tokens.shape[1] > self.config.max_position_embeddings:
      raise ValueError(f"Bert: sequence length {tokens.shape[1]} exceeds "
                       f"max_position_embeddings={self.config.max_position_embeddings}")
    if attention_mask.shape != tokens.shape:
      raise ValueError(f"Bert: attention_mask shape {attention_mask.shape} != tokens shape "
                       f"{tokens.shape}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(tokens)
    key_mask = attention_mask.astype(bool)
    x = self.embeddings(tokens, token_type_ids)
    run = (functools.partial(layers.checkpointed_call, _run_layer) if self.config.remat
           else _run_layer)
    for layer in self.layers:
      x = run(layer, x, key_mask)
    return x


def _run_layer(layer: BertLayer, x: jax.Array, key_mask: jax.Array) -> jax.Array:
  return layer(x, key_mask)


# --- loading from a Hugging Face directory ------------------------------------

# Tensors that a checkpoint may carry but this encoder does not use.
_IGNORED_PREFIXES = ("pooler.", "cls.")
_IGNORED_NAMES = ("embeddings.position_ids",)


def _read_config(path: pathlib.Path) -> dict:
  file = path / "config.json"
  if not file.is_file():
    raise FileNotFoundError(f"{file}: no config.json in the model directory")
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: invalid JSON ({e})") from None


def _iter_tensors(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
  """(name, numpy array) for every tensor of a safetensors checkpoint, sharded or not."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  index = path / "model.safetensors.index.json"
  single = path / "model.safetensors"
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: no 'weight_map' object")
    files = sorted(set(weight_map.values()))
  elif single.is_file():
    files = [single.name]
  else:
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json "
                            "found (only safetensors checkpoints are supported)")
  for name in files:
    file = path / name
    if not file.is_file():
      raise FileNotFoundError(f"{file}: listed in the index but missing")
    with safe_open(str(file), framework="np") as f:
      for key in f.keys():
        yield key, f.get_tensor(key)


def _hf_name_map(cfg: BertConfig) -> dict[str, tuple[tuple, bool]]:
  """HF tensor name -> (path of our variable, transpose?)."""
  m = {
      "embeddings.word_embeddings.weight": (("embeddings", "word", "embedding"), False),
      "embeddings.position_embeddings.weight": (("embeddings", "position"), False),
      "embeddings.token_type_embeddings.weight": (("embeddings", "token_type"), False),
      "embeddings.LayerNorm.weight": (("embeddings", "norm", "scale"), False),
      "embeddings.LayerNorm.bias": (("embeddings", "norm", "bias"), False),
  }
  linears = {"attention.self.query": ("attn", "query"), "attention.self.key": ("attn", "key"),
             "attention.self.value": ("attn", "value"), "attention.output.dense": ("attn", "out"),
             "intermediate.dense": ("mlp", "up"), "output.dense": ("mlp", "down")}
  norms = {"attention.output.LayerNorm": ("attn_norm",), "output.LayerNorm": ("mlp_norm",)}
  for i in range(cfg.num_layers):
    prefix = f"encoder.layer.{i}."
    for hf, ours in linears.items():
      m[prefix + hf + ".weight"] = (("layers", i) + ours + ("kernel",), True)
      m[prefix + hf + ".bias"] = (("layers", i) + ours + ("bias",), False)
    for hf, ours in norms.items():
      m[prefix + hf + ".weight"] = (("layers", i) + ours + ("scale",), False)
      m[prefix + hf + ".bias"] = (("layers", i) + ours + ("bias",), False)
  return m


def _canonical(name: str) -> str:
  """Strips a model prefix and maps old TF-style LayerNorm names."""
  for prefix in ("bert.", "model."):
    if name.startswith(prefix):
      name = name[len(prefix):]
      break
  if name.endswith("LayerNorm.gamma"):
    name = name[: -len("gamma")] + "weight"
  elif name.endswith("LayerNorm.beta"):
    name = name[: -len("beta")] + "bias"
  return name


def load_bert(path, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh: Mesh | None = None,
              rules=parallel.DEFAULT_RULES, remat: bool = False,
              attention: str = "einsum") -> tuple[Bert, BertConfig]:
  """Loads a BERT encoder from a local HF directory.

  Args:
    path: directory with ``config.json`` and safetensors weights.
    dtype: compute dtype.
    param_dtype: storage dtype of the parameters.
    mesh: if given, every parameter is placed in its sharding on this mesh
      (each tensor goes straight to its shards; no full replica per device).
    rules: logical axis rules.
    remat: recompute each block in the backward pass.
    attention: 'einsum' or 'fused' (see :class:`BertConfig`; 'fused' needs right padding).

  Returns:
    (model, config).
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: BERT model directory not found")
  cfg = config_from_hf(_read_config(path), dtype=dtype, param_dtype=param_dtype, remat=remat,
                       attention=attention)
  # Build the module without materialising random weights, then fill it in.
  model = nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0)))
  variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  name_map = _hf_name_map(cfg)
  filled: set[tuple] = set()
  for raw_name, array in _iter_tensors(path):
    name = _canonical(raw_name)
    if name in _IGNORED_NAMES or name.startswith(_IGNORED_PREFIXES):
      continue
    if name not in name_map:
      raise ValueError(f"{path}: unexpected tensor {raw_name!r} (shape {array.shape}) for a "
                       f"BERT model with {cfg.num_layers} layers")
    key, transpose = name_map[name]
    var = variables[key]
    if transpose:
      array = array.T
    expected = tuple(var.get_value().shape)
    if tuple(array.shape) != expected:
      raise ValueError(f"{path}: tensor {raw_name!r} has shape {tuple(array.shape)}, expected "
                       f"{expected}{' (transposed)' if transpose else ''}")
    array = np.asarray(array).astype(param_dtype)
    if mesh is not None:
      axes = parallel._variable_axes(var)  # pylint: disable=protected-access
      value = parallel.put(array, mesh, axes, rules)
    else:
      value = jnp.asarray(array)
    var.set_value(value)
    filled.add(key)
  missing = [name for name, (key, _) in name_map.items() if key not in filled]
  if missing:
    raise ValueError(f"{path}: missing tensor {missing[0]!r}"
                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  return model, cfg


def hf_state(model: Bert) -> dict[str, np.ndarray]:
  """HF BertModel tensor names -> host arrays (the inverse of :func:`load_bert`'s mapping)."""
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  out = {}
  for hf_name, (path, transpose) in _hf_name_map(model.config).items():
    value = np.asarray(jax.device_get(flat[path].get_value()), np.float32)
    out[hf_name] = value.T if transpose else value
  return out
