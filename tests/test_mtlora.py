"""MTLoRA and task-aware data: rows routed by task, one PEFT LoRA per task with equal logits,
per-task mini-batches and losses, qpeft eval/export --task, exact resume after SIGKILL."""
import copy
import json

import pytest
import torch

from qpeft import QpeftError, adapter_layers
from qpeft.testing import adapt

peft = pytest.importorskip("peft")
SPEC = "mtlora:r=4:task_r=2:tasks=a,b:dropout=0"


@pytest.fixture
def trained(reference):
    """mtlora over the float32 reference with every A and B random (as if trained)."""
    model, adapter = adapt(reference, SPEC)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in [layer.lora_B, *layer.task_B]:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval(), adapter.method


def logits(model, batch, method=None, tasks=None):
    if method is not None:
        method.on_batch(model=model, tasks=tasks, step=None)
    with torch.no_grad():
        return model(batch).logits


def test_each_row_takes_its_task_s_update_and_a_row_without_one_the_shared(trained, batch):
    model, method = trained
    per_row = logits(model, batch, method, ("a", "b"))
    as_a, as_b = logits(model, batch, method, ("a",)), logits(model, batch, method, ("b",))
    shared = logits(model, batch, method, None)
    torch.testing.assert_close(per_row[0], as_a[0], rtol=0, atol=1e-5)    # float32: two code paths
    torch.testing.assert_close(per_row[1], as_b[1], rtol=0, atol=1e-5)
    assert (as_a - as_b).abs().max() > 1e-2 and (as_a - shared).abs().max() > 1e-2
    mixed = logits(model, batch, method, ("a", None))
    torch.testing.assert_close(mixed[1], shared[1], rtol=0, atol=1e-5)
    method.on_batch(model=model, tasks=("a", "b", "a"), step=None)
    with pytest.raises(QpeftError, match="tasks of 3 rows, but the batch has 2"):
        model(batch)


@pytest.mark.parametrize("task", ["a", "b"])
def test_each_task_exports_as_a_peft_lora_with_equal_logits(trained, reference, batch, tmp_path, task):
    """Shared and task update folded into one rank r + r_t LoRA: PEFT 0.21's logits equal
    qpeft's for that task within 1e-4 (float32), and qpeft reads the export back as lora."""
    import qpeft

    model, method = trained
    expected = logits(model, batch, method, (task,))
    method.select_task(model, task)
    method.save(model, tmp_path, {"spec": SPEC})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 6, 6)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    got = logits(theirs, batch)
    assert (got - expected).abs().max().item() <= 1e-4
    again, _ = adapt(reference, None)
    composition = qpeft.load_adapter(again, tmp_path)
    assert composition.method.name == "lora"
    assert (logits(again.eval(), batch) - expected).abs().max().item() <= 1e-4
    assert (method.merge(model)(batch).logits - expected).abs().max().item() <= 1e-4


def test_tasks_come_from_the_data_and_a_bad_task_is_one_line(reference):
    from qpeft import DataFacts, compose

    composition = compose("mtlora:r=2:task_r=1")
    with pytest.raises(QpeftError, match="has no tasks"):
        composition.attach(adapt(reference, None)[0])          # no on_data: nothing says the tasks
    with pytest.raises(QpeftError, match="needs training examples with a 'task'"):
        composition.method.on_data(facts=DataFacts((), {}, 3, 3))
    composition.method.on_data(facts=DataFacts(("x", "y"), {"x": 2, "y": 1}, 3, 0))
    assert composition.method.options.tasks == ["x", "y"]
    with pytest.raises(QpeftError, match="the data has task 'z', which tasks=x,y lacks"):
        composition.method.on_data(facts=DataFacts(("x", "z"), {}, 2, 0))
    model, fresh = adapt(reference, "mtlora:r=2:task_r=1")     # qpeft.testing.adapt: the kit's tasks a, b
    with pytest.raises(QpeftError, match="has no task 'q'; its tasks: a, b"):
        fresh.method.select_task(model, "q")


