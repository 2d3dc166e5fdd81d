"""Data pipeline: raw Amazon Reviews 2023 / MovieLens files -> tokenized TFDS splits.

Modules: `amazon` and `movielens` read raw files, `core` runs the shared filters
and splits, `prompts` holds the text templates, `builder` writes the TFDS
(array_record) dataset, `loader` reads it back with grain, `prepare` is the CLI
command.
"""

from langptune_jax.data.core import DataError

__all__ = ["DataError"]
