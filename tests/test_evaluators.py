"""Evaluators against hand computations on the tiny model; ``qpeft eval`` on a saved tiny run."""
import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from qpeft.core.dataset import templates
from qpeft.core.dataset.examples import Example
from qpeft.core.base.errors import QpeftError
from qpeft.core.kinds.evaluator import EvalContext
from qpeft.plugins.evaluators import mmlu, prompts
from qpeft.plugins.evaluators.perplexity import Perplexity

EXAMPLES = [Example(messages=[{"role": "user", "content": "Name a colour."}], response="Blue."),
            Example(messages=[{"role": "user", "content": "What is 2 + 2?"}], response="4, of course."),
            Example(messages=[{"role": "user", "content": "Say hi."}], response="Hi there, friend!")]


def context(model, tokenizer, **kw):
    encode = partial(templates.encode, tokenizer=tokenizer, max_length=128)
    return EvalContext(model=model, tokenizer=tokenizer, stage="after", encode=lambda e: encode(e)[0],
                       prompt_ids=partial(templates.prompt_ids, tokenizer=tokenizer), **kw)


# -- footprint ---------------------------------------------------------------------------
def test_footprint_copies_every_run_fact_and_measures_its_own_numbers(tiny, tokenizer):
    from qpeft.plugins.evaluators.footprint import Footprint

    tiny.requires_grad_(False)
    tiny.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)      # 64 × 64 trainable
    facts = {"peak_rss_mb": 321.0, "a_fact_added_later": 7, "model_mb": -1.0, "quantized_model_mb": 5.0}
    got = Footprint().evaluate(context(tiny, tokenizer, facts=facts))
    assert got["peak_rss_mb"] == 321.0 and got["a_fact_added_later"] == 7
    assert "quantized_model_mb" not in got          # the same size as model_mb: not repeated
    assert got["trainable_params"] == 4096 and got["adapter_mb"] == round(4096 * 4 / 2**20, 3)
    every = sum(p.numel() for p in {p.data_ptr(): p for p in tiny.parameters()}.values())
    assert got["trainable_pct"] == round(100 * 4096 / (every - 4096), 4)
    assert got["model_mb"] == round((every - 4096) * 4 / 2**20, 2)    # measured, not the fact's -1


# -- perplexity --------------------------------------------------------------------------
def test_perplexity_is_exp_of_the_mean_response_token_loss(tiny, tokenizer):
    total, count = 0.0, 0
    with torch.no_grad():
        for e in EXAMPLES:
            enc = templates.encode(e, tokenizer, max_length=128)[0]
            logits = tiny(torch.tensor([enc.input_ids])).logits[0, :-1]
            labels = torch.tensor(enc.labels[1:])
            keep = labels != -100
            total += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    got = Perplexity(batch_size=2).evaluate(context(tiny, tokenizer, validation=EXAMPLES))
    assert got["eval_tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


# -- mmlu --------------------------------------------------------------------------------
Q1 = mmlu.Question("high_school_physics", "What is 1 + 1?", ["1", "2", "3", "4"], 1)
Q2 = mmlu.Question("high_school_physics", " What is 2 + 2? ", ["3", "4", "5", "6"], 1)


def test_mmlu_prompt_is_the_harness_format_exactly():
    assert mmlu.build_prompt(Q2, [Q1]) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")


def hand_logprob(model, tokenizer, context_text, continuation):
    """log p(continuation | context): one forward pass over the whole text, by hand."""
    ctx = tokenizer(context_text, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context_text + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def test_mmlu_log_likelihoods_match_a_hand_computation(tiny, tokenizer):
    prompt = mmlu.build_prompt(Q2, [Q1])
    conts = [" A", " B", " C", " D", " B because"]          # the last one is several tokens
    pairs = [mmlu.encode_pair(tokenizer, prompt, c) for c in conts]
    assert [len(c) for _, c in pairs][:4] == [1, 1, 1, 1] and len(pairs[4][1]) > 1
    got = mmlu.continuation_logprobs(tiny, pairs, batch_size=2)
    want = [hand_logprob(tiny, tokenizer, prompt, c) for c in conts]
    assert got == pytest.approx(want, abs=1e-4)


def test_mmlu_shared_shots_are_computed_once_with_the_same_log_likelihoods(tiny, tokenizer):
    """Two questions after the same three shots: the shots are run once (one prefix group,
    longer than the shots' header) and every score still equals a full forward pass by hand."""
    from qpeft.plugins.evaluators import _loglik

    q3 = mmlu.Question("high_school_physics", "What is 3 + 3?", ["6", "7", "8", "9"], 0)
    prompts = [mmlu.build_prompt(q, [Q1, Q1, Q1]) for q in (Q2, q3)]
    conts = [" A", " B", " C", " D", " B because"]
    pairs = [mmlu.encode_pair(tokenizer, p, c) for p in prompts for c in conts]
    scored = {tuple((ctx + cont)[:-1]): len(cont) for ctx, cont in pairs}
    groups = _loglik.prefix_groups(scored)
    shared = [prefix for prefix, members in groups if prefix]
    assert len(shared) == 1 and len(shared[0]) > 60 and sum(len(m) for _, m in groups) == len(scored)
    got = mmlu.continuation_logprobs(tiny, pairs, 3, "cpu", 2048, True)
    want = [hand_logprob(tiny, tokenizer, p, c) for p in prompts for c in conts]
    assert got == pytest.approx(want, abs=1e-4)
    assert got == pytest.approx(mmlu.continuation_logprobs(tiny, pairs, 3, "cpu", 2048, False), abs=1e-4)


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_mmlu_picks_the_letter_with_the_highest_log_likelihood(tiny, tokenizer, tmp_path):
    q = {"question": "What is 2 + 2?", "choices": ["3", "4", "5", "6"], "subject": "maths"}
    hand = [hand_logprob(tiny, tokenizer, mmlu.build_prompt(mmlu._json_question({**q, "answer": 0}), []), f" {l}")
            for l in mmlu.LETTERS]
    best = hand.index(max(hand))
    ctx = context(tiny, tokenizer)
    right = write_jsonl(tmp_path / "right.jsonl", [{**q, "answer": best}])
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{**q, "answer": (best + 1) % 4}])
    assert mmlu.MMLU(path=right, shots=0).evaluate(ctx)["accuracy"] == 1.0
    assert mmlu.MMLU(path=wrong, shots=0).evaluate(ctx)["accuracy"] == 0.0