def test_per_task_batches_hold_one_task_each_in_a_seeded_order(tokenizer):
    from qpeft.core.dataset import templates
    from qpeft.core.dataset.batch_source import EncodedBatches
    from qpeft.core.dataset.batching import pack
    from qpeft.core.dataset.examples import bundled

    items, _ = templates.encode_all(bundled("train")[:40], tokenizer, max_length=96)
    source = EncodedBatches(items, tokenizer.pad_token_id, seed=3)
    assert source.tasks == ("alert", "conversion", "decimal", "sequence", "threshold")
    rows = source.batch_tasks(0, 0, 4)
    assert len(rows) == 4 and set(rows) <= set(source.tasks)
    alert = source.of_task("sequence")
    again = EncodedBatches(items, tokenizer.pad_token_id, seed=3).of_task("sequence")
    assert alert.batch_tasks(1, 0, 2) == ("sequence", "sequence")
    assert torch.equal(alert.batch(1, 0, 2)["input_ids"], again.batch(1, 0, 2)["input_ids"])
    with pytest.raises(QpeftError, match="no training example has task 'nope'"):
        source.of_task("nope")
    packed = pack([i for i in items if i.task == "decimal"], 96)
    assert {p.task for p in packed} == {"decimal"}
    assert None in {p.task for p in pack(items, 512)}             # a row of several tasks has none


def settings(tmp_path, tiny_dir, **kw):
    from qpeft.core.settings import config

    base = {"model": str(tiny_dir), "quant": "none:compute_dtype=float32", "adapter": "mtlora:r=4:task_r=2",
            "evaluators": "perplexity;accuracy:max_new_tokens=3", "eval_limit": 10, "steps": 3, "batch_size": 2,
            "lr": 1e-2, "log_every": 1, "save_every": 0, "output_dir": str(tmp_path), "progress": False,
            "task_sampling": "per-task", "task_weights": "alert=2,decimal=0.5", "name": "mt"}
    return config.build(None, {**base, **kw})


def test_a_per_task_run_logs_task_losses_and_evaluates_and_exports_one_task(tiny_dir, tmp_path):
    from qpeft.core.cli.eval_cmd import evaluate_run
    from qpeft.core.cli.export_cmd import export_hf
    from qpeft.core.run import pipeline

    report = pipeline.run(settings(tmp_path, tiny_dir), say=lambda _: None)
    run = tmp_path / "mt"
    tasks = ["alert", "conversion", "decimal", "sequence", "threshold"]
    record = json.loads((run / "config.json").read_text())
    assert record["adapter"]["parts"][0]["options"]["tasks"] == tasks            # resolved from the data
    saved = json.loads((run / "adapter" / "qpeft_adapter.json").read_text())
    assert saved["parts"][0]["options"]["tasks"] == tasks
    weights = {"alert": 2.0, "decimal": 0.5}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        losses = {t: row[f"task_loss/{t}"] for t in tasks}
        assert row["loss"] == pytest.approx(sum(weights.get(t, 1.0) * v for t, v in losses.items()))
    for stage in ("before", "after"):
        assert {f"accuracy/{t}" for t in tasks} <= set(report[stage]["accuracy"])
        assert {f"eval_loss/{t}" for t in tasks} <= set(report[stage]["perplexity"])
    assert report["adapter_facts"]["tasks"] == ",".join(tasks)

    one, _ = evaluate_run(run, evaluators=["perplexity"], say=lambda _: None, task="decimal")
    assert [k for k in one["results"]["perplexity"] if "/" in k] == ["eval_loss/decimal"]
    assert one["results"]["perplexity"]["eval_loss"] == pytest.approx(
        report["after"]["perplexity"]["eval_loss/decimal"], abs=1e-4)
    export_hf(run, tmp_path / "decimal", False, None, "float32", "500MB", lambda _: None, task="decimal")
    config = json.loads((tmp_path / "decimal" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"]) == ("LORA", 6)
    with pytest.raises(QpeftError, match="has task 'nope'"):
        evaluate_run(run, say=lambda _: None, task="nope")


def test_tasks_flags_are_checked_before_the_model_loads(tiny_dir, tmp_path):
    from qpeft.core.base.errors import OptionsError
    from qpeft.core.run import pipeline

    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(10)))
    with pytest.raises(QpeftError, match="mtlora' needs training examples with a 'task'"):
        pipeline.plan(settings(tmp_path, tiny_dir, data=str(plain), task_sampling="mixed", task_weights=""))
    with pytest.raises(QpeftError, match="--task-sampling per-task needs training examples with a 'task'"):
        pipeline.plan(settings(tmp_path, tiny_dir, data=str(plain), adapter="lora", task_weights=""))
    with pytest.raises(QpeftError, match="--task-weights names task 'alrt', which no training example has"):
        pipeline.plan(settings(tmp_path, tiny_dir, task_weights="alrt=2"))
    with pytest.raises(OptionsError, match="'alert' is not TASK=WEIGHT"):
        settings(tmp_path, tiny_dir, task_weights="alert")
    with pytest.raises(OptionsError, match="--task-weights weighs the per-task losses"):
        settings(tmp_path, tiny_dir, task_sampling="mixed")


