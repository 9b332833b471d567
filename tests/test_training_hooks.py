"""The declared training hooks (core/plugin/base.py, called by core/train/hooks.py): their exact order
around accumulation, clipping and zero_grad; extra_loss in the gradient and in metrics.jsonl;
clipped gradients in on_gradients; a plugin's state through a checkpoint and --resume; a
misspelled hook refused at registration. Tiny model, a few seconds each."""
import json

import pytest
import torch

from qpeft.core.train import checkpoint
from qpeft.core.plugin.base import Plugin
from qpeft.core.train.trainer import Trainer
from qpeft.plugins.adapters.lora import LoRA
from test_lifecycle import registered
from test_trainer import Interrupt, adapted_tiny, cfg, source


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


class Recorder(Plugin):
    """Logs every hook call as a tuple in a shared list."""

    kind = "adapter"

    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log

    def on_train_begin(self, model, facts):
        self.log.append((self.name, "train_begin", facts.start_step, facts.total_steps, facts.grad_accum,
                         facts.world_size, facts.rank))

    def on_step_begin(self, step, model):
        grads = {p.grad is None for p in trainable(model)}
        self.log.append((self.name, "step_begin", step, "no grad" if grads == {True} else "grad"))

    def extra_loss(self, model, step):
        self.log.append((self.name, "extra_loss", step))
        return None

    def on_gradients(self, model, step):
        grads = {p.grad is None for p in trainable(model)}
        self.log.append((self.name, "gradients", step, "no grad" if grads == {True} else "grad"))

    def on_step_end(self, model, step):
        grads = {p.grad is None for p in trainable(model)}
        self.log.append((self.name, "step_end", step, "no grad" if grads == {True} else "grad"))

    def on_train_end(self, model, facts):
        self.log.append((self.name, "train_end", model.training))

    def state_dict(self):
        self.log.append((self.name, "state_dict"))
        return {"seen": len(self.log)}


def test_the_hooks_run_in_this_exact_order_with_accumulation_2(tokenizer, tmp_path):
    log = []
    config = cfg(steps=3, batch_size=4, grad_accum=2, save_every=2)
    Trainer(adapted_tiny(tokenizer), source(tokenizer, 16), config, tmp_path,
            hooks=[Recorder("a", log), Recorder("b", log)]).train()

    def both(*call):
        return [("a", *call), ("b", *call)]

    def step(k):
        return (both("step_begin", k, "no grad") + both("extra_loss", k) + both("extra_loss", k)
                + both("gradients", k, "grad") + both("step_end", k, "no grad"))

    expected = (both("train_begin", 0, 3, 2, 1, 0) + step(0) + step(1) + both("state_dict")  # step-000002
                + step(2) + both("state_dict")             # the final checkpoint, step-000003
                + both("train_end", False))
    assert log == expected


class L2(Plugin):
    """extra_loss = c·Σp² over the trainable tensors; on_gradients keeps the gradients."""

    kind, name = "adapter", "l2"

    def __init__(self, c=0.0, extra=True):
        super().__init__()
        self.c, self.extra, self.grads, self.norms = c, extra, [], []

    def extra_loss(self, model, step):
        if not self.extra:
            return None
        return self.c * sum((p.float() ** 2).sum() for p in trainable(model))

    def on_gradients(self, model, step):
        grads = [p.grad.detach().clone() for p in trainable(model)]
        self.grads.append(grads)
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())


def test_extra_loss_adds_its_gradient_and_is_logged_beside_the_task_loss(tokenizer, tmp_path):
    config = cfg(steps=1, batch_size=4, grad_accum=2, max_grad_norm=0)
    plain, regular = L2(extra=False), L2(c=0.5)
    Trainer(adapted_tiny(tokenizer), source(tokenizer, 16), config, tmp_path / "plain", hooks=[plain]).train()
    model = adapted_tiny(tokenizer)
    before = [p.detach().clone() for p in trainable(model)]
    Trainer(model, source(tokenizer, 16), config, tmp_path / "l2", hooks=[regular]).train()
    # two micro-batches, each adding c·Σp² weighted by its share of the step's tokens: d/dp = 2c·p
    for g0, g1, p in zip(plain.grads[0], regular.grads[0], before):
        torch.testing.assert_close(g1 - g0, 2 * 0.5 * p, rtol=1e-4, atol=1e-6)
    [plain_line] = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    [line] = [json.loads(line) for line in (tmp_path / "l2" / "metrics.jsonl").read_text().splitlines()]
    assert line["loss"] == pytest.approx(plain_line["loss"], rel=1e-6)    # "loss" stays the task loss
    assert line["loss/l2"] == pytest.approx(0.5 * sum((p ** 2).sum().item() for p in before), rel=1e-5)
    assert plain_line["loss/l2"] == 0.0        # declared but returned None: logged as 0
    assert list(line)[:3] == ["step", "loss", "loss/l2"]


def test_on_gradients_sees_the_clipped_gradients(tokenizer, tmp_path):
    seen = L2(extra=False)
    Trainer(adapted_tiny(tokenizer), source(tokenizer, 16), cfg(steps=2, max_grad_norm=0.01), tmp_path,
            hooks=[seen]).train()
    assert len(seen.norms) == 2
    assert all(n == pytest.approx(0.01, rel=1e-3) for n in seen.norms), seen.norms   # clipped from ~1


