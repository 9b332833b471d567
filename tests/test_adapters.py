"""Adapter plugins: parity with Hugging Face PEFT, save/load, merge, training, composition."""
import copy
import json

import pytest
import torch
from torch import nn

from qpeft.core.plugin import registry
from qpeft.core.kinds.adapter import compose
from qpeft.core.base.errors import OptionsError, QpeftError
from qpeft.core.kinds.quantizer import QuantizedLinear
from qpeft.core.kinds import peft_format
from qpeft.plugins.adapters.dora import DoRALinear
from qpeft.core.kinds.adapter_layers import adapter_layers
from qpeft.plugins.quantizers.none import NoQuantization

peft = pytest.importorskip("peft")

SPECS = ["lora:r=4:alpha=8", "lora:r=4:alpha=8+rslora", "dora:r=4:alpha=8", "ia3"]


def peft_config(spec: str):
    """The PEFT config equivalent to one of SPECS."""
    if spec == "ia3":
        return peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                              feedforward_modules=["down_proj"])
    return peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.05,
                           target_modules="all-linear", use_rslora="rslora" in spec,
                           use_dora=spec.startswith("dora"))


def quantized(reference, dtype="float32"):
    model = copy.deepcopy(reference)
    NoQuantization(compute_dtype=dtype).quantize_model(model)
    return model


def adapted(reference, spec: str, perturb: bool = True):
    """The reference model quantized with ``none``, adapted by ``spec``, with random adapter tensors
    (so the comparison is not trivially base == base)."""
    model = quantized(reference)
    composition = compose(spec, registry.default())
    composition.attach(model)
    if perturb:
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval(), composition


def logits(model, batch):
    with torch.no_grad():
        return model(batch).logits


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("spec", SPECS)
def test_parity_with_peft(reference, batch, spec):
    ours, _ = adapted(reference, spec)
    theirs = peft.get_peft_model(copy.deepcopy(reference), peft_config(spec))
    assert trainable(ours) == trainable(theirs)
    state = {f"{peft_format.PREFIX}{name}.{key}": t.detach()
             for name, layer in adapter_layers(ours).items() for key, t in layer.adapter_tensors().items()}
    result = peft.set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys
    diff = (logits(ours, batch) - logits(theirs.eval(), batch)).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("spec", SPECS)
def test_saved_adapter_loads_in_peft_and_back_in_qpeft(reference, batch, spec, tmp_path):
    ours, composition = adapted(reference, spec)
    expected = logits(ours, batch)
    composition.method.save(ours, tmp_path, {"base_model": "tiny", "quantizer": "none:compute_dtype=float32"})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == ("IA3" if spec == "ia3" else "LORA")
    assert config["base_model_name_or_path"] == "tiny"
    manifest = json.loads((tmp_path / "qpeft_adapter.json").read_text())
    assert manifest["quantizer"] == "none:compute_dtype=float32"
    assert [p["name"] for p in manifest["parts"]] == [n.split(":")[0] for n in spec.split("+")]

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    assert (logits(theirs, batch) - expected).abs().max().item() <= 1e-5

    again = quantized(reference)
    peft_format.load_adapter(again, tmp_path)
    assert torch.equal(logits(again.eval(), batch), expected)


@pytest.mark.parametrize("spec", SPECS)
def test_merge_gives_a_plain_model_with_equal_outputs(reference, batch, spec):
    ours, composition = adapted(reference, spec)
    expected = logits(ours, batch)
    merged = composition.method.merge(ours)
    assert not any(isinstance(m, QuantizedLinear) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.k_proj, nn.Linear)
    assert (logits(merged, batch) - expected).abs().max().item() <= 1e-4


def test_merged_model_saves_and_reloads_with_transformers(reference, batch, tmp_path):
    from transformers import AutoModelForCausalLM

    ours, composition = adapted(reference, "dora:r=4")
    merged = composition.method.merge(ours)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(reloaded, batch) - logits(merged, batch)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("spec", SPECS)
