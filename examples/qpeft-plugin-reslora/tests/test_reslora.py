"""qpeft-plugin-reslora: discovery, the residual forms in training, the merged-away form, the
pipeline, and qpeft's conformance kit. Written against qpeft's public API only: ``qpeft``,
``qpeft.testing`` and the errors."""
import copy
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

if importlib.util.find_spec("qpeft_reslora") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qpeft  # noqa: E402
import qpeft_reslora  # noqa: E402
from qpeft import testing  # noqa: E402
from qpeft import OptionsError, QpeftError  # noqa: E402
from qpeft_reslora import ResLoRA, ResLoRALinear  # noqa: E402


def installed() -> bool:
    try:
        importlib.metadata.distribution("qpeft-plugin-reslora")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_install = pytest.mark.skipif(not installed(), reason="qpeft-plugin-reslora is not installed; "
                                   "run: pip install -e examples/qpeft-plugin-reslora --no-deps")
VARIANTS = ["input", "block", "middle"]
REGISTRY = testing.registry_with(qpeft_reslora)  # the built-ins plus this checkout's module


@pytest.fixture(scope="module")
def reference():
    return testing.tiny_model(layers=3, vocab_size=1000)


@pytest.fixture(scope="module")
def batch():
    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))


def attach(reference, method="reslora", **options):
    """A copy of ``reference`` through the ``none`` quantizer (float32), ``method`` attached."""
    values = {"r": 4, "alpha": 8, "dropout": 0.0, **options}
    spec = method + "".join(f":{key}={value}" for key, value in values.items())
    model, composition = testing.adapt(reference, spec, registry=REGISTRY)
    return model, composition.method


