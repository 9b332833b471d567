"""A tiny random Llama-architecture model with the embedded model's real tokenizer.

For fast tests — qpeft's own and plugin authors'. Building it takes well under a second
once the embedded model's conversion is cached; ``--model tiny`` (any command) loads the
copy :func:`tiny_model_dir` keeps in the cache. The conformance kit
(``check_quantizer``, ``check_adapter``, ``check_evaluator``) lives in
:mod:`qpeft.core.conformance` and is re-exported here.
"""
from qpeft.core.conformance import adapt, check_adapter, check_evaluator, check_quantizer

__all__ = ["adapt", "check_adapter", "check_evaluator", "check_quantizer", "registry_with",
           "save_tiny_model", "tiny_model", "tiny_model_and_tokenizer", "tiny_model_dir"]
TINY = "tiny"


def tiny_model(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, vocab_size: int | None = None, seed: int = 0, tokenizer=None):
    """A randomly initialised ``LlamaForCausalLM`` in fp32, on CPU, in train mode off."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if vocab_size is None:
        vocab_size = len(tokenizer if tokenizer is not None else tiny_tokenizer())
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.config.qpeft_source = "tiny"
    return model


def tiny_tokenizer():
    """The embedded model's tokenizer (a real BPE tokenizer with a chat template)."""
    from qpeft.core.models import load_tokenizer

    return load_tokenizer(None)


def tiny_model_and_tokenizer(**kwargs):
    """``(model, tokenizer)``: :func:`tiny_model` and the tokenizer it was sized for."""
    tokenizer = tiny_tokenizer()
    return tiny_model(tokenizer=tokenizer, **kwargs), tokenizer


def save_tiny_model(directory, **kwargs) -> str:
    """Save :func:`tiny_model_and_tokenizer` to ``directory`` and return its path: a model
    ``qpeft run --model DIR`` (and ``from_pretrained``) loads, for end-to-end tests."""
    model, tokenizer = tiny_model_and_tokenizer(**kwargs)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def tiny_model_dir() -> str:
    """A saved :func:`tiny_model` (seed 0) with the real tokenizer, built once under
    ``$QPEFT_CACHE/models/`` (atomically: a half-written copy is never used) — what
    ``--model tiny`` loads, offline, in about a second."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from qpeft.core.models import cache_dir
    from qpeft.core.version import __version__

    target = cache_dir() / "models" / f"{TINY}-{__version__}"
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{TINY}-"))
    try:
        save_tiny_model(tmp)
        try:
            os.replace(tmp, target)
        except OSError:       # another process finished first: use its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)



def registry_with(*modules):
    """A fresh registry of the built-ins plus plugin ``modules``, loaded as their entry points
    would be: for a plugin's tests run from a checkout without installing it."""
    import importlib.metadata

    from qpeft.core.registry import Registry

    return Registry(entry_points=[importlib.metadata.EntryPoint(m.__name__, m.__name__, "qpeft")
                                  for m in modules])
