"""The quantized-base cache (core/model/quant_cache.py): a base read from the cache is the base a
fresh quantization makes, tensor for tensor and logit for logit; a damaged entry is made again
with one line; another option, dtype or model content at the same path misses; the size limit
evicts the least recently used entry; ``qpeft cache list/clear``."""
import os
import shutil
import time

import pytest
import torch
from click.testing import CliRunner

from qpeft.core.cli.main import cli
from qpeft.core.cli.quantize_cmd import build_quantizer
from qpeft.core.model import quant_cache, streaming


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QPEFT_QUANT_CACHE", str(tmp_path / "quantized"))
    monkeypatch.delenv("QPEFT_QUANT_CACHE_GB", raising=False)
    return tmp_path / "quantized"


def load(model_dir, spec, lines=None, **kw):
    return streaming.load_quantized(str(model_dir), build_quantizer(spec), "cpu",
                                    say=(lines.append if lines is not None else None), **kw)


def logits(model):
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("spec", ["none:compute_dtype=float32", "nf4", "int8", "hqq:nbits=4", "nf4:icq=true:icq_steps=4"])
def test_a_cached_base_is_the_fresh_one(tiny_dir, cache, spec):
    fresh, _, first = load(tiny_dir, spec)
    read, _, second = load(tiny_dir, spec)
    assert (first["base_cache"], second["base_cache"]) == ("written", "read")
    a, b = fresh.state_dict(), read.state_dict()
    assert a.keys() == b.keys() and len(a) > 20
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert torch.equal(logits(fresh), logits(read))


def test_no_cache_neither_reads_nor_writes(tiny_dir, cache):
    assert load(tiny_dir, "int8", cache=False)[2]["base_cache"] == "off" and quant_cache.entries() == []


def test_keep_source_and_measure_read_the_checkpoint(tiny_dir, cache):
    fresh, _, f1 = load(tiny_dir, "nf4", keep_source=True, measure=True)
    lines = []
    read, _, f2 = load(tiny_dir, "nf4", lines, keep_source=True, measure=True)
    assert f2["base_cache"] == "read" and any("keep_source" in line for line in lines)
    q1 = dict((n, m) for n, m in fresh.named_modules() if hasattr(m, "codes"))
    q2 = dict((n, m) for n, m in read.named_modules() if hasattr(m, "codes"))
    assert q1.keys() == q2.keys() and len(q1) == 14
    for n in q1:
        assert torch.equal(q1[n].source_weight, q2[n].source_weight)
    assert [s.rel_error for s in f1["layer_stats"]] == pytest.approx([s.rel_error for s in f2["layer_stats"]], abs=1e-7)
    assert [s.bytes_before for s in f1["layer_stats"]] == [s.bytes_before for s in f2["layer_stats"]]


def test_a_damaged_entry_is_made_again_with_one_line(tiny_dir, cache):
    fresh = load(tiny_dir, "nf4")[0]
    (entry,) = [e.path for e in quant_cache.entries()]
    data = bytearray((entry / "layers.safetensors").read_bytes())
    data[-10] ^= 0xFF                                           # one flipped byte in a tensor
    (entry / "layers.safetensors").write_bytes(bytes(data))
    lines = []
    again, _, facts = load(tiny_dir, "nf4", lines)
    assert facts["base_cache"] == "written" and len(lines) == 1
    assert "damaged (layers.safetensors does not match its SHA-256)" in lines[0]
    assert torch.equal(logits(again), logits(fresh))
    assert load(tiny_dir, "nf4")[2]["base_cache"] == "read"     # the rebuilt entry verifies


def test_another_key_misses(tiny_dir, cache, tmp_path):
    load(tiny_dir, "hqq:nbits=4")
    assert load(tiny_dir, "hqq:nbits=2")[2]["base_cache"] == "written"                       # options
    assert load(tiny_dir, "hqq:nbits=4:compute_dtype=float32")[2]["base_cache"] == "written"  # dtype
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    assert load(copy, "hqq:nbits=4")[2]["base_cache"] == "read"          # same content, other path
    from safetensors.torch import load_file, save_file

    weights = load_file(copy / "model.safetensors")
    name = next(n for n in weights if n.endswith("q_proj.weight"))
    weights[name][0, 0] += 1.0
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert load(copy, "hqq:nbits=4")[2]["base_cache"] == "written"       # same path, other content
    assert len(quant_cache.entries()) == 4


