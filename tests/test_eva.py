"""EVA (plugins/adapters/eva.py) on the calibration hook, against PEFT 0.21's
``init_lora_weights="eva"``: the same initial A and per-layer ranks for the same batches, logits
equal after PEFT loads the saved adapter; the init is rebuilt without data on reload and on
--resume, and under data parallel every rank starts from rank 0's calibration."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from qpeft import Adapter, QpeftError, adapter_layers, load_adapter
from qpeft.testing import adapt
from calibration_data import logits, masked_batches

peft = pytest.importorskip("peft")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def batches():
    return masked_batches(4, pad_row0=True)


def peft_eva(reference, batches, rslora=False, rho=2.0, dora=False):
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    theirs = peft.get_peft_model(copy.deepcopy(reference), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights="eva",
        use_rslora=rslora, use_dora=dora, eva_config=peft.EvaConfig(rho=rho)))
    initialize_lora_eva_weights(theirs, batches, show_progress_bar=False)
    return theirs


@pytest.mark.parametrize("spec, rslora, rho", [("lora:r=4:alpha=8:dropout=0+eva:calibration_batches=4", False, 2.0),
                                               ("lora:r=4:alpha=8:dropout=0+eva:calibration_batches=4:rho=1+rslora",
                                                True, 1.0),
                                               ("dora:r=4:alpha=8:dropout=0+eva:calibration_batches=4", False, 2.0)])
def test_init_ranks_and_scalings_equal_peft(reference, batch, batches, spec, rslora, rho):
    ours, _ = adapt(reference, spec, calibration=batches)
    theirs = peft_eva(reference, batches, rslora, rho, dora=spec.startswith("dora"))
    ranks = {}
    for name, layer in adapter_layers(ours).items():
        ranks[name] = layer.r
        other = theirs.base_model.model.get_submodule(name)
        if not layer.r:
            assert not hasattr(other, "lora_A"), name     # PEFT unwraps a layer left with rank 0
            continue
        torch.testing.assert_close(layer.lora_A, other.lora_A["default"].weight, atol=1e-6, rtol=0)
        assert layer.scaling == pytest.approx(other.scaling["default"], rel=1e-12)
        g = torch.Generator().manual_seed(len(name))       # the same B in both, so scalings show in logits
        b = torch.randn(layer.lora_B.shape, generator=g) * 0.1
        with torch.no_grad():
            layer.lora_B.copy_(b)
            other.lora_B["default"].weight.copy_(b)
    assert sum(ranks.values()) == 4 * len(ranks)              # the budget r·L is kept
    if rho > 1:
        assert len(set(ranks.values())) > 1                   # … and redistributed
    assert (logits(ours, batch) - logits(theirs, batch)).abs().max().item() <= 1e-5


def test_the_saved_adapter_reloads_without_data_and_in_peft(reference, batch, batches, tmp_path):
    ours, composition = adapt(reference, "lora:r=4:alpha=8+eva:calibration_batches=4", calibration=batches)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    composition.method.save(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    ranks = {name: layer.r for name, layer in adapter_layers(ours).items()}
    assert config["rank_pattern"] == {n: r for n, r in ranks.items() if r not in (0, 4)}
    assert config["alpha_pattern"] == {n: 2.0 * r for n, r in ranks.items() if r not in (0, 4)}  # α·r_l/r
    expected = logits(ours, batch)
    bare, _ = adapt(reference)                                # quantized only: no data in sight
    load_adapter(bare, tmp_path)
    assert torch.equal(logits(bare, batch), expected)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    assert (logits(theirs, batch) - expected).abs().max().item() <= 1e-5


def test_a_run_calibrates_once_and_resumes_without_data(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    cmd = [sys.executable, "-m", "qpeft", "run", "--model", str(tiny_dir), "--quant", "nf4", "--adapter",
           "lora:r=4+eva:calibration_batches=2", "--evaluators", "perplexity", "--eval-limit", "2",
           "--batch-size", "2", "--steps", "3", "--eval-every", "0", "--output-dir", str(tmp_path), "--name", "eva"]
    first = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "eva calibrated on 2 training batches" in first.stdout + first.stderr
    run_dir = tmp_path / "eva"
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert (run_dir / "calibration.safetensors").is_file() and (run_dir / "adapter" / "qpeft_calibration.safetensors").is_file()
    for path in (run_dir / "adapter", run_dir / "report.json", run_dir / "report.md"):
        (os.remove if path.is_file() else __import__("shutil").rmtree)(path)
    again = subprocess.run([sys.executable, "-m", "qpeft", "run", "--resume", str(run_dir)], env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "calibrated" not in again.stdout + again.stderr
    resumed = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == resumed.keys() and all(torch.equal(saved[k], resumed[k]) for k in saved)


def test_two_gloo_processes_start_from_rank_0s_calibration(tmp_path):
    """Each rank is given other data; after the calibration stage both hold rank 0's init."""
    from dist_worker import one_and_two

    one, ranks = one_and_two(tmp_path, "lora:r=4:alpha=8:dropout=0+eva:calibration_batches=2", 29523, STEPS="2")
    initial = [k for k in one if k.startswith("initial.")]
    assert len(initial) == 14
    for key in initial:
        assert ranks[0][key].equal(one[key]) and ranks[1][key].equal(one[key]), key


def test_bad_options_and_fixed_rank_methods_are_one_line(reference, batches):
    from qpeft import OptionsError, compose

    with pytest.raises(OptionsError, match="rho must be ≥ 1"):
        compose("lora+eva:rho=0.5")
    with pytest.raises(QpeftError, match="eva:rho=1"):
        adapt(reference, "qdylora:r_max=4+eva:calibration_batches=4", calibration=batches)
    ours, _ = adapt(reference, "qdylora:r_max=4+eva:calibration_batches=4:rho=1", calibration=batches)
    assert {layer.r for layer in adapter_layers(ours).values()} == {4}


def test_a_calibrating_plugin_defines_all_three_hooks():
    class HalfDone(Adapter):
        name, description, role, modifies = "half", "calibrates, never applies", "modifier", "init"

        def calibrate(self, model, batches):
            return {}

    assert any("apply_calibration" in p for p in HalfDone.problems())