def test_mmlu_scores_with_controlled_log_likelihoods(monkeypatch, tokenizer, tmp_path):
    """A stub scorer that always prefers ' C': accuracy is the share of C answers, per subject too."""
    records = [{"question": f"q{i}", "choices": list("wxyz"), "answer": a, "subject": s}
               for i, (a, s) in enumerate([("C", "s1"), (2, "s1"), ("A", "s2"), ("C", "s2")])]
    records.append({"question": "shot", "A": "w", "B": "x", "C": "y", "D": "z", "answer": "B",
                    "subject": "s1", "split": "dev"})
    path = write_jsonl(tmp_path / "q.jsonl", records)
    c_id = tokenizer(" C", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(mmlu, "continuation_logprobs",
                        lambda model, pairs, *a: [0.0 if cont == c_id else -5.0 for _, cont in pairs])
    ctx = EvalContext(model=type("M", (), {"config": None})(), tokenizer=tokenizer, stage="after")
    out = mmlu.MMLU(path=path, shots=0).evaluate(ctx)
    assert out == {"accuracy": 0.75, "questions": 4, "shots": 0, "accuracy/s1": 1.0, "accuracy/s2": 0.5}
    with pytest.raises(QpeftError, match="subject 's2' has 0 dev question.*mmlu:shots=0"):
        mmlu.MMLU(path=path, shots=1).evaluate(ctx)


def test_mmlu_reads_the_csv_layout_and_the_bundled_sample(tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "dev" / "world_facts_dev.csv").write_text('"Capital of France, the country?",Paris,Rome,Oslo,Bern,A\n')
    (tmp_path / "test" / "world_facts_test.csv").write_text("Largest ocean?,Atlantic,Pacific,Indian,Arctic,B\n")
    dev, test = mmlu.load_questions(str(tmp_path))
    assert dev["world_facts"][0] == mmlu.Question("world_facts", "Capital of France, the country?",
                                                  ["Paris", "Rome", "Oslo", "Bern"], 0)
    assert test["world_facts"][0].answer == 1
    (tmp_path / "test" / "bad_test.csv").write_text("Only,three,columns\n")
    with pytest.raises(QpeftError, match=r"bad_test.csv:1: expected question,A,B,C,D,answer"):
        mmlu.load_questions(str(tmp_path))
    dev, test = mmlu.load_questions("")
    assert sorted(test) == ["basic_arithmetic", "computer_basics", "everyday_science"]
    assert all(len(dev[s]) == 5 and len(test[s]) == 8 for s in test)


def test_mmlu_jsonl_errors_name_the_line(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(QpeftError, match=r"q.jsonl:1: 'choices' must be a list of 4"):
        mmlu.load_questions(path)


# -- prompts -----------------------------------------------------------------------------
def case(expected, match):
    return prompts.Case("t", "p", expected, match)


def test_prompt_matching_rules():
    assert case("Paris", "exact").passes(" paris.\nIt is in France.")
    assert not case("Paris", "exact").passes("It is Paris.")
    assert case("13", "contains").passes("0, 1, 1, 2, 3, 5, 8, 13, 21")
    assert not case("13", "contains").passes("0, 1, 1, 2, 3, 5, 8, 12")
    assert case(r"\b4\b", "regex").passes("It is 4.")


@pytest.mark.parametrize("answer, ok", [
    ("9.9", True), ("9.9 is larger than 9.11.", True), ("The larger number is 9.90.", True),
    ("9.11", False), ("9.11 is larger than 9.9.", False), ("9.91", False), ("Neither", False),
    ("To solve this problem, we need to calculate 9.9 as 9.11.", False), ("9.9.", True),
    ("The bigger one is 9.9", True), ("The greater number is 9.9!", True)])
def test_the_9_11_vs_9_9_case_accepts_only_9_9(answer, ok):
    builtin = {c.name: c for c in prompts.load_cases()}
    assert builtin["9.11-vs-9.9"].passes(answer) is ok
    assert builtin["fibonacci"].passes("13, 21, 34")


def test_prompt_cases_from_a_file_and_their_errors(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "2+2=", "expected": 4, "match": "exact"},
                                              {"name": "cap", "prompt": "Capital?", "expected": "(?i)paris", "match": "regex"}])
    assert [(c.name, c.expected, c.match) for c in prompts.load_cases(path)] == [
        ("case1", "4", "exact"), ("cap", "(?i)paris", "regex")]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "expected": "y", "match": "fuzzy"}])
    with pytest.raises(QpeftError, match="bad.jsonl:1: unknown match 'fuzzy'; use one of exact, contains, regex"):
        prompts.load_cases(bad)