def test_the_size_limit_evicts_the_least_recently_used(tiny_dir, cache, monkeypatch):
    load(tiny_dir, "nf4")
    load(tiny_dir, "int8")
    old, new = quant_cache.entries()
    assert old.summary["quantizer"] == "nf4" and new.summary["quantizer"] == "int8"
    os.utime(old.path, (time.time() + 5, time.time() + 5))             # nf4 used last
    room = old.size + new.size + 1000
    monkeypatch.setenv("QPEFT_QUANT_CACHE_GB", str(room / 1e9))
    load(tiny_dir, "nf4:blocksize=128")                                 # does not fit beside both: int8 goes
    kept = [e.summary["quantizer"] for e in quant_cache.entries()]
    assert sorted(kept) == ["nf4", "nf4:blocksize=128"] and sum(e.size for e in quant_cache.entries()) <= room
    monkeypatch.setenv("QPEFT_QUANT_CACHE_GB", "0.000001")              # 1 kB: nothing fits, nothing kept
    lines = []
    assert load(tiny_dir, "hqq", lines)[2]["base_cache"] == "not kept" and "over the" in lines[0]


def test_cache_list_and_clear(tiny_dir, cache):
    runner = CliRunner()
    load(tiny_dir, "nf4")
    load(tiny_dir, "hqq:nbits=2")
    shown = runner.invoke(cli, ["cache", "list"], prog_name="qpeft", standalone_mode=False)
    assert shown.exit_code == 0, shown.output
    assert "2 entries" in shown.output and "hqq:nbits=2" in shown.output and "nf4 " in shown.output
    assert str(tiny_dir)[-20:] in shown.output
    kept = runner.invoke(cli, ["cache", "clear", "--older-than", "7d"], prog_name="qpeft", standalone_mode=False)
    assert "removed 0 entries" in kept.output and len(quant_cache.entries()) == 2
    bad = runner.invoke(cli, ["cache", "clear", "--older-than", "seven"], prog_name="qpeft")
    assert bad.exit_code == 2 and "e.g. --older-than 7d" in bad.output
    gone = runner.invoke(cli, ["cache", "clear"], prog_name="qpeft", standalone_mode=False)
    assert "removed 2 entries" in gone.output and quant_cache.entries() == []


def test_a_quantizer_without_the_pair_is_not_cached(tiny_dir, cache):
    from qpeft import Quantizer

    class Uncached(type(build_quantizer("int8"))):      # int8 without layer_from_cache
        name = "int8-uncached"
        layer_from_cache = Quantizer.layer_from_cache

    uncached = Uncached()
    assert not uncached.cacheable
    lines = []
    facts = streaming.load_quantized(str(tiny_dir), uncached, "cpu", say=lines.append)[2]
    assert facts["base_cache"] == "not cacheable" and len(lines) == 1 and "layer_from_cache" in lines[0]
    assert quant_cache.entries() == []


def test_qpeft_quantize_reads_the_cache_and_reports_the_same_figures(tiny_dir, cache):
    import json

    def quantize(*extra):
        done = CliRunner().invoke(cli, ["quantize", "--model", str(tiny_dir), "--quant", "hqq:nbits=2", "--json", *extra],
                                  prog_name="qpeft", standalone_mode=False)
        assert done.exit_code == 0, done.output
        return json.loads(done.stdout[done.stdout.index("{"):])

    first, second, fresh = quantize(), quantize(), quantize("--no-cache")
    assert [r["base_cache"] for r in (first, second, fresh)] == ["written", "read", "off"]
    for key in ("rel_error_mean", "rel_error_worst", "bytes_after", "bytes_before", "layers"):
        assert first[key] == second[key] == fresh[key], key
    assert first["layers"] == 14 and 0 < first["rel_error_mean"] < 1
