"""Evaluation of a run: profiles of held-out users ranked over the catalogue, the baselines
and the per-user records.

:class:`Evaluator` holds what an evaluation reads (config, data, the current
embedder and profile writer) but no training state of its own; the trainer
decides when to evaluate and keeps the history.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from langptune_jax import parallel
from langptune_jax.models import embedder as embedder_lib
from langptune_jax.rec import metrics as metrics_lib
from langptune_jax.rec import retrieval
from langptune_jax.train import batches, setup
from langptune_jax.train import profiles as profiles_lib
from langptune_jax.train import state as state_lib
from langptune_jax.train.run_data import RunData, UserSplit

# embed_texts(tokens, mask, desc) -> [rows, D] on the host
EmbedTexts = Callable[[np.ndarray, np.ndarray, str], np.ndarray]
# write_profiles(users, key, greedy=..., desc=...) -> Profiles
WriteProfiles = Callable[..., profiles_lib.Profiles]


def metrics_from_ranks(ranks, ks, num_items) -> dict[str, float]:
  out = metrics_lib.metrics_at_k(jnp.asarray(ranks), tuple(ks), num_items)
  return {k: float(v) for k, v in out.items()}


def metrics_from_scores(scores, users: UserSplit, ks) -> dict[str, float]:
  ranks = metrics_lib.target_ranks(jnp.asarray(scores, jnp.float32), jnp.asarray(users.target),
                                   jnp.asarray(users.history))
  return metrics_from_ranks(ranks, ks, scores.shape[1])


@dataclasses.dataclass
class Evaluator:
  """Scores profiles (and baselines) of one split; writes per-user records."""

  config: object
  data: RunData
  workdir: str
  embed_texts: EmbedTexts
  write_profiles: WriteProfiles
  decoder_state: Callable[[], state_lib.TrainState]  # the decoder as it is now
  decoder_tokenizer: object
  mesh: object
  rules: object = parallel.DEFAULT_RULES

  @property
  def seed(self) -> int:
    return int(self.config.seed)

  def evaluate(self, tag: str, key: jax.Array, *, split: str | None = None,
               baselines: bool = False, write_records: bool = True) -> dict[str, dict]:
    """Profiles for held-out users, ranked over the full catalogue, plus baselines."""
    cfg = self.config.eval
    users = self.data.split(split or cfg.split).head(int(cfg.max_users))
    ks = tuple(int(k) for k in cfg.ks)
    item_emb = self.embed_texts(self.data.item_tokens, self.data.item_mask,
                                f"{tag}: embedding items")
    profiles = self.write_profiles(users, key, greedy=bool(cfg.greedy), desc=f"{tag}: profiles")
    profile_emb = self.embed_texts(profiles.decoder_tokens, profiles.decoder_mask,
                                   f"{tag}: embedding profiles")
    ranks = retrieval.rank_users(profile_emb, item_emb, users.target, users.history,
                                 mesh=self.mesh)
    results = {tag: metrics_from_ranks(ranks, ks, self.data.num_items)}
    if baselines:
      results.update(self.baselines(users, item_emb, ks))
    if write_records:
      self.write_records(tag, users, profiles, ranks)
    return results

  def baselines(self, users: UserSplit, item_emb: np.ndarray, ks) -> dict:
    from langptune_jax.rec import baselines as baselines_lib  # pylint: disable=g-import-not-at-top
    out = {}
    names = tuple(self.config.eval.baselines)
    n = self.data.num_items
    if "reference_query" in names:
      last = users.last_history_item()
      # No history: a zero query ties every item, so the target ranks last.
      query = np.where((last >= 0)[:, None], np.asarray(item_emb)[np.maximum(last, 0)], 0.0)
      out["reference_query"] = metrics_from_ranks(
          retrieval.rank_users(query, item_emb, users.target, users.history, mesh=self.mesh),
          ks, n)
    if "popularity" in names:
      scores = np.asarray(baselines_lib.popularity_scores(self.data.train_item_counts(), n))
      out["popularity"] = metrics_from_scores(np.broadcast_to(scores, (len(users), n)), users, ks)
    if "random" in names:
      scores = np.asarray(baselines_lib.random_scores(jax.random.key(self.seed), len(users), n))
      out["random"] = metrics_from_scores(scores, users, ks)
    if "sasrec" in names:
      sequences = [np.append(h[h >= 0], t) for h, t in zip(self.data.train.history,
                                                            self.data.train.target)]
      model = baselines_lib.train_sasrec(sequences, n, steps=int(self.config.eval.sasrec_steps),
                                         seed=self.seed, max_len=self.data.train.history.shape[1])
      histories = [h[h >= 0] for h in users.history]
      out["sasrec"] = metrics_from_scores(baselines_lib.sasrec_scores(model, histories), users, ks)
    if "history" in names and users.prompt_text and self.data.train.prompt_text:
      out["history"] = self.history_baseline(users, ks)
    return out

  def history_baseline(self, users: UserSplit, ks) -> dict[str, float]:
    """Raw prompts as queries, embedded by a copy of the decoder fine-tuned on them.

    The copy starts from the current decoder weights and runs
    ``eval.history_baseline_steps`` InfoNCE steps on (train prompt, target item)
    pairs; the decoder of the run itself is left untouched.
    """
    max_len = int(self.config.data.decoder_max_len)

    def tokens_of(split: UserSplit):
      return embedder_lib.tokenize_texts(self.decoder_tokenizer, split.prompt_text, max_len)

    decoder = self.decoder_state()
    graphdef, params = nnx.split(decoder.model)
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, params))  # the CL step donates its state
    copy, step = setup.make_cl_training(model, decoder.wrt, self.config.cl, 1, self.mesh,
                                        self.rules)
    train = self.data.train
    q_tokens, q_mask = tokens_of(train)
    batch_size = min(int(self.config.cl.batch_size), len(train))
    batch_size -= batch_size % parallel.data_parallel_size(self.mesh, self.rules)
    for i in range(int(self.config.eval.history_baseline_steps)):
      index = batches.rng_for(self.seed, 20_000, i).permutation(len(train))[:batch_size]
      batch = batches.cl_batch(q_tokens[index], q_mask[index], self.data, train.target[index])
      copy.state, _ = step(copy.state, parallel.global_batch(batch, self.mesh, self.rules))

    embed = setup.make_embed(copy, self.mesh, self.rules)
    embed_fn = lambda t, m: embed(copy.state, t, m)  # noqa: E731
    size = int(self.config.decoder.embed_batch_size)
    item_emb = retrieval.embed_catalogue(embed_fn, self.data.item_tokens, self.data.item_mask,
                                         size, mesh=self.mesh, desc="history baseline: items")
    query_emb = retrieval.embed_catalogue(embed_fn, *tokens_of(users), size, mesh=self.mesh,
                                          desc="history baseline: prompts")
    ranks = retrieval.rank_users(query_emb, item_emb, users.target, users.history, mesh=self.mesh)
    return metrics_from_ranks(ranks, ks, self.data.num_items)

  def write_records(self, tag: str, users: UserSplit, profiles, ranks) -> None:
    """One JSON line per user: prompt, profile, target and its rank."""
    path = os.path.join(self.workdir, "profiles", f"{tag}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    item_text = self.data.item_text
    with open(tmp, "w", encoding="utf-8") as f:
      for i in range(len(users)):
        target = int(users.target[i])
        f.write(json.dumps({
            "user": int(users.user[i]),
            "prompt": users.prompt_text[i] if users.prompt_text else None,
            "profile": profiles.texts[i],
            "target": target,
            "target_text": item_text[target] if item_text else None,
            "rank": int(ranks[i]),
        }, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