def test_prompts_evaluator_renders_with_the_template_and_reports(monkeypatch, tiny, tokenizer):
    seen = []

    def fake_generate(model, tok, ids, *args):
        seen.extend(ids)
        return ["0, 1, 1, 2, 3, 5, 8, 13", "9.11 is larger\nthan | 9.9"]
    monkeypatch.setattr(prompts, "generate", fake_generate)
    out = prompts.Prompts().evaluate(context(tiny, tokenizer))
    assert list(out)[:3] == ["pass_rate", "passed", "cases"]
    assert out["pass_rate"] == 0.5 and out["pass/fibonacci"] == 1 and out["pass/9.11-vs-9.9"] == 0
    assert out["output/9.11-vs-9.9"] == "9.11 is larger ⏎ than \\| 9.9"
    assert "<|im_start|>user\nContinue the Fibonacci" in tokenizer.decode(seen[0])


# -- qpeft eval --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_qdylora_run(tmp_path_factory):
    from qpeft.core.settings import config
    from qpeft.core.run import pipeline
    from qpeft.core.kit.testing import tiny_model_and_tokenizer

    root = tmp_path_factory.mktemp("evalrun")
    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    cfg = config.build(None, {"model": str(root / "tiny"), "quant": "none:compute_dtype=float32",
                              "adapter": "qdylora:r_max=4", "evaluators": "perplexity", "eval_limit": 4,
                              "steps": 3, "lr": 1e-2, "save_every": 100, "output_dir": str(root),
                              "name": "dy", "progress": False})
    pipeline.run(cfg, say=lambda _: None)
    return root / "dy"


def test_eval_rebuilds_the_run_exactly_and_at_a_lower_rank(saved_qdylora_run):
    from qpeft.core.cli.eval_cmd import evaluate_run

    record, path = evaluate_run(saved_qdylora_run, say=lambda _: None, device="cpu")
    reported = json.loads((saved_qdylora_run / "report.json").read_text())["after"]["perplexity"]
    assert record["results"]["perplexity"] == reported and path.name.startswith("eval-")
    record, path = evaluate_run(saved_qdylora_run, "perplexity;prompts:max_new_tokens=2", rank=1,
                                say=lambda _: None, device="cpu")
    assert path.name == "eval-rank1.json" and json.loads(path.read_text())["rank"] == 1
    assert record["results"]["perplexity"]["perplexity"] != reported["perplexity"]
    assert record["results"]["prompts"]["cases"] == 2
    with pytest.raises(QpeftError, match="the saved adapter has rank 4; pass --rank between 1 and 4"):
        evaluate_run(saved_qdylora_run, "perplexity", rank=5, say=lambda _: None, device="cpu")
