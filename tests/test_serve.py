"""The web API over a trained run: each request, each error, compiles and parallel requests."""

import concurrent.futures
import json

import httpx
import jax
import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_fixtures import genres_of, live_server

from langptune_jax import sampling
from langptune_jax.models import embedder as embedder_lib
from langptune_jax.serve import ranker as ranker_lib
from langptune_jax.serve.app import create_app
from langptune_jax.serve.load import open_session

pytestmark = pytest.mark.slow  # the ranking model is the real MiniLM

HORROR = "I love horror films: scary horror movies full of ghosts, monsters and screams."


@pytest.fixture(scope="module")
def client(served_session):
  return TestClient(create_app(served_session))


def _ok(response):
  assert response.status_code == 200, response.text
  return response.json()


def test_page_and_info(client, served_session):
  assert "<textarea id=\"profile\"" in client.get("/").text
  info = _ok(client.get("/api/info"))
  assert info["users"] == served_session.user_ids()[:len(info["users"])]
  assert info["num_items"] == len(served_session.titles) and info["top_k"] == 10


def test_profile_for_a_user_ranks_without_the_history(client, served_session):
  user = served_session.user_ids()[0]
  prompt = served_session.dataset_prompt(user)
  view = _ok(client.get(f"/api/users/{user}"))
  assert [h["item"] for h in view["history"]] == list(prompt.history)
  assert view["target"]["item"] == prompt.target
  out = _ok(client.post("/api/profile", json={"user": user, "temperature": 1.0, "seed": 3}))
  assert isinstance(out["profile"], str) and isinstance(out["zero_shot_profile"], str)
  for key in ("items", "zero_shot_items"):
    if isinstance(out[key], dict):  # a generated profile may be empty: the reason comes back
      assert "profile is empty" in out[key]["error"]
      continue
    assert [r["rank"] for r in out[key]] == list(range(1, 11))
    assert not {r["item"] for r in out[key]} & set(prompt.history)
    assert all(r["is_target"] == (r["item"] == prompt.target) for r in out[key])
  again = _ok(client.post("/api/profile", json={"user": user, "temperature": 1.0, "seed": 3}))
  assert again["profile"] == out["profile"]  # same seed, same profile


def _stream(client, body):
  with client.stream("POST", "/api/profile/stream", json=body) as response:
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.iter_lines() if line.strip()]


@pytest.mark.parametrize("temperature,seed", [(1.0, 5), (0.0, 0)])
def test_streamed_profile_grows_and_ends_as_the_written_one(client, served_session, temperature,
                                                            seed):
  body = {"user": served_session.user_ids()[4], "temperature": temperature, "seed": seed}
  lines = _stream(client, body)
  done = lines[-1]
  assert done.get("done") is True and not any("done" in m for m in lines[:-1])
  pieces = {field: [m[field] for m in lines[:-1] if field in m]
            for field in ("profile", "zero_shot_profile")}
  assert all(len(m) == 1 for m in lines[:-1])  # one growing text a line
  written = _ok(client.post("/api/profile", json=body))
  for field in ("profile", "zero_shot_profile"):
    assert pieces[field] and pieces[field][-1] == done[field] == written[field]
  assert done["items"] == written["items"]
  assert done["zero_shot_items"] == written["zero_shot_items"]
  if temperature > 0:  # 4 tokens a piece: the sampled 8-token profile arrives in two
    assert len(pieces["profile"]) == 2 and pieces["profile"][0] != done["profile"]


def test_edited_profile_reranks_with_moves(client, served_session):
  plain = _ok(client.post("/api/rank", json={"profile": "movies"}))["items"]
  scores = [r["score"] for r in plain]
  assert scores == sorted(scores, reverse=True) and all(r["move"] is None for r in plain)
  previous = [r["item"] for r in plain]
  edited = _ok(client.post("/api/rank", json={"profile": HORROR, "previous": previous}))["items"]
  for row in edited:
    if row["item"] in previous:
      assert row["move"] == previous.index(row["item"]) + 1 - row["rank"]
    else:
      assert row["move"] is None
  horror = sum("Horror" in genres_of(served_session, r["item"]) for r in edited)
  assert horror > sum("Horror" in genres_of(served_session, r["item"]) for r in plain)


def test_typed_history_by_title_and_id(client, served_session):
  titles = [served_session.titles[0], str(1)]
  out = _ok(client.post("/api/profile", json={"history": titles, "zero_shot": False}))
  assert [h["item"] for h in out["history"]] == [0, 1] and out["target"] is None
  assert "zero_shot_profile" not in out
  ranked = _ok(client.post("/api/rank", json={"profile": "comedy", "history": titles}))["items"]
  assert not {0, 1} & {r["item"] for r in ranked}


