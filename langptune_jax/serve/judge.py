"""The `judge` command: can a reader pick a user's next item from the profile alone?

The paper's simulated-user check, run locally. For each user, N candidates (the
held-out target and N-1 items sampled from the rest of the catalogue, the
user's history excluded) go to a judge LLM with the profile; it picks one. The
accuracy is compared with chance (1/N), with a Wilson 95% interval, for the
zero-shot and the trained profiles of the same users on the same candidates.

The local judge scores each candidate's text by its log-probability after the
profile minus its log-probability after a profile-free prompt (so an item that
is likely whatever the profile says gains nothing), and picks the best. An
OpenAI-compatible endpoint (``judge.endpoint``) is instead asked to answer with
the candidate's number.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.request
from typing import Callable, Sequence

import jax
import numpy as np

from langptune_jax import fs, observability, sampling
from langptune_jax import settings as settings_lib
from langptune_jax.serve.ranker import on_one_device
from langptune_jax.weights import tokenizer as tok_lib

# (profile, candidate texts) -> index of the chosen candidate
Chooser = Callable[[str, Sequence[str]], int]

CONTEXT = "A user describes their taste: {profile}\nThe next item this user chose: "
NEUTRAL = "The next item a user chose: "


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion (sane at 0 and 1, unlike the normal one)."""
  if total <= 0:
    return 0.0, 1.0
  p = correct / total
  centre = (p + z * z / (2 * total)) / (1 + z * z / total)
  half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
  return max(0.0, centre - half), min(1.0, centre + half)


def candidates(target: int, exclude: Sequence[int], num_items: int, n: int,
               rng: np.random.Generator) -> tuple[list[int], int]:
  """(candidate item ids, the target's position): the target plus n-1 sampled negatives."""
  pool = np.setdiff1d(np.arange(num_items), np.asarray(list(exclude) + [target], np.int64))
  if len(pool) < n - 1:
    raise ValueError(f"judge.num_candidates={n}: the catalogue has only {len(pool)} negatives")
  items = list(rng.choice(pool, n - 1, replace=False)) + [target]
  order = rng.permutation(n)
  items = [int(items[i]) for i in order]
  return items, items.index(target)


def accuracy(choose: Chooser, profiles: Sequence[str], cases: Sequence[tuple[list[int], int]],
             item_text: Sequence[str], desc: str = "judging") -> dict:
  """Accuracy of `choose` over (candidates, target position) cases, with chance and interval."""
  pairs = observability.progress(list(zip(profiles, cases)), desc=desc)
  correct = sum(int(choose(p, [item_text[i] for i in items]) == pos) for p, (items, pos) in pairs)
  total = len(cases)
  low, high = wilson_interval(correct, total)
  n = len(cases[0][0]) if cases else 0
  return {"accuracy": correct / max(total, 1), "correct": correct, "total": total,
          "chance": 1.0 / n if n else 0.0, "interval95": [low, high]}


