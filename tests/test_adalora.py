"""AdaLoRA (plugins/adapters/adalora.py) against PEFT 0.21's AdaLoraModel: the same initial
tensors and batches give the same losses, masks and logits; adapters cross both ways; the
budget schedule is PEFT's; a run killed with SIGKILL resumes to the same adapter."""
import copy
import json

import pytest
import torch

from qpeft import QpeftError, TrainFacts, adapter_layers
from qpeft.testing import adapt

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 10
SPEC = f"adalora:init_r=6:target_r=3:tinit=2:tfinal=3:dropout=0:alpha=8:targets={','.join(TARGETS)}"


def peft_adalora(reference):
    config = peft.AdaLoraConfig(init_r=6, target_r=3, tinit=2, tfinal=3, deltaT=1, total_step=STEPS,
                                lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    return peft.get_peft_model(copy.deepcopy(reference), config)


def peft_layers(model) -> dict:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if "default" in getattr(m, "lora_E", {})}


@pytest.fixture(scope="module")
def trained_pair(reference, batch):
    """qpeft's and PEFT's AdaLoRA from the same initial P, Λ, Q, trained side by side for
    STEPS AdamW steps, each calling its own method's hooks in its documented order."""
    torch.manual_seed(0)
    theirs = peft_adalora(reference)
    ours, composition = adapt(reference, SPEC)
    method, layers, their_layers = composition.method, adapter_layers(ours), peft_layers(theirs)
    assert set(layers) == set(their_layers) and len(layers) == 14
    with torch.no_grad():
        for name, layer in layers.items():
            for key in ("lora_A", "lora_B", "lora_E"):
                getattr(layer, key).copy_(getattr(their_layers[name], key)["default"])
    ours_opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    their_opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    method.on_train_begin(ours, TrainFacts(STEPS, 1, 1, 0, 0, "cpu"))
    ours.train(), theirs.train()
    losses, ranks = [], []
    for step in range(STEPS):
        ours_loss = ours(batch, labels=batch).loss + method.extra_loss(ours, step)
        ours_loss.backward()
        method.on_gradients(ours, step)
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        method.on_step_end(ours, step)
        their_loss = theirs(input_ids=batch, labels=batch).loss      # PEFT adds R inside forward
        their_loss.backward()
        their_opt.step()
        theirs.base_model.update_and_allocate(step)
        their_opt.zero_grad(set_to_none=True)
        losses.append((ours_loss.item(), their_loss.item()))
        ranks.append(sum(layer.rank for layer in layers.values()))
    method.on_train_end(ours, TrainFacts(STEPS, 1, 1, 0, 0, "cpu"))
    return ours.eval(), composition, theirs.eval(), losses, ranks


def test_losses_masks_and_logits_equal_peft(trained_pair, batch):
    ours, _, theirs, losses, ranks = trained_pair
    for step, (a, b) in enumerate(losses):      # the task loss plus 0.5·R, step by step
        assert abs(a - b) <= 1e-5, (step, a, b)
    assert losses[-1][0] < losses[0][0] - 0.3
    assert ranks[:3] == [84, 84, 84] and ranks[-1] == 3 * 14 and ranks == sorted(ranks, reverse=True)
    pattern = theirs.peft_config["default"].rank_pattern
    for name, layer in adapter_layers(ours).items():
        assert layer.kept.tolist() == list(pattern[f"{name}.lora_E.default"]), name
        assert not layer.lora_E[~layer.kept].any()
    assert len({layer.rank for layer in adapter_layers(ours).values()}) > 1     # ranks moved between layers
    with torch.no_grad():
        assert (ours(batch).logits - theirs(input_ids=batch).logits).abs().max().item() <= 1e-5


def test_the_budget_schedule_is_peft_s(reference):
    from peft.tuners.adalora.layer import RankAllocator

    theirs = peft_adalora(reference)
    allocator = RankAllocator(theirs.base_model.model, theirs.peft_config["default"], "default")
    _, composition = adapt(reference, SPEC)
    composition.method.on_train_begin(None, TrainFacts(STEPS, 1, 1, 0, 0, "cpu"))
    assert [composition.method.budget(t, 14) for t in range(STEPS)] == \
           [allocator.budget_schedule(t) for t in range(STEPS)]


