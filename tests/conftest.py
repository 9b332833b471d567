"""Shared fixtures: an isolated registry, the tiny model, the embedded model."""
import os
import tempfile

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The baseline cache (qpeft.core.run.baselines) of this test session starts empty and is its own.
os.environ["QPEFT_BASELINES"] = tempfile.mkdtemp(prefix="qpeft-baselines-")
# So is its quantized-base cache (qpeft.core.model.quant_cache).
os.environ["QPEFT_QUANT_CACHE"] = tempfile.mkdtemp(prefix="qpeft-quantized-")


@pytest.fixture(scope="session")
def tokenizer():
    from qpeft.core.kit.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def tiny(tokenizer):
    """A fresh tiny random Llama (2 layers, hidden 64) with the real tokenizer's vocabulary."""
    from qpeft.core.kit.testing import tiny_model

    return tiny_model(tokenizer=tokenizer)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (converted once, cached under $QPEFT_CACHE)."""
    from qpeft.core.model.models import load_model

    return load_model(None)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny model directory, loadable with ``--model DIR``."""
    from qpeft.core.kit.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def reference():
    """A tiny random Llama with a 1000-token vocabulary, the reference model that PEFT-parity
    tests adapt (``qpeft.testing.adapt`` copies it; tests must not change it in place)."""
    from qpeft.testing import tiny_model

    return tiny_model(vocab_size=1000)


@pytest.fixture(scope="session")
def batch():
    """Two rows of 16 token ids below 1000, seeded."""
    import torch

    return torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