class LocalJudge:
  """A causal LM the project loads (HF directory or .gguf) scoring candidate texts."""

  def __init__(self, model, tokenizer):
    self.model = on_one_device(model)
    self.tokenizer = tokenizer
    self.pad = next((int(v) for v in (tokenizer.pad_token_id, tokenizer.eos_token_id)
                     if v is not None), 0)

  @classmethod
  def from_path(cls, path, dtype: str = "float32") -> "LocalJudge":
    from langptune_jax.weights import hf as hf_weights
    model, _ = hf_weights.load_decoder(str(path), dtype=dtype, param_dtype=dtype)
    return cls(model, tok_lib.load_tokenizer(str(path)))

  def _encode(self, texts: Sequence[str], left: bool, special: bool):
    ids = tok_lib.batch_encode(self.tokenizer, list(texts), add_special_tokens=special)
    length = sampling.bucket_length(max(len(r) for r in ids))  # few shapes, few compiles
    tokens, mask = tok_lib.pad_batch(ids, length, self.pad, left=left)
    return tokens, mask.astype(bool)

  def log_probs(self, contexts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
    prompt, prompt_mask = self._encode(contexts, left=True, special=True)
    response, response_mask = self._encode(texts, left=False, special=False)
    out = sampling.sequence_logprobs(self.model, prompt, prompt_mask, response, response_mask)
    return np.asarray(jax.device_get(out), np.float64)

  def __call__(self, profile: str, texts: Sequence[str]) -> int:
    n = len(texts)
    contexts = [CONTEXT.format(profile=profile)] * n + [NEUTRAL] * n
    logp = self.log_probs(contexts, list(texts) * 2)
    return int(np.argmax(logp[:n] - logp[n:]))


class EndpointJudge:
  """An OpenAI-compatible chat endpoint asked for the candidate's number."""

  def __init__(self, url: str, model: str, timeout_s: float = 60.0):
    self.url = url.rstrip("/") + "/chat/completions"
    self.model = model
    self.timeout_s = timeout_s

  def __call__(self, profile: str, texts: Sequence[str]) -> int:
    listing = "\n\n".join(f"[{i + 1}] {t}" for i, t in enumerate(texts))
    question = (f"User profile:\n{profile}\n\nCandidates:\n{listing}\n\nWhich candidate will this "
                "user choose next? Answer with its number only.")
    body = json.dumps({"model": self.model, "temperature": 0,
                       "messages": [{"role": "user", "content": question}]}).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
      headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    request = urllib.request.Request(self.url, data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
      answer = json.load(response)["choices"][0]["message"]["content"]
    found = re.search(r"\d+", answer)
    pick = int(found.group()) - 1 if found else -1
    return pick if 0 <= pick < len(texts) else -1  # an unusable answer counts as wrong


def make_judge(config) -> Chooser:
  jd = config.judge
  if jd.endpoint:
    return EndpointJudge(str(jd.endpoint), str(jd.model))
  path = str(jd.path)
  if not path:
    from langptune_jax import assets
    path = str(assets.asset_path("smollm2"))
  return LocalJudge.from_path(path)


def judge_run(config, session, choose: Chooser) -> dict:
  """Zero-shot vs trained profiles of eval.split's users, judged on the same candidates."""
  settings = settings_lib.of(config)
  users = session.data.split(settings.eval.split)
  limit = settings.judge.max_users
  ids = [int(u) for u in (users.user[:limit] if limit else users.user)]
  rng = np.random.default_rng(settings.judge.seed)
  greedy = settings.eval.greedy
  n = settings.judge.num_candidates
  cases, trained, zero = [], [], []
  for user in ids:
    prompt = session.dataset_prompt(user)
    cases.append(candidates(prompt.target, prompt.history, len(session.titles), n, rng))
    for out, zero_shot in ((trained, False), (zero, True)):
      out.append(session.write_profile(prompt, seed=settings.seed + user,
                                       temperature=0.0 if greedy else None, zero_shot=zero_shot))
  text = session.data.item_text
  return {"split": settings.eval.split, "num_candidates": n, "users": ids,
          "zero_shot": accuracy(choose, zero, cases, text, "judging zero-shot profiles"),
          "trained": accuracy(choose, trained, cases, text, "judging trained profiles")}


def format_table(result: dict) -> str:
  lines = [f"judge: {len(result['users'])} users of {result['split']}, "
           f"{result['num_candidates']} candidates each (chance "
           f"{1 / result['num_candidates']:.3f})",
           f"{'profiles':<10} {'accuracy':>8}  95% interval",
           ]
  for name in ("zero_shot", "trained"):
    r = result[name]
    lines.append(f"{name:<10} {r['accuracy']:>8.3f}  [{r['interval95'][0]:.3f}, "
                 f"{r['interval95'][1]:.3f}]  ({r['correct']}/{r['total']})")
  return "\n".join(lines)


def run(config, workdir) -> int:
  """Entry point of `langptune-jax judge`: prints the table and writes judge.json."""
  from langptune_jax.serve.load import open_session
  session = open_session(config, workdir, warm_up=False)
  result = judge_run(config, session, make_judge(config))
  path = fs.join(str(workdir), "judge.json")
  fs.write_text(path, json.dumps(result, indent=2))
  print(format_table(result))
  print(f"\nwritten: {path}")
  return 0
