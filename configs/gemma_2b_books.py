r"""Paper configuration: Gemma-2B-it (LoRA r=1024) + mxbai-embed-large-v1 on Amazon Books.

Same settings as configs/gemma_2b_movies_tv.py with the Books instruction:

  langptune-jax train --config=configs/gemma_2b_books.py \
    --config.encoder.path=/models/gemma-2b-it \
    --config.decoder.path=/models/mxbai-embed-large-v1 \
    --config.data.reviews=/data/Books.jsonl.gz \
    --config.data.meta=/data/meta_Books.jsonl.gz --workdir=gs://bucket/runs/gemma_books
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import gemma_2b_movies_tv  # noqa: E402


def get_config():
  return gemma_2b_movies_tv.get_config(domain="books")