def test_a_per_task_run_over_hqq_killed_with_sigkill_resumes_to_the_same_adapter(tiny_dir, tmp_path):
    """Per-task positions, RNG and weights come back from the step-4 checkpoint: the same
    adapter and the same per-task losses as a run never stopped."""
    from killed_run import killed_and_straight

    flags = ["--model", str(tiny_dir), "--quant", "hqq", "--adapter", "mtlora:r=2:task_r=2", "--task-sampling",
             "per-task", "--task-weights", "sequence=0.5", "--evaluators", "perplexity", "--eval-limit", "2",
             "--batch-size", "2", "--steps", "8", "--log-every", "1", "--save-every", "4"]
    a, b = killed_and_straight(tmp_path, flags, kill_after_step=4)
    assert len(a) == 14 * (2 + 2 * 5) and a.keys() == b.keys()       # 14 layers: shared A, B + 5 tasks' A, B
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("straight", "killed")]
    assert [r["step"] for r in rows[1]] == list(range(1, 9))
    losses = [[{k: v for k, v in r.items() if "loss" in k and k != "eval_loss"} for r in run] for run in rows]
    assert losses[0] == losses[1] and "task_loss/sequence" in losses[0][-1]


def test_two_gloo_processes_train_every_task_as_one_does(tmp_path):
    """--task-sampling per-task under torchrun: each process draws rows of the same task, so
    every task's tensors get a gradient everywhere; both ranks hold one process's adapter and
    log its per-task losses."""
    from dist_worker import one_and_two

    spec = "mtlora:r=4:task_r=2:tasks=alert,conversion,decimal,sequence,threshold:dropout=0"
    one, ranks = one_and_two(tmp_path, spec, 29527, STEPS="3", TASK_SAMPLING="per-task")
    assert len(one) > 0 and all(r.keys() == one.keys() for r in ranks)
    assert sum(key.endswith("task_B.4") for key in one) == 14     # the fifth task's B, in every layer
    for key in one:
        assert ranks[1][key].equal(ranks[0][key]), key
        torch.testing.assert_close(ranks[0][key], one[key], rtol=0, atol=1e-5)
    logged = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    for alone, shared in zip(*logged):
        assert {k for k in alone if k.startswith("task_loss/")} == {
            f"task_loss/{t}" for t in ("alert", "conversion", "decimal", "sequence", "threshold")}
        for key in alone:
            if key.startswith(("task_loss/", "loss")) and key != "loss_ema":
                assert shared[key] == pytest.approx(alone[key], rel=1e-5), key
