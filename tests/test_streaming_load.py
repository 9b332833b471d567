"""The streaming loader builds the same model as load_model + quantize_model, in far less memory.

"Same" is strict: every tensor of every layer torch.equal (quantized codes and scales,
the compute-dtype tensors, RoPE's computed buffers), the same modules, modes, tying and
requires_grad flags, and logits within 1e-6. The memory test runs the load in a child
process and bounds its peak RSS by the quantized model plus two float32 copies of the
largest tensor, over a baseline the child measures before loading.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qpeft.core.model import models
from qpeft.core.plugin import registry
from qpeft.core.base.errors import ModelLoadError
from qpeft.core.kinds.quantizer import model_bytes, quantized_layers
from qpeft.core.model.streaming import load_quantized
from qpeft.core.kit.testing import tiny_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def quantizer(name, **opts):
    return registry.get("quantizer", name).from_values(opts)


def old_path(spec, q, keep_source=False):
    """Today's path: the whole model in float32, then quantized layer by layer."""
    model, _ = models.load_model(spec)
    size = model_bytes(model)
    q.quantize_model(model, keep_source=keep_source)
    return model, size


def save_model(directory, tie=True, **save_kwargs) -> str:
    """The tiny model (tied, or untied with its own lm_head) and its tokenizer."""
    model, tokenizer = tiny_model_and_tokenizer()
    if not tie:
        from transformers import LlamaForCausalLM

        model.config.tie_word_embeddings = False
        torch.manual_seed(1)
        model = LlamaForCausalLM(model.config).eval()
    model.save_pretrained(directory, **save_kwargs)
    tokenizer.save_pretrained(directory)
    return str(directory)


