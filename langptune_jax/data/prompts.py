"""Text templates: domain instructions, item texts, history blocks and the chat wrapper.

The chat template always comes from the encoder's own tokenizer
(`apply_chat_template` with one user turn and the generation prompt), so Gemma
turns, Llama 3 headers and ChatML (SmolLM2) are whatever the model expects.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

MOVIES_TV_INSTRUCTION = (
    "The user has rated (out of 5.0) and reviewed following movies and TV shows arranged "
    "chronologically from the oldest (top) to the newest (bottom). Please provide a "
    "high-level summary of the user preference in detail.")
BOOKS_INSTRUCTION = MOVIES_TV_INSTRUCTION.replace("movies and TV shows", "books")
MOVIELENS_INSTRUCTION = (
    "The user has rated (out of 5.0) following movies arranged chronologically from the "
    "oldest (top) to the newest (bottom). Please provide a high-level summary of the user "
    "preference in detail.")

INSTRUCTIONS = {
    "movies_tv": MOVIES_TV_INSTRUCTION,
    "books": BOOKS_INSTRUCTION,
    "movielens": MOVIELENS_INSTRUCTION,
}


def resolve_instruction(data_cfg: Any) -> str:
  """The instruction for `data_cfg` (the data section): a custom `instruction` wins over
  the domain's.

  An empty `instruction`, or one equal to a built-in domain default (the value a
  base config carries), means "use the domain's instruction", so that switching
  `data.domain` alone is enough.
  """
  domain, custom = data_cfg.domain, data_cfg.instruction
  if custom and custom not in INSTRUCTIONS.values():
    return custom
  if domain not in INSTRUCTIONS:
    if custom:
      return custom
    raise ValueError(
        f"data.domain={domain!r} has no built-in instruction (known: "
        f"{', '.join(INSTRUCTIONS)}); set data.instruction")
  return INSTRUCTIONS[domain]


def _fmt(value: Any) -> str:
  return "None" if value is None else str(value)


def amazon_item_text(title: str, average_rating: Any, description: Sequence[str],
                     categories: Sequence[str], price: Any) -> str:
  """Item text of an Amazon Reviews 2023 meta row (docs/method.md §2 step 3)."""
  return (f"Title: {title}\n"
          f"Description: (average rating: {_fmt(average_rating)}) {' '.join(description)}\n"
          f"Category: {', '.join(categories)}\n"
          f"Price: {_fmt(price)}")


def movielens_item_text(title: str, year: str, genres: Sequence[str]) -> str:
  """Item text of a MovieLens movie: title, release year and genres."""
  return f"Title: {title}\nRelease year: {year}\nGenres: {', '.join(genres)}"


def review_block(item_text: str, rating: Any, text: str) -> str:
  """One history interaction with a review (Amazon)."""
  return f"{item_text}\nReview from the user: (rating: {_fmt(rating)}) {text}"


def rating_block(item_text: str, rating: Any) -> str:
  """One history interaction with a rating only (MovieLens)."""
  return f"{item_text}\nRating from the user: {_fmt(rating)}"


def prompt_content(instruction: str, blocks: Sequence[str]) -> str:
  """The user turn: instruction, then the history blocks, separated by blank lines."""
  return "\n\n".join([instruction, *blocks])


def history_text(prompt: str, instruction: str, tokenizer) -> str:
  """The history blocks of a wrapped prompt, without chat wrapper or instruction.

  The raw-history baseline's query (the authors' recipe). A prompt without the
  instruction (custom data) keeps its text; a tokenizer without a chat template
  leaves the end as it is.
  """
  start = prompt.find(instruction) if instruction else -1
  body = prompt[start + len(instruction):] if start >= 0 else prompt
  try:
    frame = _chat_frame(tokenizer)
  except ValueError:
    frame = None
  if frame is not None:
    for suffix in (frame[1], frame[1].rstrip("\n")):
      if suffix and body.endswith(suffix):
        body = body[:-len(suffix)]
        break
  return body.strip("\n")


def _render_chat(tokenizer, content: str) -> str:
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(
        f"encoder tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat template")
  return tokenizer.apply_chat_template(
      [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


@functools.lru_cache(maxsize=8)
def _chat_frame(tokenizer) -> tuple[str, str] | None:
  """(prefix, suffix) the template puts around a user turn, or None if it is not a frame.

  Rendering the Jinja template costs ~0.1 ms per prompt, so it is rendered once
  around a marker string, and again around a second marker to check that the
  template does not look at the content.
  """
  first, second = "\x00langptune-a\x00", "\x00langptune-b\x00"
  out = _render_chat(tokenizer, first)
  if out.count(first) != 1 or out.replace(first, second) != _render_chat(tokenizer, second):
    return None
  prefix, suffix = out.split(first)
  return prefix, suffix


PROMPT_ENDINGS = ("authors", "trimmed")
_GEMMA_MODEL_TURN = "<start_of_turn>model\n"


def wrap_chat(tokenizer, content: str, ending: str = "trimmed") -> str:
  """`content` as one user turn plus the generation prompt, in the tokenizer's template.

  ending="authors" reproduces the authors' hand-written Gemma prompt: the
  content untrimmed and no newline after ``<start_of_turn>model``. Other
  templates are the same under both endings.
  """
  if ending not in PROMPT_ENDINGS:
    raise ValueError(f"data.prompt_ending={ending!r}: expected one of {', '.join(PROMPT_ENDINGS)}")
  frame = _chat_frame(tokenizer)  # raises for a tokenizer without a chat template
  if ending == "authors" and frame is not None and frame[1].endswith(_GEMMA_MODEL_TURN):
    return frame[0] + content + frame[1][:-1]
  # Templates may strip the turn's content (Gemma's `| trim`): such content goes the slow way.
  if frame is None or not content or content != content.strip():
    return _render_chat(tokenizer, content)
  return frame[0] + content + frame[1]
