"""Command-line flags of `recommend` (absl: defined before the command line is parsed)."""

from __future__ import annotations

from absl import flags

_DEFINED: dict = {}


def define() -> None:
  """Defines the flags once (the entry point may be loaded twice)."""
  if _DEFINED:
    return
  _DEFINED["user"] = flags.DEFINE_integer("user", None, "recommend: a dataset user id.")
  _DEFINED["history"] = flags.DEFINE_string(
      "history", None, "recommend: file of item ids or titles, one a line ('-': stdin).")
  _DEFINED["profile"] = flags.DEFINE_string(
      "profile", None, "recommend: rank with this profile text (no generation).")
  _DEFINED["format"] = flags.DEFINE_enum("format", "text", ["text", "json"],
                                         "recommend: output format.")


def value(name: str):
  return _DEFINED[name].value if name in _DEFINED else None
