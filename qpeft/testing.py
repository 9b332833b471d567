"""Helpers for plugin authors' tests: a tiny random Llama with the real tokenizer."""
from qpeft.core.testing import tiny_model, tiny_model_and_tokenizer

__all__ = ["tiny_model", "tiny_model_and_tokenizer"]
