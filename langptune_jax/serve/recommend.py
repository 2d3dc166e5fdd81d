"""The `recommend` command: a profile and the top-k items for one user, in the terminal.

``langptune-jax recommend --config=C --workdir=RUN`` with one of ``--user ID``,
``--history FILE`` (item ids or titles, one a line; ``-`` reads stdin) or
``--profile TEXT`` (skips generation). ``--format json`` prints one JSON object.
"""

from __future__ import annotations

import json
import pathlib
import sys

from langptune_jax import settings as settings_lib
from langptune_jax.serve import flags as serve_flags
from langptune_jax.serve import ranker as ranker_lib
from langptune_jax.serve.load import open_session


def _history_lines(source: str) -> list[str]:
  if source == "-":
    return sys.stdin.read().splitlines()
  path = pathlib.Path(source).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"--history={source}: file not found")
  return path.read_text().splitlines()


def recommend(config, workdir, *, user=None, history=None, profile=None,
              output_format: str = "text", out=None, session=None) -> int:
  """Prints the profile and its top-k items; the flags arrive as keyword arguments.

  `session`: an already opened session of `workdir` (else it is opened here).
  """
  out = out or sys.stdout
  given = [name for name, v in (("--user", user), ("--history", history), ("--profile", profile))
           if v is not None]
  if len(given) != 1:
    raise ValueError(f"give exactly one of --user, --history, --profile (got "
                     f"{', '.join(given) or 'none'})")
  lines = _history_lines(history) if history is not None else None
  if profile is not None and not profile.strip():  # before minutes of loading models
    raise ValueError(ranker_lib.EMPTY_PROFILE)
  session = session or open_session(config, workdir, warm_up=False)
  if profile is not None:
    prompt = None
    session.check_profile(profile)
  elif user is not None:
    prompt = session.dataset_prompt(int(user))
  else:
    prompt = session.history_prompt(session.resolve_items(lines))
  if prompt is not None:
    settings = settings_lib.of(config)
    profile = session.write_profile(prompt, seed=settings.seed,
                                    temperature=0.0 if settings.eval.greedy else None)
    if not profile.strip():
      raise ValueError("the profile writer wrote an empty profile; sample one instead "
                       "(--config.eval.greedy=False, another --config.seed)")
  items = session.rank(profile, exclude=prompt.history if prompt else (),
                       target=prompt.target if prompt else None)
  if output_format == "json":
    print(json.dumps({"user": user, "profile": profile, "items": items}), file=out)
    return 0
  print(f"profile:\n  {profile}\n", file=out)
  print(f"{'rank':>4}  {'score':>7}  {'target':<6}  title", file=out)
  for row in items:
    mark = "" if row["is_target"] is None else ("yes" if row["is_target"] else "")
    print(f"{row['rank']:>4}  {row['score']:>7.4f}  {mark:<6}  {row['title']}", file=out)
  return 0


def run(config, workdir) -> int:
  """Entry point of `langptune-jax recommend`."""
  return recommend(config, workdir, user=serve_flags.value("user"),
                   history=serve_flags.value("history"), profile=serve_flags.value("profile"),
                   output_format=serve_flags.value("format") or "text")