class Ema(Plugin):
    """Training state: an EMA of the trainable tensors' norm and a count of steps."""

    kind, name = "adapter", "ema"

    def __init__(self):
        super().__init__()
        self.ema, self.steps, self.loaded, self.start = torch.zeros(()), 0, None, None

    def on_train_begin(self, model, facts):
        self.start = (facts.start_step, self.steps)   # the state is restored before this

    def on_step_end(self, model, step):
        norm = torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in trainable(model)]))
        self.ema, self.steps = 0.9 * self.ema + 0.1 * norm, self.steps + 1

    def state_dict(self):
        return {"ema": self.ema, "steps": self.steps}

    def load_state_dict(self, state):
        self.ema, self.steps, self.loaded = state["ema"], state["steps"], state


def test_a_plugins_state_is_checkpointed_and_restored_on_resume(tokenizer, tmp_path):
    config = cfg(steps=6, save_every=2)
    straight = Ema()
    Trainer(adapted_tiny(tokenizer), source(tokenizer, 20), config, tmp_path / "a", hooks=[straight]).train()

    with pytest.raises(KeyboardInterrupt):   # killed in step 4: step-000002 is the newest checkpoint
        Trainer(adapted_tiny(tokenizer), source(tokenizer, 20), config, tmp_path / "b",
                hooks=[Ema(), Interrupt(3)]).train()
    saved = checkpoint.load(tmp_path / "b" / "checkpoints" / "step-000002")   # verified by the manifest
    assert saved["plugins"]["adapter/ema"]["steps"] == 2
    resumed, lines = Ema(), []
    Trainer(adapted_tiny(tokenizer), source(tokenizer, 20), config, tmp_path / "b", hooks=[resumed],
            say=lines.append).train(resume=True)
    assert resumed.start == (2, 2) and not lines
    assert resumed.steps == straight.steps == 6
    torch.testing.assert_close(resumed.ema, straight.ema, rtol=0, atol=1e-6)


def test_a_resume_whose_plugin_state_changed_says_so_in_one_line(tokenizer, tmp_path):
    config = cfg(steps=2, save_every=1)
    Trainer(adapted_tiny(tokenizer), source(tokenizer), config, tmp_path / "kept", hooks=[Ema()]).train()
    lines = []
    none_now = type("Stateless", (Plugin,), {"kind": "adapter", "name": "ema"})()
    Trainer(adapted_tiny(tokenizer), source(tokenizer), config, tmp_path / "kept", hooks=[none_now],
            say=lines.append).train(resume=True)
    assert lines == ["qpeft: checkpoint step-000002 holds training state of adapter 'ema', which keeps none "
                     "in this run; ignored"]

    Trainer(adapted_tiny(tokenizer), source(tokenizer), config, tmp_path / "none").train()
    lines, fresh = [], Ema()
    Trainer(adapted_tiny(tokenizer), source(tokenizer), config, tmp_path / "none", hooks=[fresh],
            say=lines.append).train(resume=True)
    assert lines == ["qpeft: checkpoint step-000002 holds no training state of adapter 'ema' (written when it "
                     "kept none); it continues from its initial state"]
    assert fresh.loaded is None and fresh.start == (2, 0)


@pytest.mark.parametrize("typo, meant", [("on_gradient", "on_gradients"), ("extra_losses", "extra_loss"),
                                         ("on_step_ends", "on_step_end"), ("on_train_begins", "on_train_begin"),
                                         ("load_state_dicts", "load_state_dict")])
def test_a_misspelled_training_hook_is_refused_at_registration_with_the_closest_name(typo, meant):
    cls = type("Typo", (LoRA,), {"name": "typo", typo: lambda self, *a, **k: None})
    reg = registered(cls)
    [failure] = reg.failures
    assert failure.error.endswith(f"defines '{typo}', which nothing calls; did you mean '{meant}'?")
    assert "typo" not in reg.names("adapter")


def tasked_source(tokenizer, tasks, n=24):
    """The bundled examples with their task replaced: ``tasks`` cycled over the rows."""
    import dataclasses

    from qpeft.core.dataset import templates
    from qpeft.core.dataset.batch_source import EncodedBatches
    from qpeft.core.dataset.examples import bundled

    examples = [dataclasses.replace(e, task=tasks[i % len(tasks)]) for i, e in enumerate(bundled("train")[:n])]
    items, _ = templates.encode_all(examples, tokenizer, max_length=128)
    return EncodedBatches(items, tokenizer.pad_token_id, seed=1)


def test_mixed_batches_log_each_tasks_token_mean(tokenizer, tmp_path):
    """Default (mixed) sampling logs task_loss/<task> too: with one task it is the loss itself;
    with two, each is logged and the loss lies between them (their token-weighted mean); data
    without tasks logs none."""
    config = cfg(steps=2, batch_size=4, grad_accum=2)
    Trainer(adapted_tiny(tokenizer), tasked_source(tokenizer, ["a"]), config, tmp_path / "one").train()
    for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["task_loss/a"] == pytest.approx(row["loss"], rel=1e-6)
    Trainer(adapted_tiny(tokenizer), tasked_source(tokenizer, ["a", "b"]), config, tmp_path / "two").train()
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        a, b = row["task_loss/a"], row["task_loss/b"]
        assert a != b and min(a, b) < row["loss"] < max(a, b)
    Trainer(adapted_tiny(tokenizer), tasked_source(tokenizer, [None]), config, tmp_path / "none").train()
    assert not any(k.startswith("task_loss/") for k in json.loads(
        (tmp_path / "none" / "metrics.jsonl").read_text().splitlines()[0]))
