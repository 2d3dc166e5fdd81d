"""Memory-bounding pieces of the training passes compute the plain update.

Full remat (each block recomputed in the backward pass) and the output head
taken a chunk of positions at a time must give the values and gradients of
the plain model: float32, within 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from langptune_jax import sampling
from langptune_jax.models import lora as lora_lib
from langptune_jax.models import presets, transformer

ATOL = 1e-5


def tiny_decoder(remat="none", lora=True):
  cfg = presets.decoder_config("tiny-llama", dtype="float32", param_dtype="float32", remat=remat)
  model = transformer.Decoder(cfg, rngs=nnx.Rngs(0))
  if lora:
    lora_lib.apply_lora(model, targets=("q", "v", "down", "lm_head"), rank=4, alpha=8.0,
                        init="peft", rngs=nnx.Rngs(1))
    # Non-zero B so that every adapter changes the output.
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
      if path[-1] == "lora_b":
        var.set_value(0.05 * jax.random.normal(jax.random.key(len(path)), var.get_value().shape))
  return model


def batch(rows=3, length=12, vocab=None, seed=0):
  rng = np.random.default_rng(seed)
  vocab = vocab or 64
  tokens = rng.integers(1, vocab, (rows, length)).astype(np.int32)
  mask = np.arange(length)[None] >= rng.integers(0, 4, (rows, 1))  # left padding
  return jnp.asarray(np.where(mask, tokens, 0)), jnp.asarray(mask)


def loss_and_grads(model, tokens, mask, chunk_size=128):
  def loss(m):
    logp, ent = sampling.token_logprobs(m, tokens, mask, return_entropy=True,
                                        chunk_size=chunk_size)
    return jnp.mean(logp) + 0.1 * jnp.mean(ent), logp

  (value, logp), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  return value, logp, grads


def assert_same_grads(a, b):
  flat_a, flat_b = dict(nnx.to_flat_state(a)), dict(nnx.to_flat_state(b))
  assert flat_a.keys() == flat_b.keys()
  nonzero = 0
  for path in flat_a:
    x, y = np.asarray(flat_a[path].get_value()), np.asarray(flat_b[path].get_value())
    np.testing.assert_allclose(x, y, atol=ATOL, rtol=0, err_msg=str(path))
    nonzero += bool(np.abs(x).max() > 0)
  assert nonzero > len(flat_a) // 2  # the gradients reach most of the model


def test_full_remat_gives_plain_values_and_gradients():
  tokens, mask = batch(vocab=presets.decoder_config("tiny-llama").vocab_size)
  plain = jax.jit(lambda t, m: loss_and_grads(tiny_decoder("none"), t, m))(tokens, mask)
  remat = jax.jit(lambda t, m: loss_and_grads(tiny_decoder("full"), t, m))(tokens, mask)
  np.testing.assert_allclose(float(remat[0]), float(plain[0]), atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(remat[1]), np.asarray(plain[1]), atol=ATOL, rtol=0)
  assert_same_grads(remat[2], plain[2])


def test_chunked_head_gives_plain_head_values_and_gradients():
  """Head over 5 positions at a time (with a ragged last chunk) vs all 12 at once."""
  model = tiny_decoder("none")
  tokens, mask = batch(vocab=model.config.vocab_size, seed=1)
  whole = loss_and_grads(model, tokens, mask, chunk_size=tokens.shape[1])
  chunked = loss_and_grads(model, tokens, mask, chunk_size=5)
  np.testing.assert_allclose(float(chunked[0]), float(whole[0]), atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(chunked[1]), np.asarray(whole[1]), atol=ATOL, rtol=0)
  assert_same_grads(chunked[2], whole[2])
  # The plain head by hand: log-softmax of every position's logits.
  hidden, _ = model(tokens, sampling.positions_from_mask(mask),
                    sampling.causal_padding_mask(mask), None, return_hidden=True)
  logp = jax.nn.log_softmax(model.logits_from_hidden(hidden[:, :-1]), axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  picked = jnp.where(mask[:, 1:] & mask[:, :-1], picked, 0.0)
  np.testing.assert_allclose(np.asarray(chunked[1][:, 1:]), np.asarray(picked), atol=ATOL, rtol=0)
