"""Helpers for plugin authors' tests: a tiny random Llama with the real tokenizer."""
from qpeft.core.testing import save_tiny_model, tiny_model, tiny_model_and_tokenizer, tiny_model_dir

__all__ = ["save_tiny_model", "tiny_model", "tiny_model_and_tokenizer", "tiny_model_dir"]