def test_the_saved_adapter_loads_in_peft_and_back_in_qpeft_exactly(trained_pair, reference, batch, tmp_path):
    ours, composition, _, _, _ = trained_pair
    composition.method.save(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == STEPS
    kept = {name: layer.rank for name, layer in adapter_layers(ours).items()}
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in config["rank_pattern"].items()} == kept
    with torch.no_grad():
        expected = ours(batch).logits
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
        assert (theirs(input_ids=batch).logits - expected).abs().max().item() <= 1e-5
        again, method = adapt(reference, SPEC, seed=7)
        method.method.load(again, tmp_path)
        assert torch.equal(again.eval()(batch).logits, expected)
        assert {n: layer.rank for n, layer in adapter_layers(again).items()} == kept


def test_a_peft_adalora_adapter_loads_through_the_import(trained_pair, reference, batch, tmp_path):
    from qpeft.core.interop import peft_import

    _, _, theirs, _, _ = trained_pair
    theirs.save_pretrained(tmp_path)
    imported = peft_import.read(tmp_path)
    assert imported.spec.startswith("adalora:")
    model, _ = adapt(reference, imported.composition)
    imported.load(model)
    with torch.no_grad():
        assert (model.eval()(batch).logits - theirs(input_ids=batch).logits).abs().max().item() <= 1e-5


def test_no_budgeting_phase_is_one_line(reference):
    _, composition = adapt(reference, "adalora:tinit=4:tfinal=6")
    with pytest.raises(QpeftError, match=r"^adapter 'adalora': tinit=4 and tfinal=6 leave no step to prune ranks "
                                         r"in a run of 10 steps; lower them or train longer$"):
        composition.method.on_train_begin(None, TrainFacts(10, 1, 1, 0, 0, "cpu"))


def test_modifiers_and_bad_ranks_are_refused(reference):
    with pytest.raises(QpeftError, match="adalora"):
        adapt(reference, "adalora+rslora")
    with pytest.raises(QpeftError, match=r"need 1 ≤ target_r ≤ init_r, got target_r=9, init_r=4"):
        adapt(reference, "adalora:init_r=4:target_r=9")


def test_a_run_killed_with_sigkill_resumes_to_the_same_adapter(tiny_dir, tmp_path):
    from killed_run import killed_and_straight

    flags = ["--model", str(tiny_dir), "--quant", "nf4", "--adapter", "adalora:init_r=4:target_r=2",
             "--evaluators", "perplexity", "--eval-limit", "2", "--batch-size", "2", "--steps", "24",
             "--log-every", "1", "--save-every", "4"]
    a, b = killed_and_straight(tmp_path, flags, kill_after_step=8)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "killed" / "adapter" / "adapter_config.json").read_text())
    assert config["total_step"] == 24 and config["rank_pattern"]
    report = json.loads((tmp_path / "killed" / "report.json").read_text())
    facts = report["adapter_facts"]
    assert facts["ranks_total"] == sum(sum(v) for v in config["rank_pattern"].values()) == 2 * len(facts["ranks"])
    assert "## Adapter" in (tmp_path / "killed" / "report.md").read_text()


def test_two_gloo_processes_prune_the_same_triplets(tmp_path):
    """AdaLoRA's scores come from gradients taken after the all-reduce: both ranks keep the
    same triplets (and hold the same adapter), as one process does."""
    from dist_worker import one_and_two

    one, ranks = one_and_two(tmp_path, "adalora:init_r=4:target_r=2:dropout=0", 29519, STEPS="10")
    kept = [k for k in one if k.startswith("kept.")]
    assert len(kept) == 14 and sum(int(one[k].sum()) for k in kept) == 2 * 14     # pruned to target_r
    for key in one:
        assert ranks[1][key].equal(ranks[0][key]), key
    for key in kept:
        assert ranks[0][key].equal(one[key]), key
