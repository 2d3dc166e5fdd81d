"""Paper configuration: Llama-3-8B-Instruct (top 4 blocks) + mxbai-embed-large-v1 on Amazon Books."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import llama3_8b_movies_tv  # noqa: E402


def get_config():
  return llama3_8b_movies_tv.get_config(domain="books")
