"""The `serve` command: a web page to read, edit and re-rank a user's profile.

FastAPI over one :class:`~langptune_jax.serve.session.Session`. Handlers are
plain functions (FastAPI runs them in its thread pool; the session serialises
the JAX calls). Every bad request gets a 4xx answer ``{"error": "..."}`` and
the server keeps serving. ``/api/profile/stream`` sends the profile while it
is written, as JSON lines.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel

from langptune_jax import settings as settings_lib
from langptune_jax.serve.session import Prompt, Session, UnknownError

PAGE = pathlib.Path(__file__).with_name("static") / "index.html"
MAX_USERS_LISTED = 500


class ProfileRequest(BaseModel):
  user: Optional[int] = None
  history: Optional[list[str]] = None
  seed: int = 0
  temperature: Optional[float] = None
  zero_shot: bool = True


class RankRequest(BaseModel):
  profile: str
  user: Optional[int] = None
  history: Optional[list[str]] = None
  previous: Optional[list[int]] = None


def _prompt(session: Session, user, history) -> Prompt:
  if (user is None) == (history is None):
    raise ValueError("give exactly one of user, history")
  if user is not None:
    return session.dataset_prompt(user)
  return session.history_prompt(session.resolve_items(history))


def _items_context(session: Session, user, history) -> tuple[tuple[int, ...], int | None]:
  """(items to leave out, target) for a ranking request; nothing for a bare profile."""
  if user is None and history is None:
    return (), None
  if user is not None and history is None:
    prompt = session.dataset_prompt(user)
    return prompt.history, prompt.target
  if user is None:
    return tuple(session.resolve_items(history)), None
  raise ValueError("give at most one of user, history")


def create_app(session: Session) -> FastAPI:
  app = FastAPI(title="LangPTune-JAX", docs_url=None, redoc_url=None)

  @app.exception_handler(UnknownError)
  def _unknown(request: Request, exc: UnknownError):
    return JSONResponse({"error": str(exc)}, status_code=404)

  @app.exception_handler(ValueError)
  def _bad(request: Request, exc: ValueError):
    return JSONResponse({"error": str(exc)}, status_code=400)

  @app.exception_handler(RequestValidationError)
  def _malformed(request: Request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return JSONResponse({"error": f"{where}: {first.get('msg', 'malformed request')}"},
                        status_code=422)

  @app.get("/", response_class=HTMLResponse)
  def page():
    return HTMLResponse(PAGE.read_text())

  @app.get("/api/info")
  def info():
    return {"users": session.user_ids()[:MAX_USERS_LISTED], "num_items": len(session.titles),
            "top_k": session.top_k, "profile_max_tokens": session.profile_len}

  @app.get("/api/users/{user}")
  def user_view(user: int):
    prompt = session.dataset_prompt(user)
    return {"user": user, "target": _item(session, prompt.target),
            "history": [_item(session, i) for i in prompt.history]}

  @app.post("/api/profile")
  def profile(req: ProfileRequest):
    prompt = _prompt(session, req.user, req.history)
    texts = {"profile": session.write_profile(prompt, seed=req.seed,
                                              temperature=req.temperature)}
    if req.zero_shot:
      texts["zero_shot_profile"] = session.write_profile(
          prompt, seed=req.seed, temperature=req.temperature, zero_shot=True)
    return _profile_answer(session, prompt, texts)

  @app.post("/api/profile/stream")
  def profile_stream(req: ProfileRequest):
    """/api/profile as JSON lines: {"profile": text so far} while it is written (then
    {"zero_shot_profile": ...}), and last the whole answer with "done": true."""
    prompt = _prompt(session, req.user, req.history)
    streams = {"profile": session.stream_profile(prompt, seed=req.seed,
                                                 temperature=req.temperature)}
    if req.zero_shot:
      streams["zero_shot_profile"] = session.stream_profile(
          prompt, seed=req.seed, temperature=req.temperature, zero_shot=True)

    def lines():
      texts = {}
      try:
        for field, stream in streams.items():
          texts[field] = ""
          for text in stream:
            texts[field] = text
            yield json.dumps({field: text}) + "\n"
        yield json.dumps(dict(_profile_answer(session, prompt, texts), done=True)) + "\n"
      except Exception as e:  # the status line is already sent: the error is the last line
        yield json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")

  @app.post("/api/rank")
  def rank(req: RankRequest):
    exclude, target = _items_context(session, req.user, req.history)
    return {"items": session.rank(req.profile, exclude=exclude, target=target,
                                  previous=req.previous)}

  return app


def _item(session: Session, item: int | None):
  return None if item is None else {"item": item, "title": session.titles[item]}


def _profile_answer(session: Session, prompt: Prompt, texts: dict) -> dict:
  """The profiles with their rankings, the user's history and the held-out target."""
  out = {"profile": texts["profile"], "target": _item(session, prompt.target),
         "history": [_item(session, i) for i in prompt.history],
         "items": _rank_or_error(session, texts["profile"], prompt)}
  if "zero_shot_profile" in texts:
    out["zero_shot_profile"] = texts["zero_shot_profile"]
    out["zero_shot_items"] = _rank_or_error(session, texts["zero_shot_profile"], prompt)
  return out


def _rank_or_error(session: Session, text: str, prompt: Prompt):
  """A generated profile may be empty; the page shows why instead of failing the request."""
  try:
    return session.rank(text, exclude=prompt.history, target=prompt.target)
  except ValueError as e:
    return {"error": str(e)}


def run(config, workdir) -> int:
  """Entry point of `langptune-jax serve`: loads the run once, then serves until Ctrl-C."""
  import uvicorn

  from langptune_jax.serve.load import open_session
  session = open_session(config, workdir)
  serve = settings_lib.of(config).serve
  host, port = serve.host, serve.port
  print(f"serving {workdir} on http://{host}:{port} (Ctrl-C stops)")
  uvicorn.run(create_app(session), host=host, port=port, log_level="warning")
  return 0
