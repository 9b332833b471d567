"""The training loop: loss falls, chunked loss equals the full one, resume is exact, DDP = 1 process."""
import json

import pytest
import torch

from qpeft.core.plugin import registry
from qpeft.core.dataset import templates
from qpeft.core.kinds.adapter import compose
from qpeft.core.dataset.batch_source import EncodedBatches
from qpeft.core.dataset.examples import bundled
from qpeft.core.train.loss import token_loss_sum
from qpeft.core.train.trainer import Trainer, TrainConfig, TrainingError
from qpeft.plugins.quantizers.none import NoQuantization


def adapted_tiny(tokenizer, adapter_seed=0, spec="lora:r=4:alpha=8:dropout=0", composition=False):
    from qpeft.core.kit.testing import tiny_model

    model = tiny_model(tokenizer=tokenizer, seed=0)
    NoQuantization(compute_dtype="float32").quantize_model(model)
    torch.manual_seed(adapter_seed)
    attached = compose(spec, registry.default())
    attached.attach(model)
    return (model, attached) if composition else model


def source(tokenizer, n=48, seed=1):
    items, _ = templates.encode_all(bundled("train")[:n], tokenizer, max_length=128)
    return EncodedBatches(items, tokenizer.pad_token_id, seed=seed)


def cfg(**kw):
    base = dict(steps=8, batch_size=4, lr=5e-3, log_every=1, save_every=0, progress=False, seed=3)
    return TrainConfig(**{**base, **kw})


def test_chunked_loss_equals_full_cross_entropy(tokenizer):
    from qpeft.core.kit.testing import tiny_model

    model = tiny_model(tokenizer=tokenizer)
    batch = source(tokenizer).batch(0, 0, 4)
    total, n = token_loss_sum(model, chunk=7, **batch)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"]).loss
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(total / n, reference, rtol=1e-5, atol=1e-5)


def test_loss_falls_and_metrics_are_logged(tokenizer, tmp_path):
    model = adapted_tiny(tokenizer)  # random weights: loss starts at ln(49152) = 10.8
    result = Trainer(model, source(tokenizer, 4), cfg(steps=12, lr=1e-2, max_grad_norm=0), tmp_path).train()
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 12
    assert losses[0] == pytest.approx(10.8, abs=0.1)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == list(range(1, 13))
    assert {"loss", "lr", "tokens_per_s", "memory_mb"} <= set(json.loads(lines[0]))


class Interrupt:
    """A plugin-style hook that stops the run at a given step, like a kill."""

    def __init__(self, at):
        self.at = at

    def on_step_begin(self, step, model):
        if step == self.at:
            raise KeyboardInterrupt


def trained_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tokenizer, tmp_path):
    config = cfg(steps=8, save_every=3, schedule="cosine", warmup_steps=2)
    straight = adapted_tiny(tokenizer)
    Trainer(straight, source(tokenizer, 20), config, tmp_path / "a").train()

    broken = adapted_tiny(tokenizer)
    with pytest.raises(KeyboardInterrupt):
        Trainer(broken, source(tokenizer, 20), config, tmp_path / "b", hooks=[Interrupt(5)]).train()
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000003"]
    resumed = adapted_tiny(tokenizer, adapter_seed=99)  # different init: the checkpoint must overwrite it
    Trainer(resumed, source(tokenizer, 20), config, tmp_path / "b").train(resume=True)
    for name, value in trained_state(straight).items():
        torch.testing.assert_close(trained_state(resumed)[name], value, rtol=0, atol=1e-6)


def test_an_unfinished_checkpoint_is_never_used(tokenizer, tmp_path):
    model = adapted_tiny(tokenizer)
    Trainer(model, source(tokenizer), cfg(steps=2, save_every=1), tmp_path).train()
    half = tmp_path / "checkpoints" / "step-000009"
    half.mkdir()
    (half / "state.json").write_text("{")  # no COMPLETE marker: a kill mid-write
    from qpeft.core.train import checkpoint

    assert checkpoint.latest(tmp_path / "checkpoints").name == "step-000002"


def test_non_finite_loss_stops_with_the_step_number(tokenizer, tmp_path):
    model = adapted_tiny(tokenizer)
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at step 2"):
        Trainer(model, source(tokenizer), cfg(steps=3), tmp_path, hooks=[Poison(1)]).train()


class Poison:
    def __init__(self, at):
        self.at = at

    def on_step_begin(self, step, model):
        if step == self.at:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("inf"))


def test_two_gloo_processes_are_identical_and_equal_one(tokenizer, tmp_path):
    from dist_worker import one_and_two

    one, ranks = one_and_two(tmp_path, "lora:r=4:alpha=8:dropout=0", 29517)
    assert len(one) > 0 and all(r.keys() == one.keys() for r in ranks)
    for key in one:   # rank 1 started from another init: broadcast made it rank 0's
        assert ranks[1][key].equal(ranks[0][key]), key
        torch.testing.assert_close(ranks[0][key], one[key], rtol=0, atol=1e-5)
    logged = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert len(logged[0]) == len(logged[1]) == 4
    for alone, shared in zip(*logged):     # the bundled tasks' mixed-batch losses, summed over ranks
        tasks = [k for k in alone if k.startswith("task_loss/")]
        assert tasks and tasks == [k for k in shared if k.startswith("task_loss/")]
        for key in ["loss", *tasks]:
            assert shared[key] == pytest.approx(alone[key], rel=1e-5), key


@pytest.mark.parametrize("size", [1, 3, 4, 7, 20, 21, 50])
def test_batch_count_equals_the_length_of_every_epoch_order(tokenizer, size):
    batches = source(tokenizer, 20)
    for epoch in range(3):
        assert batches.num_batches(size) == len(batches._order(epoch, size))