def adapter_layers(model) -> dict:
    """The model's low-rank adapter layers (those holding ``lora_A``), by name."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A")}


def perturb(model, seed=2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def logits(model, batch):
    with torch.no_grad():
        return model(batch).logits


def train_steps(model, batch, steps=3):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@needs_install
def test_registry_finds_the_plugin_with_its_distribution_as_origin():
    qpeft.registry.reload()
    cls = qpeft.registry.get("adapter", "reslora")
    assert issubclass(cls, qpeft.LowRankMethod) and cls.role == "method"
    assert cls.kind == "adapter" and str(cls.origin) == "qpeft-plugin-reslora 0.1.0"
    assert not [f for f in qpeft.registry.failures() if f.name == "reslora"]


@pytest.mark.parametrize("options, quantizers", [({}, None), ({"variant": "block", "pre_num": 2}, ["none"]),
                                                 ({"variant": "middle", "pre_num": 2}, ["none"])])
def test_the_conformance_kit_passes(options, quantizers):
    """Loss falls, save → load is exact and merge matches, over every registered quantizer
    (the block and middle forms over ``none`` only)."""
    outcome = testing.check_adapter(ResLoRA, REGISTRY, options={"r": 4, **options}, quantizers=quantizers)
    assert outcome == {q: "ok" for q in quantizers or REGISTRY.names("quantizer")}


def test_it_composes_with_a_scaling_modifier_and_refuses_an_init_one(reference):
    _, composition = testing.adapt(reference, "reslora:r=4+rslora", registry=REGISTRY)
    assert composition.method.options.r == 4 and [m.name for m in composition.modifiers] == ["rslora"]
    with pytest.raises(OptionsError, match="'loftq' replaces the 'init' step.*'reslora' does not have"):
        testing.adapt(reference, "reslora+loftq", registry=REGISTRY)


@pytest.mark.parametrize("values, message", [
    ({"variant": "middle", "merge": "weight"}, "merge=weight is defined for variant=input only"),
    ({"pre_num": 2}, "pre_num applies to variant=block or variant=middle"),
    ({"variant": "block", "pre_num": 0}, "pre_num must be at least 1"),
    ({"variant": "sideways"}, "must be one of input, block, middle"),
])
def test_bad_options_are_refused_in_one_line(values, message):
    with pytest.raises(OptionsError, match=message):
        ResLoRA.from_values(values)


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_at_init_the_model_equals_the_base(reference, batch, variant):
    model, _ = attach(reference, variant=variant)
    layers = adapter_layers(model)
    assert len(layers) == 3 * 7 and all(isinstance(l, ResLoRALinear) for l in layers.values())
    chain = layers["model.layers.2.self_attn.q_proj"].chain
    assert [l.index for l in chain.layers] == [0, 1, 2] and len(chain.layers) == 3
    expected = logits(reference, batch)
    for mode in (model.train, model.eval):
        mode()
        out = logits(model, batch)
        assert out.shape == (2, 12, 1000)
        assert (out - expected).abs().max().item() <= 1e-5


def test_block_n_receives_the_input_of_block_n_minus_1(reference, batch):
    model, _ = attach(reference)
    perturb(model)
    seen = {}
    for name, layer in adapter_layers(model).items():
        if name.endswith("v_proj"):
            layer.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0], out)))
    model.train()
    logits(model, batch)
    layer = adapter_layers(model)["model.layers.1.self_attn.v_proj"]
    x1, out = seen["model.layers.1.self_attn.v_proj"]
    x0, _ = seen["model.layers.0.self_attn.v_proj"]
    expected = layer.base(x1) + ((x1 + x0) @ layer.lora_A.t() * layer.scaling) @ layer.lora_B.t()
    assert torch.allclose(out, expected, atol=1e-6)
    first, out0 = adapter_layers(model)["model.layers.0.self_attn.v_proj"], seen["model.layers.0.self_attn.v_proj"][1]
    assert torch.allclose(out0, first.base(x0) + first.lora_delta(2 * x0), atol=1e-6)  # x_{−1} := x_0


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_residual_path_changes_the_training_output_versus_plain_lora(reference, batch, variant):
    ours, _ = attach(reference, variant=variant)
    plain, _ = attach(reference, method="lora")
    perturb(ours)
    perturb(plain)
    assert (logits(ours.train(), batch) - logits(plain.train(), batch)).abs().max().item() > 1e-3


def test_a_batch_of_another_shape_inside_one_pass_is_refused(reference):
    model, _ = attach(reference)
    model.train()
    layers = adapter_layers(model)
    layers["model.layers.0.mlp.up_proj"](torch.randn(2, 5, 64))
    with pytest.raises(QpeftError, match="one forward pass must keep its shape"):
        layers["model.layers.1.mlp.up_proj"](torch.randn(2, 6, 64))
    layers["model.layers.0.mlp.up_proj"](torch.randn(3, 7, 64))  # a new pass may change shape
    layers["model.layers.1.mlp.up_proj"](torch.randn(3, 7, 64))


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_few_adamw_steps_lower_the_loss(reference, batch, variant):
    model, _ = attach(reference, variant=variant)
    torch.manual_seed(0)
    losses = train_steps(model, batch, steps=5)
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("options", [{"variant": "input"}, {"variant": "input", "merge": "weight"},
                                     {"variant": "block", "pre_num": 2}, {"variant": "middle", "pre_num": 2}])
def test_merge_gives_a_plain_model_equal_to_the_merged_away_form(reference, batch, options):
    model, method = attach(reference, **options)
    perturb(model)
    train_steps(model, batch, steps=2)  # records input norms for the merge rule
    expected = logits(model.eval(), batch)
    merged = method.merge(model)
    assert not adapter_layers(merged)
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith("_proj"))
    assert (logits(merged, batch) - expected).abs().max().item() <= 1e-4


def test_input_merge_uses_the_ratio_of_recorded_input_norms(reference, batch):
    model, _ = attach(reference)
    perturb(model)
    train_steps(model, batch, steps=2)
    model.eval()
    layers = adapter_layers(model)
    prev, layer = layers["model.layers.0.mlp.down_proj"], layers["model.layers.1.mlp.down_proj"]
    alpha = prev.input_norms[:2].mean() / layer.input_norms[:2].mean()
    a, b = layer.inference_pair()
    assert torch.equal(a, layer.lora_A) and torch.allclose(b, (1 + alpha) * layer.lora_B)
    assert torch.allclose(prev.inference_pair()[1], 2 * prev.lora_B)  # block 0: exact


def test_block_shortcut_merges_exactly(reference, batch):
    model, _ = attach(reference, variant="block", pre_num=2)
    perturb(model)
    assert (logits(model.train(), batch) - logits(model.eval(), batch)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("options", [{"variant": "input"}, {"variant": "block", "pre_num": 2}])
def test_saved_adapter_is_a_plain_lora_that_reloads_exactly(reference, batch, options, tmp_path):
    model, method = attach(reference, **options)
    perturb(model)
    train_steps(model, batch, steps=2)
    expected = logits(model.eval(), batch)
    method.save(model, tmp_path, {"base_model": "tiny", "quantizer": "none:compute_dtype=float32"})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == (12 if options["variant"] == "block" else 4)
    again, _ = testing.adapt(reference, None, registry=REGISTRY)  # quantized, no adapter yet
    method.load(again, tmp_path)                                    # attaches as saved, then loads
    assert torch.equal(logits(again.eval(), batch), expected)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    assert (logits(theirs, batch) - expected).abs().max().item() <= 1e-5


@needs_install
def test_qpeft_run_with_reslora_trains_and_writes_the_report(tmp_path):
    tiny = testing.save_tiny_model(tmp_path / "tiny")
    args = ["--model", tiny, "--quant", "none:compute_dtype=float32", "--adapter", "reslora:r=4",
            "--evaluators", "footprint", "--eval-limit", "4", "--steps", "3", "--batch-size", "4",
            "--lr", "1e-2", "--log-every", "1", "--save-every", "0", "--device", "cpu",
            "--output-dir", str(tmp_path), "--name", "reslora"]
    done = subprocess.run([sys.executable, "-m", "qpeft", "run", *args], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "reslora"
    report = json.loads((run / "report.json").read_text())
    assert report["training"]["steps"] == 3
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert report["after"]["footprint"]["trainable_params"] > 0
    parts = json.loads((run / "config.json").read_text())["adapter"]["parts"]
    assert parts[0]["name"] == "reslora" and parts[0]["origin"] == "qpeft-plugin-reslora"
