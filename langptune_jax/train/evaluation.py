"""Evaluation of a run: profiles of held-out users ranked over the catalogue, the baselines
and the per-user records.

:class:`Evaluator` holds what an evaluation reads (settings, data, the current
embedder and profile writer) but no training state of its own; the trainer
decides when to evaluate and keeps the history.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from langptune_jax import distributed, fs, observability, parallel
from langptune_jax import settings as settings_lib
from langptune_jax.data import prompts as prompts_lib
from langptune_jax.rec import metrics as metrics_lib
from langptune_jax.rec import readability as readability_lib
from langptune_jax.rec import retrieval
from langptune_jax.rec import stats as stats_lib
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


def ranks_from_scores(scores, users: UserSplit) -> np.ndarray:
  return np.asarray(metrics_lib.target_ranks(jnp.asarray(scores, jnp.float32),
                                             jnp.asarray(users.target),
                                             jnp.asarray(users.history)))


@dataclasses.dataclass
class Evaluator:
  """Scores profiles (and baselines) of one split; writes per-user records.

  Keeps, per split, the zero-shot profile texts and the target ranks of every row
  computed once before training (zero-shot profiles and baselines), so later
  evaluations add the "CL only" row and compare against them; and the users every
  baseline fit has seen (`note_fit`, the leakage check).
  """

  settings: settings_lib.Settings
  data: RunData
  workdir: str
  embed_texts: EmbedTexts
  # embed_items(desc) -> [items, D]: the catalogue under the current decoder (the trainer
  # reuses one pass until the decoder moves)
  embed_items: Callable[[str], np.ndarray]
  write_profiles: WriteProfiles
  ranker_state: Callable[[], state_lib.TrainState]  # the decoder as it is now
  ranker_tokenizer: object
  mesh: object
  rules: object = parallel.DEFAULT_RULES
  writer_tokenizer: object = None
  sampling: object = None  # profile-writing settings at evaluation (eval.temperature)
  note_fit: Callable[[str, np.ndarray], None] = lambda name, users: None
  # reference_logprobs(prompt_tokens, prompt_mask, response_tokens, response_mask) -> [U]:
  # each profile's log-prob under the frozen reference writer (the perplexity readout)
  reference_logprobs: Callable | None = None
  reference_ranks: dict = dataclasses.field(default_factory=dict)  # split -> row -> ranks
  zero_shot_texts: dict = dataclasses.field(default_factory=dict)  # split -> profile texts
  zero_shot_readability: dict = dataclasses.field(default_factory=dict)  # split -> summary
  # Baseline fits (SASRec, the history decoder) shared by the splits evaluated before
  # training; `forget_fits` drops them once those evaluations are done.
  fits: dict = dataclasses.field(default_factory=dict)

  @property
  def seed(self) -> int:
    return self.settings.seed

  def evaluate(self, tag: str, key: jax.Array, *, split: str | None = None,
               baselines: bool = False, write_records: bool = True) -> dict:
    """Profiles for held-out users, ranked over the full catalogue, beside every reference row.

    Rows of `split`: this evaluation's profiles (`tag`); the baselines (computed now when
    `baselines`, else the ranks kept from when they ran); zero-shot profiles; and "CL only",
    the zero-shot profiles embedded by the current decoder. Returns the history entry:
    metrics, bootstrap intervals over users and paired differences against zero-shot.
    """
    cfg = self.settings.eval
    split = split or cfg.split
    users = self.data.split(split).head(cfg.max_users)
    ks = cfg.ks
    n = self.data.num_items
    item_emb = self.embed_items(f"{tag}: embedding items")
    profiles = self.write_profiles(users, key, greedy=cfg.greedy, desc=f"{tag}: profiles",
                                   settings=self.sampling, keep_tokens=self._scores_perplexity)
    readability = {tag: self.readability(users, profiles)}
    ranks = {tag: self._rank_texts(profiles.ranker_tokens, profiles.ranker_mask, users,
                                   item_emb, f"{tag}: embedding profiles")}
    kept = self.reference_ranks.setdefault(split, {})
    if tag == "zero_shot":
      self.zero_shot_texts[split] = list(profiles.texts)
      self.zero_shot_readability[split] = readability[tag]
      kept["zero_shot"] = ranks[tag].tolist()
    elif split in self.zero_shot_texts:
      if split in self.zero_shot_readability:
        readability["zero_shot"] = self.zero_shot_readability[split]
      tokens, mask, _ = profiles_lib.to_ranker_inputs(
          self.zero_shot_texts[split], self.ranker_tokenizer,
          self.settings.data.decoder_max_len)
      ranks["cl_only"] = self._rank_texts(tokens, mask, users, item_emb,
                                          f"{tag}: embedding zero-shot profiles")
    if baselines:
      kept.update({name: r.tolist() for name, r in self.baseline_ranks(users, item_emb).items()})
    ranks.update({name: np.asarray(r) for name, r in kept.items() if name not in ranks})
    results = {name: metrics_from_ranks(r, ks, n) for name, r in ranks.items()}
    summary = stats_lib.summarize_ranks(
        ranks, ks, n, reference="zero_shot", samples=cfg.bootstrap_samples,
        confidence=cfg.confidence, seed=self.seed)
    if write_records:
      name = tag if split == cfg.split or tag == "final" else f"{tag}_{split}"
      self.write_records(name, users, profiles, ranks[tag])
    return {"tag": tag, "split": split, "users": len(users), "results": results,
            "intervals": summary.get("intervals", {}),
            "vs_zero_shot": summary.get("vs_reference", {}),
            "readability": readability,
            "bootstrap": {k: summary[k] for k in ("samples", "confidence", "seed")
                          if k in summary}}

  @property
  def _scores_perplexity(self) -> bool:
    return self.reference_logprobs is not None and self.settings.eval.reference_perplexity

  def readability(self, users: UserSplit, profiles: profiles_lib.Profiles) -> dict:
    """distinct-1/2 of the profiles and, when enabled, their reference perplexity."""
    cfg = self.settings.eval
    sums = counts = None
    if self._scores_perplexity:  # the profiles were written with keep_tokens
      sums = self.reference_logprobs(users.prompt_tokens, users.prompt_mask,
                                     profiles.response_tokens, profiles.response_mask)
      counts = np.asarray(profiles.response_mask).sum(axis=1)
    return readability_lib.summarize(profiles.texts, sums, counts,
                                     samples=cfg.bootstrap_samples, confidence=cfg.confidence,
                                     seed=self.seed)

  def forget_fits(self) -> None:
    """Drops the baseline fits kept for the next split (frees the history decoder)."""
    self.fits.clear()

  def _rank_texts(self, tokens, mask, users: UserSplit, item_emb, desc: str) -> np.ndarray:
    query = self.embed_texts(tokens, mask, desc)
    return np.asarray(retrieval.rank_users(query, item_emb, users.target, users.history,
                                           mesh=self.mesh))

  def baseline_ranks(self, users: UserSplit, item_emb: np.ndarray) -> dict[str, np.ndarray]:
    """Target ranks of each configured baseline; every fit sees train users only."""
    from langptune_jax.rec import baselines as baselines_lib  # pylint: disable=g-import-not-at-top
    out = {}
    names = self.settings.eval.baselines
    n = self.data.num_items
    train = self.data.train
    if "reference_query" in names:
      last = users.last_history_item()
      # No history: a zero query ties every item, so the target ranks last.
      query = np.where((last >= 0)[:, None], np.asarray(item_emb)[np.maximum(last, 0)], 0.0)
      out["reference_query"] = np.asarray(
          retrieval.rank_users(query, item_emb, users.target, users.history, mesh=self.mesh))
    if "popularity" in names:
      self.note_fit("popularity", train.user)  # train_item_counts reads the train split
      scores = np.asarray(baselines_lib.popularity_scores(self.data.train_item_counts(), n))
      out["popularity"] = ranks_from_scores(np.broadcast_to(scores, (len(users), n)), users)
    if "random" in names:
      scores = np.asarray(baselines_lib.random_scores(jax.random.key(self.seed), len(users), n))
      out["random"] = ranks_from_scores(scores, users)
    if "sasrec" in names:
      self.note_fit("sasrec", train.user)
      if "sasrec" not in self.fits:
        sequences = [np.append(h[h >= 0], t) for h, t in zip(train.history, train.target)]
        self.fits["sasrec"] = baselines_lib.train_sasrec(
            sequences, n, steps=self.settings.eval.sasrec_steps, seed=self.seed,
            max_len=train.history.shape[1])
      model = self.fits["sasrec"]
      histories = [h[h >= 0] for h in users.history]
      out["sasrec"] = ranks_from_scores(baselines_lib.sasrec_scores(model, histories), users)
    if "history" in names and users.prompt_text and train.prompt_text:
      out["history"] = self.history_baseline(users)
    return out

  def history_baseline(self, users: UserSplit) -> np.ndarray:
    """The raw-history baseline (the authors' recipe): target ranks of `users`.

    Queries are the history blocks without chat wrapper or instruction, left-padded
    to ``baselines.history_pad_len`` decoder tokens with the last
    ``baselines.history_max_len`` kept. A copy of the decoder as it is now (before
    training: the fresh decoder) runs ``history_rounds x history_steps`` InfoNCE
    steps on (train query, target) pairs at ``history_lr``, in batches of
    ``history_batch_size``; the decoder of the run itself is left untouched.
    """
    from langptune_jax.rec import baselines as baselines_lib  # pylint: disable=g-import-not-at-top
    bl = self.settings.baselines
    instruction = prompts_lib.resolve_instruction(self.settings.data)

    def tokens_of(split: UserSplit):
      texts = [prompts_lib.history_text(p, instruction, self.writer_tokenizer)
               for p in split.prompt_text]
      return baselines_lib.history_query_tokens(
          self.ranker_tokenizer, texts, bl.history_pad_len, bl.history_max_len)

    if "history" not in self.fits:
      self.fits["history"] = self._fit_history_decoder(tokens_of)
    embed_fn, item_emb = self.fits["history"]
    query_emb = retrieval.embed_catalogue(embed_fn, *tokens_of(users),
                                          self.settings.decoder.embed_batch_size,
                                          mesh=self.mesh, desc="history baseline: queries")
    return np.asarray(retrieval.rank_users(query_emb, item_emb, users.target, users.history,
                                           mesh=self.mesh))

  def _fit_history_decoder(self, tokens_of):
    """Trains the history baseline's decoder copy; returns (embed fn, item embeddings)."""
    bl = self.settings.baselines
    train = self.data.train
    batch_size = min(bl.history_batch_size, len(train))
    batch_size -= batch_size % parallel.data_parallel_size(self.mesh, self.rules)
    cl = self.settings.cl
    micro = cl.micro_batch_size
    if micro and batch_size % micro:
      micro = 0
    # One InfoNCE batch of global negatives per step, at the baseline's learning rate.
    opt = dataclasses.replace(cl, lr=bl.history_lr, negatives="global", micro_batch_size=micro)
    total = bl.history_rounds * bl.history_steps
    decoder = self.ranker_state()
    graphdef, params = nnx.split(decoder.model)
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, params))  # the CL step donates its state
    copy, step = setup.make_cl_training(model, decoder.wrt, opt, max(total, 1), self.mesh,
                                        self.rules)
    q_tokens, q_mask = tokens_of(train)
    for i in observability.progress(range(total), desc="history baseline: decoder", total=total):
      index = batches.batch_rows(self.seed, len(train), batch_size, i, 20_000, 6)
      self.note_fit("history", train.user[index])
      batch = batches.cl_batch(q_tokens[index], q_mask[index], self.data, train.target[index])
      copy.state, _ = step(copy.state, parallel.global_batch(batch, self.mesh, self.rules))

    embed = setup.make_embed(copy, self.mesh, self.rules)
    embed_fn = lambda t, m: embed(copy.state, t, m)  # noqa: E731
    size = self.settings.decoder.embed_batch_size
    item_emb = retrieval.embed_catalogue(embed_fn, self.data.item_tokens, self.data.item_mask,
                                         size, mesh=self.mesh, desc="history baseline: items")
    return embed_fn, item_emb

  def write_records(self, tag: str, users: UserSplit, profiles, ranks) -> None:
    """One JSON line per user: prompt, profile, target and its rank (written by the coordinator)."""
    if not distributed.is_coordinator():
      return
    lines = []
    item_text = self.data.item_text
    for i in range(len(users)):
      target = int(users.target[i])
      lines.append(json.dumps({
          "user": int(users.user[i]),
          "prompt": users.prompt_text[i] if users.prompt_text else None,
          "profile": profiles.texts[i],
          "target": target,
          "target_text": item_text[target] if item_text else None,
          "rank": int(ranks[i]),
      }, ensure_ascii=False) + "\n")
    fs.write_text(fs.join(self.workdir, "profiles", f"{tag}.jsonl"), "".join(lines))
