"""Weight I/O: HF safetensors directories, GGUF files, and export back to HF."""

from langptune_jax.weights.hf import load_decoder, read_config, iter_tensors, load_state  # noqa: F401
