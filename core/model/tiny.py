"""The tiny test model's pieces that need nothing of qpeft: a random Llama of a given
vocabulary, and its copy cached on disk (what ``--model tiny`` loads).

The embedded tokenizer and the cache directory are passed in by the caller
(:mod:`qpeft.core.model.models` for ``--model tiny``, :mod:`qpeft.core.kit.testing` for the helpers
with the real tokenizer), so model resolution can use the tiny model without importing
the testing helpers.
"""
from pathlib import Path

TINY = "tiny"


def random_llama(vocab_size: int, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                 intermediate: int = 128, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` in fp32, on CPU, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.config.qpeft_source = "tiny"
    return model


def save(directory, tokenizer, **kwargs) -> str:
    """Save :func:`random_llama` (sized for ``tokenizer``) and ``tokenizer`` to ``directory``."""
    model = random_llama(len(tokenizer), **kwargs)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def cached_dir(cache: Path, load_tokenizer) -> str:
    """A saved tiny model (seed 0) with the tokenizer ``load_tokenizer()`` returns, built once
    under ``cache/models/`` (atomically: a half-written copy is never used)."""
    import os
    import shutil
    import tempfile

    from qpeft.core.base.version import __version__

    target = Path(cache) / "models" / f"{TINY}-{__version__}"
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{TINY}-"))
    try:
        save(tmp, load_tokenizer())
        try:
            os.replace(tmp, target)
        except OSError:       # another process finished first: use its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
