"""Every adapter method × every quantizer: trains with falling loss, saves, reloads exactly,
and merges into a plain model within quantization tolerance."""
import copy

import pytest
import torch

from qpeft.core import registry
from qpeft.core.adapter import compose
from qpeft.core.errors import QpeftError
from qpeft.core.testing import tiny_model

QUANTS = ["none:compute_dtype=float32", "nf4:compute_dtype=float32", "hqq:compute_dtype=float32"]
ADAPTERS = ["lora:r=4", "lora:r=4+rslora", "lora:r=4+loftq", "lora:r=4+olora", "dora:r=4",
            "dora:r=4+loftq", "ia3", "qdylora:r_max=4"]


@pytest.fixture(scope="module")
def reference():
    return tiny_model(vocab_size=1000, seed=5)


@pytest.fixture(scope="module")
def batch():
    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(3))


def build(reference, quant: str, adapter: str):
    from qpeft.core.pipeline import build_plugin

    model = copy.deepcopy(reference)
    composition = compose(adapter, registry.default())
    build_plugin("quantizer", quant, registry.default()).quantize_model(
        model, keep_source=composition.needs_source_weights)
    torch.manual_seed(0)
    composition.attach(model)
    return model, composition


def loss_of(model, batch):
    return model(batch, labels=batch).loss


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_train_save_reload_merge(reference, batch, quant, adapter, tmp_path):
    if "loftq" in adapter and quant.startswith("none"):
        with pytest.raises(QpeftError, match="loftq has nothing to correct.*lossy quantizer"):
            build(reference, quant, adapter)
        return
    model, composition = build(reference, quant, adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()                                # QDyLoRA: eval mode uses its eval rank
    with torch.no_grad():
        trained = model(batch).logits
    composition.method.save(model, tmp_path / "adapter", {"adapter_spec": adapter})

    fresh, again = build(reference, quant, adapter)
    again.method.load(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch).logits, trained, rtol=0, atol=1e-5)
        merged = again.method.merge(fresh)
        assert not any(p.requires_grad for p in merged.parameters())
        torch.testing.assert_close(merged(batch).logits, trained, rtol=1e-3, atol=2e-3)