def assert_same_model(old, new):
    assert [(n, type(m), m.training) for n, m in old.named_modules()] == \
           [(n, type(m), m.training) for n, m in new.named_modules()]
    for kind in ("named_parameters", "named_buffers"):
        a, b = dict(getattr(old, kind)()), dict(getattr(new, kind)())
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and a[name].device == b[name].device, name
            assert a[name].requires_grad == b[name].requires_grad, name
            assert torch.equal(a[name], b[name]), name
    for (name, q_old), q_new in zip(quantized_layers(old).items(), quantized_layers(new).values()):
        assert (q_old.source_weight is None) == (q_new.source_weight is None), name
        if q_old.source_weight is not None:
            assert q_new.source_weight.dtype == torch.float32 and q_new.source_weight.device.type == "cpu"
            assert torch.equal(q_old.source_weight, q_new.source_weight), name
    tied = lambda m: getattr(m.get_output_embeddings(), "weight", None) is m.get_input_embeddings().weight  # noqa: E731
    assert tied(old) == tied(new)
    ids = torch.randint(0, old.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(new(ids).logits, old(ids).logits, atol=1e-6, rtol=0)


CASES = [("none", {}, False), ("none", {"compute_dtype": "float32"}, False), ("nf4", {}, False),
         ("hqq", {}, False), ("int8", {}, False), ("nf4", {}, True), ("hqq", {"nbits": 2}, True)]


@pytest.mark.parametrize("name,opts,keep_source", CASES,
                         ids=[f"{n}{''.join(f'-{v}' for v in o.values())}{'-keep_source' * k}"
                              for n, o, k in CASES])
def test_streaming_builds_the_same_model(tiny_dir, name, opts, keep_source):
    old, size = old_path(tiny_dir, quantizer(name, **opts), keep_source)
    new, tokenizer, facts = load_quantized(tiny_dir, quantizer(name, **opts), keep_source=keep_source)
    assert_same_model(old, new)
    assert facts["model_mb_before"] == round(size / 2**20, 2)  # an fp32 checkpoint: as today
    assert facts["quantize_seconds"] <= facts["load_seconds"]
    assert new.config.qpeft_source == old.config.qpeft_source == tiny_dir
    assert new.generation_config.to_dict() == old.generation_config.to_dict()
    assert tokenizer.pad_token is not None


def test_sharded_checkpoint(tmp_path):
    directory = save_model(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    old, _ = old_path(directory, quantizer("nf4"))
    assert_same_model(old, load_quantized(directory, quantizer("nf4"))[0])


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("include_lm_head", [False, True], ids=["body", "with_lm_head"])
def test_tied_and_untied_embeddings(tmp_path, tie, include_lm_head):
    directory = save_model(tmp_path, tie=tie)
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) == (not tie)
    q = quantizer("nf4", include_lm_head=include_lm_head)
    old, _ = old_path(directory, q)
    new = load_quantized(directory, q)[0]
    assert_same_model(old, new)
    if tie and not include_lm_head:  # one Parameter, not two equal ones
        assert new.lm_head.weight is new.model.embed_tokens.weight


def test_checkpoint_without_the_model_prefix(tiny_dir, tmp_path):
    """A bare LlamaModel's checkpoint names tensors ``layers.0...``, not ``model.layers.0...``."""
    for file in Path(tiny_dir).iterdir():
        if file.suffix != ".safetensors":
            (tmp_path / file.name).write_bytes(file.read_bytes())
    tensors = load_file(Path(tiny_dir) / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    old, _ = old_path(tiny_dir, quantizer("hqq"))
    new = load_quantized(str(tmp_path), quantizer("hqq"))[0]
    new.config.qpeft_source = tiny_dir
    assert_same_model(old, new)


def test_measure_gives_the_same_layer_stats(tiny_dir):
    model, _ = models.load_model(tiny_dir)
    stats = quantizer("nf4").quantize_model(model, measure=True)
    facts = load_quantized(tiny_dir, quantizer("nf4"), measure=True)[2]
    assert facts["layer_stats"] == stats and all(s.rel_error > 0 for s in stats)


def test_bad_checkpoints_are_one_line_errors(tiny_dir, tmp_path):
    for file in Path(tiny_dir).iterdir():
        if file.suffix != ".safetensors":
            (tmp_path / file.name).write_bytes(file.read_bytes())
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_quantized(str(tmp_path), quantizer("nf4"))
    tensors = load_file(Path(tiny_dir) / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="no tensor for 'model.norm.weight'"):
        load_quantized(str(tmp_path), quantizer("nf4"))


@pytest.mark.slow
def test_embedded_model_nf4():
    old, size = old_path(None, quantizer("nf4"))
    new, _, facts = load_quantized(None, quantizer("nf4"))
    assert_same_model(old, new)
    assert len(quantized_layers(new)) == 30 * 7
    assert new.lm_head.weight is new.model.embed_tokens.weight
    assert facts["model_mb_before"] == round(size / 2**20, 2)  # its cached checkpoint is fp32


CHILD = """
import ctypes, gc, json, sys
import torch, transformers, safetensors, accelerate
from transformers.models.llama import modeling_llama
from qpeft.core.model import models, streaming
from qpeft.core.plugin import registry
from qpeft.core.kinds.quantizer import model_bytes
from qpeft.plugins.quantizers.nf4 import import_bitsandbytes

def rss(field):  # MB-exact, from the kernel's own accounting of this process
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

import_bitsandbytes()
quantizer = registry.get("quantizer", "nf4").from_values({"compute_dtype": "bfloat16"})  # as the bound assumes
before = rss("VmRSS")
tokenizer = models.load_tokenizer(sys.argv[1])  # also imports the tokenizer's code
tokenizer_bytes = rss("VmRSS") - before
del tokenizer
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:  # peak RSS := current RSS (Linux >= 4.0)
    f.write("5")
baseline = rss("VmHWM")
model = streaming.load_quantized(sys.argv[1], quantizer)[0]
print(json.dumps({"baseline": baseline, "peak": rss("VmHWM"), "tokenizer": tokenizer_bytes,
                  "quantized": model_bytes(model)}))
"""


def test_peak_memory_is_the_quantized_model_plus_two_largest_tensors(tmp_path):
    """98 M parameters (392 MB in float32), loaded by a child process that measures its own
    baseline first: after importing torch, transformers and bitsandbytes, and after loading
    (and freeing) the tokenizer once, which measures what the tokenizer keeps. Over that
    baseline the streaming load may add the quantized model, two float32 copies of the
    largest tensor, the tokenizer and 32 MB (the module tree, allocator slack).

    The peak is VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS at
    fork (the kernel carries the pre-exec maximum over), here pytest's ~600 MB.
    """
    spec = importlib.util.spec_from_file_location("make_random_llama", ROOT / "benchmarks" / "make_random_llama.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    info = maker.write_random_llama(tmp_path, hidden=1024, layers=8, intermediate=2816, vocab=4096,
                                    heads=16, kv_heads=4)
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                         text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    allowed = got["quantized"] + 2 * 4 * info["largest"] + got["tokenizer"] + 32 * 2**20
    assert allowed < 0.5 * 4 * info["parameters"]  # a bound the float32 model alone breaks
    assert got["peak"] - got["baseline"] <= allowed, {k: v / 2**20 for k, v in got.items()}
