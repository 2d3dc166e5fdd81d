"""LangPTune-JAX: end-to-end training of language-based user profiles for recommendation."""

__version__ = "0.1.0"
