"""``accuracy``: exact-match accuracy of greedy answers on a split with checkable answers.

Each test example carries a short ``answer``; the model's greedy continuation of the
rendered prompt is correct when its first line equals the answer (case, surrounding
spaces and a final '.' ignored). Reported overall and per task (``accuracy/<task>``). When a
plugin of the run routes by task (MTLoRA; ``ctx.use_task`` is set), each task's cases are
generated on their own, under that task's routing.
"""
import dataclasses
from collections import defaultdict

from qpeft import Evaluator, exact_match, generate, hookimpl, option


@dataclasses.dataclass
class AccuracyOptions:
    max_new_tokens: int = option(8, "tokens generated per answer (bundled answers take at most 6 with eos)")
    batch_size: int = option(16, "prompts generated at once")


class Accuracy(Evaluator):
    name = "accuracy"
    reproducible = True   # a function of the weights, the data and its options: its baseline is computed once
    description = "Exact-match accuracy of greedy answers on the held-out test split"
    Options = AccuracyOptions
    higher_is_better = {"accuracy": True}
    primary_metric = "accuracy"

    def evaluate(self, ctx):
        cases = [e for e in ctx.test if e.answer is not None]
        if not cases:
            return {}
        if ctx.use_task is not None:        # one task at a time, routed to it
            cases = sorted(cases, key=lambda e: (e.task is not None, e.task or ""))
            outputs = []
            for task in dict.fromkeys(e.task for e in cases):
                ctx.use_task(task)
                outputs += self.answers(ctx, [e for e in cases if e.task == task])
            ctx.use_task(None)
        else:
            outputs = self.answers(ctx, cases)
        by_task = defaultdict(lambda: [0, 0])
        for example, text in zip(cases, outputs):
            hit = exact_match(text, example.answer)
            by_task[example.task or "all"][0] += hit
            by_task[example.task or "all"][1] += 1
        right = sum(v[0] for v in by_task.values())
        out = {"accuracy": round(right / len(cases), 4), "accuracy_n": len(cases)}
        out.update({f"accuracy/{task}": round(r / n, 4) for task, (r, n) in sorted(by_task.items())})
        return out

    def answers(self, ctx, cases: list) -> list[str]:
        """The greedy answer to each case's prompt."""
        return generate(ctx.model, ctx.tokenizer, [ctx.prompt_ids(e) for e in cases], self.options.max_new_tokens,
                        self.options.batch_size, ctx.device)


@hookimpl
def register_evaluators(register):
    register(Accuracy)
