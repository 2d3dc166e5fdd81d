"""Weight I/O: HF safetensors directories, GGUF files, and export back to HF."""

from langptune_jax.weights.hf import iter_tensors, load_decoder, load_state, read_config  # noqa: F401
