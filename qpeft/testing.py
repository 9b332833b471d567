"""Helpers for plugin authors' tests: a tiny random Llama with the real tokenizer, and the
conformance kit (``check_quantizer``, ``check_adapter``, ``check_evaluator``)."""
from qpeft.core.kit.testing import (adapt, check_adapter, check_evaluator, check_quantizer, registry_with,
                                    save_tiny_model, tiny_model, tiny_model_and_tokenizer, tiny_model_dir)

__all__ = ["adapt", "check_adapter", "check_evaluator", "check_quantizer", "registry_with",
           "save_tiny_model", "tiny_model", "tiny_model_and_tokenizer", "tiny_model_dir"]
