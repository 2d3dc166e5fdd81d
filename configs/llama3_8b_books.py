r"""Paper configuration: Llama-3-8B-Instruct (top 4 blocks) + mxbai-embed-large-v1 on Amazon Books.

Same settings as configs/llama3_8b_movies_tv.py with the Books instruction:

  langptune-jax train --config=configs/llama3_8b_books.py \
    --config.encoder.path=/models/Meta-Llama-3-8B-Instruct \
    --config.decoder.path=/models/mxbai-embed-large-v1 \
    --config.data.reviews=/data/Books.jsonl.gz \
    --config.data.meta=/data/meta_Books.jsonl.gz --workdir=gs://bucket/runs/llama_books
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import llama3_8b_movies_tv  # noqa: E402


def get_config():
  return llama3_8b_movies_tv.get_config(domain="books")
