"""Long evaluation work shows progress under the evaluator's name, and a run's first lines say
what was chosen and why (issue 24 item 2)."""
import dataclasses

import pytest

from qpeft import Evaluator, generate, mean_loss
from qpeft.core.settings import config
from qpeft.core.run import pipeline
from qpeft.core.base import progress
from qpeft.core.dataset import templates
from qpeft.core.dataset.examples import Example


class Bars:
    """Records the bars qpeft.core.base.progress would draw: (label, total, unit) and the items counted."""

    def __init__(self):
        self.made = []

    def __call__(self, total=None, desc=None, unit=None, disable=None, leave=None):
        bar = Bar(total, desc, unit, disable)
        self.made.append(bar)
        return bar


@dataclasses.dataclass
class Bar:
    total: int
    desc: str
    unit: str
    disable: object
    done: int = 0

    def update(self, n):
        self.done += n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def bars(monkeypatch):
    recorder = Bars()
    monkeypatch.setattr(progress, "_tqdm", recorder)
    return recorder


class Both(Evaluator):
    """A third-party-like evaluator that scores and generates through the public helpers."""

    name = "both"
    description = "loss and answers"

    def evaluate(self, ctx):
        items = [ctx.encode(e) for e in ctx.validation]
        loss, _ = mean_loss(ctx.model, items, ctx.tokenizer.pad_token_id, 2)
        answers = generate(ctx.model, ctx.tokenizer, [ctx.prompt_ids(e) for e in ctx.validation], 2, 2)
        return {"loss": loss, "answers": len(answers)}


def test_shared_helpers_show_a_bar_named_after_the_evaluator_and_stage(bars):
    from qpeft.core.kinds.evaluator import EvalContext
    from qpeft.core.kit.testing import tiny_model_and_tokenizer

    model, tokenizer = tiny_model_and_tokenizer()
    examples = [Example(messages=[{"role": "user", "content": f"{a} + {a}?"}], response=str(2 * a))
                for a in range(5)]
    ctx = EvalContext(model=model, tokenizer=tokenizer, stage="after", validation=examples, test=[], limit=5,
                      encode=lambda e: templates.encode(e, tokenizer, max_length=32)[0],
                      prompt_ids=lambda e: templates.prompt_ids(e, tokenizer=tokenizer))
    out = pipeline.evaluate([Both()], ctx, say=lambda _: None)
    assert out["both"]["answers"] == 5
    assert [(b.desc, b.total, b.unit, b.done, b.disable) for b in bars.made] == [
        ("after both", 5, "example", 5, None), ("after both", 5, "answer", 5, None)]
    bars.made.clear()
    generate(model, tokenizer, [[1, 2, 3]], 1)        # outside an evaluation: no bar drawn
    assert [b.disable for b in bars.made] == [True]
    with progress.evaluating(None):                     # ranks other than 0
        generate(model, tokenizer, [[1, 2, 3]], 1)
    assert [b.disable for b in bars.made] == [True, True]


@pytest.mark.parametrize("quant, adapter, expected", [
    ("nf4:compute_dtype=float32", "ia3", "matmuls in float32 (set by compute_dtype) · activations float32 "
                                         "(the adapter needs them)"),
    ("none:compute_dtype=bfloat16", "lora", "matmuls in bfloat16 (set by compute_dtype) · activations bfloat16"),
])
def test_the_first_lines_say_what_was_chosen_and_why(tiny_dir, quant, adapter, expected):
    cfg = config.build(None, {"model": tiny_dir, "quant": quant, "adapter": adapter, "device": "auto"})
    first, second = pipeline.choices(cfg, pipeline.plan(cfg), "cpu")
    assert first == f"qpeft: loading {tiny_dir} on cpu (auto: no CUDA GPU)"
    assert second == f"qpeft: quantizer {quant} · adapter {adapter} · {expected}"


def test_auto_says_which_cpu_feature_decided(monkeypatch):
    from qpeft.core.kinds import quantizer

    dtype, why = quantizer.native_dtype_reason()
    assert (dtype, why.startswith("auto: the CPU has ")) in {("bfloat16", True), ("float32", True)}
    assert ("AVX512-BF16" in why or "AMX" in why) == (dtype == "bfloat16")
