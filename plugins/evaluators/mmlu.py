"""``mmlu``: k-shot multiple choice scored by log-likelihood, as lm-evaluation-harness scores MMLU.

Hendrycks et al. 2021, "Measuring Massive Multitask Language Understanding" (arXiv:2009.03300),
scored the way EleutherAI's lm-evaluation-harness does (task ``mmlu``, ``output_type:
multiple_choice``, ``fewshot_config.sampler: first_n``)::

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {dev question 1}\\nA. …\\nB. …\\nC. …\\nD. …\\nAnswer: {letter}\\n\\n      × k (first k dev rows)
    {test question}\\nA. …\\nB. …\\nC. …\\nD. …\\nAnswer:

    prediction = argmax over c ∈ {" A", " B", " C", " D"} of  Σ log p(c tokens | prompt)

No chat template and no special tokens, as the harness runs base-model MMLU; prompts longer
than ``max_length`` are cut from the left. Accuracy is averaged over questions (the
harness's size-weighted ``mmlu`` group), with per-subject accuracy beside it.

Input: the standard MMLU CSV folder (``dev/<subject>_dev.csv``, ``test/<subject>_test.csv``;
rows ``question,A,B,C,D,answer`` without header) or a JSONL file of
``{"question", "choices": [4] or "A".."D", "answer": letter or index, "subject", "split"}``
(``"split": "dev"`` rows are the few-shot pool). The default is a small sample written
for qpeft (``core/resources/mmlu_sample``) — not MMLU itself.
"""
import csv
import dataclasses
import io
import json
from collections import defaultdict
from pathlib import Path

from qpeft import Evaluator, QpeftError, hookimpl, option
from qpeft.plugins.evaluators._loglik import continuation_logprobs

LETTERS = ("A", "B", "C", "D")
HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"


@dataclasses.dataclass
class Question:
    """One four-way multiple-choice question; ``answer`` is the index of the right choice."""

    subject: str
    question: str
    choices: list
    answer: int


# -- reading -----------------------------------------------------------------------------
def load_questions(path: str = "") -> tuple[dict, dict]:
    """``(dev, test)``: questions by subject from an MMLU folder, a JSONL file, or the sample."""
    if not path:
        from importlib import resources

        return read_csv_folder(resources.files("qpeft.core").joinpath("resources", "mmlu_sample"))
    p = Path(path).expanduser()
    if p.is_dir():
        return read_csv_folder(p)
    if p.is_file():
        return read_jsonl(p)
    raise QpeftError(f"no such MMLU folder or file: {path}; pass mmlu:path=DIR (with dev/ and "
                     "test/ CSVs) or mmlu:path=FILE.jsonl")


def read_csv_folder(root) -> tuple[dict, dict]:
    """The standard layout: ``dev/<subject>_dev.csv`` and ``test/<subject>_test.csv``."""
    out = []
    for split in ("dev", "test"):
        folder = root / split
        files = sorted((f for f in folder.iterdir() if f.name.endswith(f"_{split}.csv")),
                       key=lambda f: f.name) if folder.is_dir() else []
        out.append({f.name[:-len(f"_{split}.csv")]: _csv_rows(f) for f in files})
    if not out[1]:
        raise QpeftError(f"{root} has no test/<subject>_test.csv; pass the MMLU 'data' folder "
                         "(holding dev/ and test/) or a .jsonl file")
    return out[0], out[1]


def _csv_rows(file) -> list[Question]:
    subject = file.name.rsplit("_", 1)[0]
    rows = []
    for number, row in enumerate(csv.reader(io.StringIO(file.read_text(encoding="utf-8"))), 1):
        if not row:
            continue
        if len(row) != 6 or row[5].strip().upper() not in LETTERS:
            raise QpeftError(f"{file.name}:{number}: expected question,A,B,C,D,answer (a letter "
                             f"A-D); got {len(row)} column(s)")
        rows.append(Question(subject, row[0], row[1:5], LETTERS.index(row[5].strip().upper())))
    return rows


def read_jsonl(path: Path) -> tuple[dict, dict]:
    """Records ``{question, choices | A..D, answer, subject, split}``; ``split: dev`` = shots."""
    dev, test = defaultdict(list), defaultdict(list)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
                q = _json_question(record)
            except (ValueError, TypeError, KeyError) as exc:
                raise QpeftError(f"{path.name}:{number}: {exc}; expected {{\"question\", \"choices\""
                                 ": [4 texts], \"answer\": \"B\" or 1, \"subject\"}") from None
            (dev if record.get("split") == "dev" else test)[q.subject].append(q)
    if not test:
        raise QpeftError(f"{path.name} has no test questions; add records without \"split\": \"dev\"")
    return dict(dev), dict(test)