@pytest.mark.parametrize("request_json,status,message", [
    ({"profile": "horror " * 200}, 400, "data.decoder_max_len=48"),
    ({"profile": "   "}, 400, "profile is empty"),
    ({"profile": "x", "user": 99999}, 404, "unknown user id 99999"),
    ({"profile": "x", "history": ["No Such Film (1850)"]}, 404, "unknown item 'No Such Film"),
    ({"profile": 3}, 422, "profile"),
    ({"nothing": 1}, 422, "profile"),
])
def test_rank_errors_are_one_json_line(client, request_json, status, message):
  response = client.post("/api/rank", json=request_json)
  assert response.status_code == status, response.text
  assert set(response.json()) == {"error"} and message in response.json()["error"]
  assert "Traceback" not in response.text
  assert _ok(client.post("/api/rank", json={"profile": "drama"}))["items"]  # still serving


def test_profile_and_user_errors(client):
  for path, body, status, message in [
      ("/api/profile", {"user": 99999}, 404, "unknown user id 99999"),
      ("/api/profile", {"history": ["Nope (1111)"]}, 404, "history line 1: unknown item"),
      ("/api/profile", {"history": [" ", ""]}, 400, "history is empty"),
      ("/api/profile", {}, 400, "give exactly one of user, history"),
      ("/api/profile", {"user": 1, "temperature": -1}, 400, "temperature=-1.0"),
      ("/api/profile/stream", {"user": 99999}, 404, "unknown user id 99999"),
      ("/api/profile/stream", {"history": ["Nope (1111)"]}, 404, "history line 1: unknown item"),
      ("/api/profile/stream", {"user": 1, "temperature": -1}, 400, "temperature=-1.0"),
      ("/api/profile/stream", {"user": "x"}, 422, "user"),
  ]:
    response = client.post(path, json=body)
    assert response.status_code == status and message in response.json()["error"], response.text
  assert client.get("/api/users/99999").status_code == 404


def test_workdir_without_checkpoint_is_one_clear_error(served_run, tmp_path):
  cfg, _ = served_run
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*checkpoints: train first"):
    open_session(cfg, tmp_path)


def test_zero_shot_writer_is_the_base_model(served_session):
  from flax import nnx

  def lora_b(model):
    return {path: np.asarray(v.get_value()) for path, v in
            nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)) if path[-1] == "lora_b"}
  trained, base = lora_b(served_session.writer), lora_b(served_session.zero_shot_writer)
  assert trained.keys() == base.keys() and trained
  assert all(not b.any() for b in base.values())  # adapters start at zero
  assert any(t.any() for t in trained.values())  # and training moved them


def test_requests_do_not_compile(client, served_session):
  user = served_session.user_ids()[1]
  traces = []

  def on_event(event, *args, **kwargs):
    if event.endswith("jaxpr_trace_duration"):  # every jit trace (a compile or a cache load)
      traces.append(event)

  counts = (dict(ranker_lib.TRACE_COUNTS), dict(sampling.TRACE_COUNTS))
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    for i, profile in enumerate(["a", HORROR, "short comedy", "war " * 20]):
      _ok(client.post("/api/rank", json={"profile": profile, "user": user}))
      _ok(client.post("/api/profile", json={"user": user, "seed": i, "temperature": 0.5 + i}))
      assert _stream(client, {"user": user, "seed": i, "temperature": i})[-1]["done"]
    _ok(client.post("/api/profile", json={"history": ["0", "5", "7"], "temperature": 0}))
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert (dict(ranker_lib.TRACE_COUNTS), dict(sampling.TRACE_COUNTS)) == counts
  assert traces == []


def test_twenty_parallel_reranks_all_correct(served_session):
  profiles = [f"{genre} movies, {n}" for n in range(4)
              for genre in ("horror", "comedy", "western", "romance", "children's animation")]
  expected = [[r["item"] for r in served_session.rank(p)] for p in profiles]
  user = served_session.user_ids()[5]
  written = served_session.write_profile(served_session.dataset_prompt(user), seed=2,
                                         temperature=1.0)
  with live_server(served_session) as url:
    def ask(profile):
      response = httpx.post(f"{url}/api/rank", json={"profile": profile}, timeout=120)
      response.raise_for_status()
      return [r["item"] for r in response.json()["items"]]

    def stream():  # a profile streaming meanwhile
      body = {"user": user, "seed": 2, "temperature": 1.0, "zero_shot": False}
      with httpx.stream("POST", f"{url}/api/profile/stream", json=body, timeout=120) as response:
        return [json.loads(line) for line in response.iter_lines() if line.strip()][-1]

    with concurrent.futures.ThreadPoolExecutor(21) as pool:
      streamed = pool.submit(stream)
      answers = list(pool.map(ask, profiles))
  assert answers == expected
  assert streamed.result()["done"] and streamed.result()["profile"] == written


def test_short_profiles_embed_as_in_the_full_window(served_session):
  ranker = served_session.ranker
  assert ranker.widths == [16, 32, 48]
  for text in ["horror", "a quiet drama about two sisters and their long summer by the sea"]:
    tokens, mask = embedder_lib.tokenize_texts(ranker.tokenizer, [text], ranker.max_len)
    full = np.asarray(ranker.embed_rows(tokens, mask))[0]
    np.testing.assert_allclose(ranker.embed_profile(text), full / np.linalg.norm(full),
                               atol=1e-5)