def test_a_few_adamw_steps_lower_the_loss(reference, batch, spec):
    model, _ = adapted(reference, spec, perturb=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(6):
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


def test_only_adapter_tensors_are_trainable(reference):
    model, _ = adapted(reference, "dora:r=4", perturb=False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_magnitude_vector")
                         for n in names)


def test_compose_refuses_modifiers_without_a_slot_and_without_a_method():
    with pytest.raises(OptionsError, match="'rslora' replaces the 'scaling' step of an adapter, which 'ia3' "
                                           "does not have; use it with: .*lora"):
        compose("ia3+rslora", registry.default())
    with pytest.raises(OptionsError, match="needs exactly one adapter method .*found: none"):
        compose("rslora", registry.default())


def test_targets_option_selects_layers_and_reaches_the_peft_config(reference, tmp_path):
    model, composition = adapted(reference, "lora:r=2:targets=q_proj,v_proj", perturb=False)
    assert sorted({n.rsplit(".", 1)[-1] for n in adapter_layers(model)}) == ["q_proj", "v_proj"]
    composition.method.save(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(OptionsError, match="matched no quantized layer; layer names end with: .*q_proj"):
        compose("lora:targets=qproj", registry.default()).attach(quantized(reference))
    with pytest.raises(OptionsError, match=r"^adapter 'lora' option target q_porj matched no quantized layer"):
        compose("lora:targets=v_proj,q_porj", registry.default()).attach(quantized(reference))


def test_attaching_twice_is_refused(reference):
    model, composition = adapted(reference, "lora:r=2", perturb=False)
    with pytest.raises(QpeftError, match="already has an adapter"):
        composition.attach(model)


def test_bf16_base_with_float32_adapter(reference, batch):
    model = quantized(reference, "bfloat16")
    compose("dora:r=4", registry.default()).attach(model)
    out = model(batch).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    layer = model.model.layers[0].mlp.down_proj
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.grad is not None


def naive_norm(layer: DoRALinear) -> torch.Tensor:
    return (layer.base.dequantize() + layer.delta_weight()).norm(dim=1)


def test_dora_efficient_norm_equals_naive_norm(reference):
    model, _ = adapted(reference, "dora:r=4")
    for layer in adapter_layers(model).values():
        assert torch.allclose(layer.weight_norm(), naive_norm(layer), rtol=1e-5, atol=1e-6)
    layer = model.model.layers[0].self_attn.q_proj
    layer.set_base_weight(2 * layer.base.dequantize())  # the cached ‖W_i‖² follows a rewrite
    assert torch.allclose(layer.weight_norm(), naive_norm(layer), rtol=1e-5, atol=1e-6)


class RewritingInit:
    """A third-party "init" modifier (the slot protocol only): random B, rewritten base."""

    name, role, modifies = "test-init", "modifier", "init"

    def initialize(self, layer, scaling):
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
        layer.set_base_weight(layer.base.dequantize() - scaling * layer.delta_weight())


def test_dora_magnitude_is_set_after_the_init_modifier(reference):
    model = quantized(reference)
    method = registry.default().get("adapter", "dora").from_values({"r": 4})
    method.attach(model, [RewritingInit()])
    for layer in adapter_layers(model).values():
        assert layer.base_rewritten
        assert torch.allclose(layer.lora_magnitude_vector, naive_norm(layer), rtol=1e-5)


class RoundingLinear(QuantizedLinear):
    """A lossy test quantizer behind the QuantizedLinear contract: 2-bit levels, absmax per row."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape[1], weight.shape[0], None, torch.float32)
        self.set_weight(weight)

    def set_weight(self, weight):
        self.scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 1.5
        self.codes = torch.clamp(torch.round(weight / self.scale - 0.5), -2, 1).to(torch.int8)

    def dequantize(self):
        return (self.codes.float() + 0.5) * self.scale

    def matmul(self, x):
        return x @ self.dequantize().t()


def rounding_quantized(reference, keep_source: bool):
    model = copy.deepcopy(reference)
    for name, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not model.get_output_embeddings():
                layer = RoundingLinear(child.weight.detach())
                layer.source_weight = child.weight.detach().clone() if keep_source else None
                layer.original = child.weight.detach().clone()  # for the test's measurement only
                setattr(module, attr, layer)
    return model


def reconstruction_error(model) -> float:
    return sum(torch.linalg.norm(layer.base.original - layer.merged_weight()).item()
               for layer in adapter_layers(model).values())


def test_loftq_lowers_the_reconstruction_error_over_any_quantizer(reference):
    plain = rounding_quantized(reference, keep_source=True)
    compose("lora:r=8", registry.default()).attach(plain)
    loftq = rounding_quantized(reference, keep_source=True)
    compose("lora:r=8+loftq:iters=3", registry.default()).attach(loftq)
    assert reconstruction_error(loftq) < 0.9 * reconstruction_error(plain)
    assert all(layer.base.source_weight is None for layer in adapter_layers(loftq).values())


def test_loftq_refuses_when_it_has_nothing_to_correct(reference):
    model = rounding_quantized(reference, keep_source=False)
    with pytest.raises(QpeftError, match="loftq has nothing to correct"):
        compose("lora:r=4+loftq", registry.default()).attach(model)


def test_ia3_refuses_init_modifiers_with_a_reason():
    with pytest.raises(OptionsError, match="'loftq' replaces the 'init' step of an adapter, which 'ia3' does not have"):
        compose("ia3+loftq", registry.default())


def test_olora_matches_peft_and_its_saved_adapter_reloads_in_peft(reference, batch, tmp_path):
    ours, composition = adapted(reference, "dora:r=4:alpha=8+olora", perturb=False)
    theirs = peft.get_peft_model(copy.deepcopy(reference), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="olora", use_dora=True))
    a, b = ours.model.layers[1].mlp.up_proj, theirs.base_model.model.model.layers[1].mlp.up_proj
    assert torch.allclose(a.lora_A, b.lora_A["default"].weight, atol=1e-6)
    assert torch.allclose(a.base.dequantize(), b.base_layer.weight, atol=1e-6)
    assert (logits(ours, batch) - logits(reference, batch)).abs().max().item() <= 1e-4
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    composition.method.save(ours, tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    assert (logits(reloaded, batch) - logits(ours, batch)).abs().max().item() <= 1e-5


def test_qdylora_samples_ranks_and_exports_any_rank(reference, batch, tmp_path):
    from qpeft.plugins.adapters.qdylora import set_rank

    model = quantized(reference)
    composition = compose("qdylora:r_max=8:r_min=2+rslora", registry.default())
    composition.attach(model)
    method, layer = composition.method, model.model.layers[0].self_attn.q_proj
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ranks = set()
    for step in range(8):
        method.on_step_begin(step, model)
        ranks.add(layer.train_rank)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert len(ranks) > 1 and all(2 <= b <= 8 for b in ranks)
    set_rank(model, eval=4)
    model.eval()
    expected = logits(model, batch)
    composition.method.save(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    assert (logits(theirs, batch) - expected).abs().max().item() <= 1e-5
    again = quantized(reference)
    peft_format.load_adapter(again, tmp_path)
    assert torch.equal(logits(again.eval(), batch), expected)


@pytest.mark.parametrize("quant", ["nf4:compute_dtype=float32", "hqq:compute_dtype=float32",
                                   "hqq:nbits=2:compute_dtype=float32"])
def test_loftq_beats_plain_quantization_over_nf4_and_hqq(tiny, quant):
    """‖W − (dequant(Q) + s·B·A)‖ with LoftQ is below ‖W − dequant(quant(W))‖, layer by layer,
    through the real path: the quantizer keeps W for a composition that asks for it."""
    from qpeft.core.run.pipeline import build_plugin

    composition = compose("lora:r=8+loftq:iters=2", registry.default())
    assert composition.needs_source_weights
    originals = {n: m.weight.detach().clone() for n, m in tiny.named_modules()
                 if isinstance(m, nn.Linear) and m is not tiny.get_output_embeddings()}
    build_plugin("quantizer", quant, registry.default()).quantize_model(tiny, keep_source=True)
    plain = {n: torch.linalg.norm(originals[n] - m.dequantize()).item()
             for n, m in tiny.named_modules() if n in originals}
    composition.attach(tiny)
    layers = adapter_layers(tiny)
    assert set(layers) == set(originals)
    for name, layer in layers.items():
        assert layer.base.source_weight is None  # dropped after init
        loftq = torch.linalg.norm(originals[name] - (layer.base.dequantize() + layer.delta_weight())).item()
        assert loftq < 0.9 * plain[name], name


def test_add_low_rank_under_bf16_autocast_adds_into_a_float32_output():
    """Under CUDA (here CPU) bf16 autocast ``x·Aᵀ`` comes out bf16 while the in-place addmm_
    into a float32 output is left alone: the factor is cast to the output's dtype (DoRA failed
    at its first CUDA step without it, docs/benchmarks.md)."""
    from qpeft.core.kinds.lowrank import add_low_rank

    gen = torch.Generator().manual_seed(0)
    x, a, b = (torch.randn(*s, generator=gen) for s in ((4, 16), (2, 16), (8, 2)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = add_low_rank(torch.zeros(4, 8), x, a, b, 0.5)
    expected = 0.5 * (x @ a.t()) @ b.t()
    assert got.dtype == torch.float32
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2


def test_a_method_that_only_writes_wrap_attaches_through_the_one_loop(reference):
    """AdapterMethod.attach is the one attach loop (issue 17 item 6): a method writes wrap();
    the targets go through target_matches, only adapter tensors train, and each instance keeps
    its own modifiers list."""
    import qpeft
    from qpeft.plugins.adapters.ia3 import IA3Output

    class Scale(qpeft.AdapterMethod):
        name, Options = "scale", qpeft.plugins.adapters.ia3.IA3Options

        def wrap(self, name, base, modifiers):
            return IA3Output(base)

    model, method = quantized(reference), Scale(targets=["v_proj"], feedforward=[])
    method.attach(model, [])
    wrapped = sorted(adapter_layers(model))
    assert wrapped == [n for n in wrapped if qpeft.target_matches(n, ["v_proj"])] and len(wrapped) == 2
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{n}.ia3_l" for n in wrapped}
    other = Scale(targets=["v_proj"], feedforward=[])
    method.modifiers.append("x")
    assert other.modifiers == []
    assert qpeft.target_matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert not qpeft.target_matches("model.layers.0.self_attn.qq_proj", ["q_proj"])