def _json_question(record: dict) -> Question:
    choices = record["choices"] if "choices" in record else [record[k] for k in LETTERS]
    if not isinstance(choices, list) or len(choices) != 4:
        raise ValueError("'choices' must be a list of 4 texts")
    answer = record["answer"]
    if isinstance(answer, str) and answer.strip().upper() in LETTERS:
        answer = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)
    if not isinstance(answer, int) or not 0 <= answer < 4:
        raise ValueError(f"'answer' must be A-D or 0-3, got {record['answer']!r}")
    return Question(str(record.get("subject") or "all"), str(record["question"]),
                    [str(c) for c in choices], answer)


# -- prompts -----------------------------------------------------------------------------
def format_subject(subject: str) -> str:
    """``high_school_physics`` → ``high school physics`` (as the harness writes it)."""
    return " ".join(subject.split("_"))


def format_question(q: Question, with_answer: bool) -> str:
    """``question\\nA. …\\nB. …\\nC. …\\nD. …\\nAnswer:`` (+ `` X\\n\\n`` for a shot)."""
    text = q.question.strip() + "".join(f"\n{l}. {c}" for l, c in zip(LETTERS, q.choices)) + "\nAnswer:"
    return text + (f" {LETTERS[q.answer]}\n\n" if with_answer else "")


def build_prompt(q: Question, shots: list) -> str:
    """The full k-shot prompt for one test question, ending in ``Answer:``."""
    return (HEADER.format(subject=format_subject(q.subject))
            + "".join(format_question(s, True) for s in shots) + format_question(q, False))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list, list]:
    """Context and continuation ids as the harness splits them (``HFLM._encode_pair``):
    the whole string is tokenized once and the continuation is what follows the context."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[:len(ctx)], whole[len(ctx):]


@dataclasses.dataclass
class MMLUOptions:
    path: str = option("", "MMLU folder (dev/, test/ CSVs) or JSONL file; empty: the bundled sample")
    shots: int = option(5, "dev questions shown before each test question (the harness uses 5)")
    limit: int = option(0, "at most N test questions per subject; 0 for all")
    batch_size: int = option(8, "prompts per forward pass")
    max_length: int = option(0, "prompt tokens kept (cut from the left); 0: the model's context, at most 2048")
    share_prefix: bool = option(True, "compute the shots a subject's prompts share once (same scores up to float "
                                      "rounding); false: every prompt in full, as lm-evaluation-harness")

    def __post_init__(self):
        if self.shots < 0 or self.limit < 0 or self.batch_size < 1 or self.max_length < 0:
            raise ValueError("shots, limit and max_length must be ≥ 0 and batch_size ≥ 1 (e.g. mmlu:shots=5)")


class MMLU(Evaluator):
    name = "mmlu"
    reproducible = True   # a function of the weights, the data and its options: its baseline is computed once
    description = "MMLU-style k-shot multiple choice by log-likelihood of ' A'..' D' (lm-evaluation-harness scoring)"
    Options = MMLUOptions
    higher_is_better = {"accuracy": True}
    primary_metric = "accuracy"

    def questions(self) -> list[tuple[Question, list]]:
        """``(question, shots)`` pairs to score, subjects in name order."""
        dev, test = load_questions(self.options.path)
        k, out = self.options.shots, []
        for subject, items in sorted(test.items()):
            shots = dev.get(subject, [])[:k]
            if len(shots) < k:
                raise QpeftError(f"subject '{subject}' has {len(shots)} dev question(s) for {k} shots; "
                                 f"add dev questions or pass mmlu:shots={len(shots)}")
            out += [(q, shots) for q in items[:self.options.limit or None]]
        return out

    def evaluate(self, ctx):
        cases = self.questions()
        pairs = [encode_pair(ctx.tokenizer, build_prompt(q, shots), f" {letter}")
                 for q, shots in cases for letter in LETTERS]
        limit = self.options.max_length or min(getattr(ctx.model.config, "max_position_embeddings", 2048), 2048)
        scores = continuation_logprobs(ctx.model, pairs, self.options.batch_size, ctx.device, limit,
                                        self.options.share_prefix)
        by_subject = defaultdict(lambda: [0, 0])
        for i, (q, _) in enumerate(cases):
            four = scores[4 * i:4 * i + 4]
            by_subject[q.subject][0] += int(four.index(max(four)) == q.answer)
            by_subject[q.subject][1] += 1
        right = sum(r for r, _ in by_subject.values())
        out = {"accuracy": round(right / len(cases), 4), "questions": len(cases), "shots": self.options.shots}
        out.update({f"accuracy/{s}": round(r / n, 4) for s, (r, n) in sorted(by_subject.items())})
        return out


@hookimpl
def register_evaluators(register):
    register(MMLU)
