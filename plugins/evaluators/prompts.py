"""``prompts``: hand-written prompt tests with expected answers — pass/fail per case, a pass rate.

Each case is a prompt, an expected answer and a match rule:

    exact     the first line of the answer equals ``expected`` (case, spaces, a final '.'
              ignored — the ``accuracy`` evaluator's rule)
    contains  ``expected`` occurs in the answer (case ignored)
    regex     ``re.search(expected, answer)`` finds a match (write ``(?i)`` to ignore case)

The prompt is rendered with the run's template (the tokenizer's chat template for chat
models) and answered greedily. Two cases from the IoT paper's qualitative checks are
built in: continuing the Fibonacci sequence (expects 13) and "Which number is larger,
9.11 or 9.9?" (the answer must be 9.9 alone or say that 9.9 is the larger, so
"9.11 is larger than 9.9" and "we calculate 9.9 as 9.11" fail). Pass your own cases with ``prompts:path=cases.jsonl`` — JSON or JSONL
records ``{"prompt", "expected", "match", "name"?}``.
"""
import dataclasses
import json
import re
from pathlib import Path

from qpeft import Evaluator, Example, QpeftError, exact_match, generate, hookimpl, option

MATCHES = ("exact", "contains", "regex")
# The answer states 9.9 (or 9.90…) is the larger: "9.9", "9.9 is larger", "The larger number
# is 9.9" pass; "9.11 is larger than 9.9", "9.11" and a mere mention of 9.9 fail.
_NINE_NINE = r"9\.90*(?![0-9])"
SAYS_9_9_IS_LARGER = (rf"(?i)^\W*{_NINE_NINE}\W*$|^\W*{_NINE_NINE}\s+is\s+(the\s+)?(larger|bigger|greater)"
                      rf"|(larger|bigger|greater)(\s+(one|number|value))?\s+is\s+{_NINE_NINE}")
BUILTIN = (
    {"name": "fibonacci", "prompt": "Continue the Fibonacci sequence: 0, 1, 1, 2, 3, 5, 8,",
     "expected": "13", "match": "contains"},
    {"name": "9.11-vs-9.9", "prompt": "Which number is larger, 9.11 or 9.9?",
     "expected": SAYS_9_9_IS_LARGER, "match": "regex"},
)


@dataclasses.dataclass
class Case:
    """One prompt test."""

    name: str
    prompt: str
    expected: str
    match: str = "contains"

    def passes(self, answer: str) -> bool:
        """Whether ``answer`` (the generated text) satisfies this case."""
        if self.match == "exact":
            return exact_match(answer, self.expected)
        if self.match == "contains":
            return self.expected.lower() in answer.lower()
        return re.search(self.expected, answer) is not None


def make_case(record: dict, where: str, index: int) -> Case:
    """A :class:`Case` from a record, checked (match rule known, regex compiles)."""
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) \
            or not isinstance(record.get("expected"), (str, int, float)):
        raise QpeftError(f"{where}: a case needs text 'prompt' and 'expected', e.g. "
                         '{"prompt": "2+2=", "expected": "4", "match": "contains"}')
    case = Case(str(record.get("name") or f"case{index}"), record["prompt"], str(record["expected"]),
                record.get("match", "contains"))
    if case.match not in MATCHES:
        raise QpeftError(f"{where}: unknown match '{case.match}'; use one of {', '.join(MATCHES)}")
    if case.match == "regex":
        try:
            re.compile(case.expected)
        except re.error as exc:
            raise QpeftError(f"{where}: 'expected' is not a valid regex ({exc})") from None
    return case


def load_cases(path: str = "") -> list[Case]:
    """The cases in a JSON list or JSONL file, or the two built-in ones."""
    if not path:
        return [make_case(r, "built-in", i) for i, r in enumerate(BUILTIN, 1)]
    p = Path(path).expanduser()
    if not p.is_file():
        raise QpeftError(f"no such prompts file: {path}; pass prompts:path=cases.jsonl")
    text = p.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            records = [(f"{p.name}:item {i}", r) for i, r in enumerate(json.loads(text), 1)]
        else:
            records = [(f"{p.name}:{i}", json.loads(line))
                       for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    except json.JSONDecodeError as exc:
        raise QpeftError(f"{p.name}: invalid JSON ({exc.msg}, line {exc.lineno}); "
                         "write a JSON list or one record per line") from None
    if not records:
        raise QpeftError(f"{p.name} has no cases; add records like {{\"prompt\": ..., \"expected\": ...}}")
    return [make_case(r, where, i) for i, (where, r) in enumerate(records, 1)]


def one_line(text: str, limit: int) -> str:
    """Generated text fit for a report table cell: newlines as ⏎, pipes escaped, cut."""
    text = text.strip().replace("\r", "").replace("\n", " ⏎ ").replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + "…"


@dataclasses.dataclass
class PromptsOptions:
    path: str = option("", "JSON/JSONL file of {prompt, expected, match, name}; empty: the 2 built-in cases")
    max_new_tokens: int = option(32, "tokens generated per answer")
    batch_size: int = option(8, "prompts generated at once")
    output_chars: int = option(200, "characters of each answer kept in the result")


class Prompts(Evaluator):
    name = "prompts"
    reproducible = True   # a function of the weights, the data and its options: its baseline is computed once
    description = "Prompt tests with expected answers (exact, contains, regex): pass/fail per case, pass rate"
    Options = PromptsOptions
    higher_is_better = {"pass_rate": True}
    primary_metric = "pass_rate"

    def evaluate(self, ctx):
        cases = load_cases(self.options.path)
        examples = [Example(messages=[{"role": "user", "content": c.prompt}], instruction=c.prompt,
                            source=f"prompts:{c.name}") for c in cases]
        answers = generate(ctx.model, ctx.tokenizer, [ctx.prompt_ids(e) for e in examples],
                           self.options.max_new_tokens, self.options.batch_size, ctx.device)
        passed = [c.passes(a) for c, a in zip(cases, answers)]
        out = {"pass_rate": round(sum(passed) / len(cases), 4), "passed": sum(passed), "cases": len(cases),
               "pass_rate_n": len(cases)}   # _n: the sample size, shown beside the rate ("0.5 (1/2)")
        out.update({f"pass/{c.name}": int(p) for c, p in zip(cases, passed)})
        out.update({f"output/{c.name}": one_line(a, self.options.output_chars) for c, a in zip(cases, answers)})
        return out


@hookimpl
def register_evaluators(register):
    register(Prompts)
