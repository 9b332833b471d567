"""A tiny random Llama-architecture model with the embedded model's real tokenizer.

For fast tests — qpeft's own and plugin authors'. Building it takes well under a second
once the embedded model's conversion is cached; ``--model tiny`` (any command) loads the
copy :func:`tiny_model_dir` keeps in the cache. The conformance kit
(``check_quantizer``, ``check_adapter``, ``check_evaluator``) lives in
:mod:`qpeft.core.kit.conformance` and is re-exported here; the model itself is built by
:mod:`qpeft.core.model.tiny`.
"""
from qpeft.core.model import tiny
from qpeft.core.kit.conformance import adapt, check_adapter, check_evaluator, check_quantizer
from qpeft.core.model.tiny import TINY  # noqa: F401  (the --model name)

__all__ = ["adapt", "check_adapter", "check_evaluator", "check_quantizer", "registry_with",
           "save_tiny_model", "tiny_model", "tiny_model_and_tokenizer", "tiny_model_dir"]


def tiny_model(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, vocab_size: int | None = None, seed: int = 0, tokenizer=None):
    """A randomly initialised ``LlamaForCausalLM`` in fp32, on CPU, in train mode off."""
    if vocab_size is None:
        vocab_size = len(tokenizer if tokenizer is not None else tiny_tokenizer())
    return tiny.random_llama(vocab_size, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                             intermediate=intermediate, seed=seed)


def tiny_tokenizer():
    """The embedded model's tokenizer (a real BPE tokenizer with a chat template)."""
    from qpeft.core.model.models import load_tokenizer

    return load_tokenizer(None)


def tiny_model_and_tokenizer(**kwargs):
    """``(model, tokenizer)``: :func:`tiny_model` and the tokenizer it was sized for."""
    tokenizer = tiny_tokenizer()
    return tiny_model(tokenizer=tokenizer, **kwargs), tokenizer


def save_tiny_model(directory, **kwargs) -> str:
    """Save :func:`tiny_model_and_tokenizer` to ``directory`` and return its path: a model
    ``qpeft run --model DIR`` (and ``from_pretrained``) loads, for end-to-end tests."""
    return tiny.save(directory, tiny_tokenizer(), **kwargs)


def tiny_model_dir() -> str:
    """A saved :func:`tiny_model` (seed 0) with the real tokenizer, built once under
    ``$QPEFT_CACHE/models/`` (atomically: a half-written copy is never used) — what
    ``--model tiny`` loads, offline, in about a second."""
    from qpeft.core.model.models import locate

    return str(locate(TINY))


def registry_with(*modules):
    """A fresh registry of the built-ins plus plugin ``modules``, loaded as their entry points
    would be: for a plugin's tests run from a checkout without installing it."""
    import importlib.metadata

    from qpeft.core.plugin.registry import Registry

    return Registry(entry_points=[importlib.metadata.EntryPoint(m.__name__, m.__name__, "qpeft")
                                  for m in modules])
