"""Flax NNX model families: decoder LLMs (Llama, Gemma 1/2/3) and BERT embedders."""
