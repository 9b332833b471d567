"""The data layer: formats, errors, split, templates and masking, batching, packing, dataset."""
import importlib.util
import json
import statistics
import types
from pathlib import Path

import pytest
import torch

from qpeft.core.dataset import batching, examples as data, templates
from qpeft.core.dataset.examples import DataError, Example
from qpeft.core.dataset.templates import IGNORE, TemplateError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    from qpeft.core.model.models import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="module")
def maker():
    spec = importlib.util.spec_from_file_location("make_dataset", ROOT / "scripts" / "make_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "answer": "5", "task": "add"}
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."}]}


# -- formats -----------------------------------------------------------------------------
def test_alpaca_jsonl_and_json_list(tmp_path):
    for path in (write(tmp_path, "a.jsonl", [ALPACA, {"instruction": "Say hi", "output": "hi"}]),
                 tmp_path / "a.json"):
        if path.suffix == ".json":
            path.write_text(json.dumps([ALPACA, {"instruction": "Say hi", "output": "hi"}], indent=1))
        first, second = data.load(path)
        assert (first.instruction, first.input, first.response) == ("Add the numbers.", "2 and 3", "5")
        assert first.messages == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}]
        assert (first.answer, first.task, second.input, second.answer) == ("5", "add", "", None)


def test_chat_and_text(tmp_path):
    (chat,) = data.load(write(tmp_path, "c.jsonl", [CHAT]))
    assert [m["role"] for m in chat.messages] == ["system", "user"] and chat.response == "Hello."
    (text,) = data.load(write(tmp_path, "t.jsonl", [{"text": "plain words"}]))
    assert text.is_text and text.text == "plain words" and not chat.is_text


def test_auto_detection_and_forced_format(tmp_path):
    assert data.detect(ALPACA) == "alpaca" and data.detect(CHAT) == "chat"
    assert data.detect({"text": "x"}) == "text"
    path = write(tmp_path, "t.jsonl", [{"text": "x", "instruction": "i", "output": "o"}])
    assert data.load(path)[0].instruction == "i"           # alpaca wins over text
    assert data.load(path, fmt="text")[0].text == "x"
    with pytest.raises(DataError, match=r"c.jsonl:1: missing 'instruction'"):
        data.load(write(tmp_path, "c.jsonl", [CHAT]), fmt="alpaca")
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        data.load(path, fmt="csv")


# -- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ({"instruction": "x"}, r"data.jsonl:2: missing 'output'"),
    ('{"instruction": "x", ', r"data.jsonl:2: invalid JSON"),
    ({"instruction": 3, "output": "y"}, r"data.jsonl:2: 'instruction' must be text, got int"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"data.jsonl:2: messages\[0\] has unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"data.jsonl:2: the last message must have role"),
    ({"messages": [{"role": "user", "content": 5}]}, r"data.jsonl:2: messages\[0\] must be an object with a text"),
    ([1, 2], r"data.jsonl:2: expected a JSON object"),
])
def test_bad_line_refused_with_file_and_line(tmp_path, bad, message):
    good = CHAT if "messages" in str(bad) else ALPACA  # the first line sets the file's format
    path = write(tmp_path, "data.jsonl", [good, bad, good])
    with pytest.raises(DataError, match=message) as info:
        data.load(path)
    assert "\n" not in str(info.value) and "--skip-bad-lines" in str(info.value)


def test_skip_bad_lines_warns_once_with_count(tmp_path):
    lines = [ALPACA, {"instruction": "x"}, "not json", ALPACA, {"output": "y", "instruction": 1}]
    path = write(tmp_path, "data.jsonl", lines)
    with pytest.warns(UserWarning, match=r"skipped 3 bad record\(s\) \(lines 2, 3, 5\)") as record:
        examples = data.load(path, skip_bad_lines=True)
    assert len(examples) == 2 and len(record) == 1


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        data.load(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no usable examples"):
        data.load(write(tmp_path, "empty.jsonl", [""]))


# -- split -------------------------------------------------------------------------------
def test_split_is_seeded_80_20_disjoint_reproducible():
    examples = [Example(messages=[{"role": "user", "content": str(i)}], response=str(i)) for i in range(50)]
    train, val = data.split(examples, seed=3)
    assert (len(train), len(val)) == (40, 10)
    ids = lambda part: {e.response for e in part}  # noqa: E731
    assert not ids(train) & ids(val) and len(ids(train) | ids(val)) == 50
    again_train, again_val = data.split(examples, seed=3)
    assert ids(again_val) == ids(val) and [e.response for e in again_train] == [e.response for e in train]
    assert ids(data.split(examples, seed=4)[1]) != ids(val)
    with pytest.raises(DataError, match="between 0 and 1"):
        data.split(examples, val_fraction=1.5)


def test_explicit_validation_file(tmp_path):
    train, val = data.load_splits(write(tmp_path, "t.jsonl", [ALPACA] * 3), write(tmp_path, "v.jsonl", [CHAT]))
    assert len(train) == 3 and val[0].response == "Hello."


def test_bundled_splits():
    train, test = data.bundled("train"), data.bundled("test")
    assert (len(train), len(test)) == (320, 160)
    assert all(e.answer and e.task and e.response == e.answer for e in train + test)
    assert data.load("bundled")[0].source == train[0].source
    with pytest.raises(DataError, match="use 'train' or 'test'"):
        data.bundled("dev")


def test_exact_match():
    assert data.exact_match(" 9.9.\nbecause", "9.9") and data.exact_match("Yes", "yes")
    assert not data.exact_match("9.11", "9.9") and not data.exact_match("", "9.9")


# -- templates and masking ---------------------------------------------------------------
EX = Example(messages=[{"role": "user", "content": "Which number is larger, 9.11 or 9.9?"}],
             response="9.9", instruction="Which number is larger, 9.11 or 9.9?")


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_response_only_masking_token_by_token(tok, template):
    enc, status = templates.encode(EX, tok, template)
    prompt = templates.prompt_ids(EX, tok, template)
    response = tok("9.9", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert status == "kept" and enc.input_ids == prompt + response
    for i, (token, label) in enumerate(zip(enc.input_ids, enc.labels)):
        assert label == (token if i >= len(prompt) else IGNORE)
    assert enc.input_ids[-1] == tok.eos_token_id == enc.labels[-1]


def test_train_on_prompt_and_plain_text(tok):
    enc, _ = templates.encode(EX, tok, "chat", train_on_prompt=True)
    assert enc.labels == enc.input_ids
    text, _ = templates.encode(Example(text="hello world"), tok)
    assert text.labels == text.input_ids and text.input_ids[-1] == tok.eos_token_id


def test_prompt_rendering(tok):
    chat = templates.render_prompt(EX, tok)  # default: the tokenizer's chat template
    assert chat == tok.apply_chat_template(EX.messages, tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    assert "Be terse." in templates.render_prompt(EX, tok, "chat", system="Be terse.")
    alpaca = templates.render_prompt(EX, tok, "alpaca")
    assert alpaca.endswith("### Instruction:\nWhich number is larger, 9.11 or 9.9?\n\n### Response:\n")
    with_input = Example(messages=[], response="5", instruction="Add.", input="2 and 3")
    assert "### Input:\n2 and 3\n\n### Response:\n" in templates.render_prompt(with_input, tok, "alpaca")


def test_template_choice():
    assert templates.default_template(types.SimpleNamespace(chat_template=None)) == "alpaca"
    with pytest.raises(TemplateError, match="pass template='alpaca'"):
        templates.render_prompt(EX, types.SimpleNamespace(chat_template=None), "chat")
    with pytest.raises(TemplateError, match="unknown template 'vicuna'"):
        templates.render_prompt(EX, types.SimpleNamespace(chat_template="x"), "vicuna")


def test_truncation_keeps_response_and_counts(tok):
    long = Example(messages=[{"role": "user", "content": "word " * 300}], response="9.9")
    huge = Example(messages=[{"role": "user", "content": "hi"}], response="word " * 300)
    with pytest.warns(UserWarning, match="truncated 1 and dropped 1 of 3"):
        items, stats = templates.encode_all([long, huge, EX], tok, "chat", max_length=64)
    assert (stats.kept, stats.truncated, stats.dropped) == (1, 1, 1) and len(items) == 2
    cut = items[0]
    assert len(cut) == 64 and cut.input_ids[-4:] == tok("9.9", add_special_tokens=False)["input_ids"] + [2]
    assert cut.input_ids[:-4] == templates.prompt_ids(long, tok, "chat")[-60:]


# -- batching ----------------------------------------------------------------------------
def fake(n, length, prompt=2):
    ids = list(range(1, length + 1))
    return templates.Encoded(ids, [IGNORE] * prompt + ids[prompt:])


def test_collate_pads_right():
    batch = batching.collate([fake(0, 3), fake(0, 5)], pad_id=0)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (2, 5) for k in ("input_ids", "attention_mask", "labels")}
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][0].tolist() == [IGNORE, IGNORE, 3, IGNORE, IGNORE]
    assert batching.collate([fake(0, 3)], 0, pad_to_multiple_of=8)["input_ids"].shape == (1, 8)


def spread(order, lengths):
    return statistics.mean(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in order)


def test_group_by_length_is_tighter_and_deterministic():
    import random

    lengths = [random.Random(i).randint(5, 300) for i in range(400)]
    grouped = batching.batch_order(lengths, 8, seed=1, epoch=0)
    plain = batching.batch_order(lengths, 8, seed=1, epoch=0, group_by_length=False)
    assert spread(grouped, lengths) < spread(plain, lengths) / 3
    assert sorted(i for b in grouped for i in b) == list(range(400))
    assert grouped == batching.batch_order(lengths, 8, seed=1, epoch=0)
    assert grouped != batching.batch_order(lengths, 8, seed=1, epoch=1)
    assert grouped != batching.batch_order(lengths, 8, seed=2, epoch=0)


def test_resume_gives_the_same_batches():
    items = [fake(i, 3 + i % 17) for i in range(37)]
    full = list(batching.batches(items, 4, pad_id=0, seed=5, epoch=2))
    resumed = list(batching.batches(items, 4, pad_id=0, seed=5, epoch=2, start=6))
    assert len(full) == 10 and all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full[6:], resumed))
    assert batching.num_batches(37, 4) == 10 and batching.num_batches(37, 4, drop_last=True) == 9
    lengths = [len(i) for i in items]
    assert batching.batch_order(lengths, 4, 5, 2, drop_last=True) == [
        b for b in batching.batch_order(lengths, 4, 5, 2) if len(b) == 4]


def test_packing_keeps_supervised_tokens():
    items = [fake(i, 3 + i % 11, prompt=1 + i % 3) for i in range(40)]
    rows = batching.pack(items, max_length=32, seed=0)
    assert len(rows) < len(items) and all(len(r) <= 32 for r in rows)
    assert batching.supervised_tokens(rows) == batching.supervised_tokens(items)
    assert sum(len(r) for r in rows) == sum(len(i) for i in items)
    assert all(r.position_ids.count(0) >= 1 for r in rows)
    batch = batching.collate(rows[:3], pad_id=0)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape


def test_packed_examples_do_not_attend_to_each_other(tok):
    from qpeft.core.kit.testing import tiny_model

    model = tiny_model(tokenizer=tok)
    a, _ = templates.encode(EX, tok, "chat")
    b, _ = templates.encode(Example(messages=[{"role": "user", "content": "Hi there"}], response="yes"), tok)
    batch = batching.collate(batching.pack([a, b], max_length=256), pad_id=tok.pad_token_id)
    row = batch["input_ids"][0].tolist()
    first, second = (a, b) if row[:len(a)] == a.input_ids else (b, a)
    assert row == first.input_ids + second.input_ids
    with torch.no_grad():
        # use_cache=False: with a KV cache transformers does not look for packed sequences.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([x.input_ids])).logits[0] for x in (first, second)]
    assert torch.allclose(packed[:len(first)], alone[0], atol=1e-4)
    assert torch.allclose(packed[len(first):], alone[1], atol=1e-4)


# -- the bundled dataset -----------------------------------------------------------------
def test_dataset_is_reproducible_byte_for_byte(maker):
    train, test = maker.build()
    resources = ROOT / "core" / "resources"
    assert maker.dumps(train) == (resources / "edge_tasks.train.jsonl").read_bytes()
    assert maker.dumps(test) == (resources / "edge_tasks.test.jsonl").read_bytes()
    assert len(maker.dumps(train)) + len(maker.dumps(test)) < 300_000


def test_dataset_train_and_test_use_different_numbers(maker):
    train, test = maker.build()
    keys = lambda part: {(r["task"], tuple(maker.key(r["task"], r["instruction"]))) for r in part}  # noqa: E731
    assert not keys(train) & keys(test)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    operands = lambda part: {n for r in part if r["task"] == "decimal"  # noqa: E731
                             for n in maker.key("decimal", r["instruction"])}
    assert not operands(train) & operands(test) and "9.11" in operands(test)
    assert not any(maker.is_fibonacci_window(r["instruction"]) for r in train if r["task"] == "sequence")


def test_dataset_content(maker):
    train, test = maker.build()
    prompts = {r["instruction"]: r["answer"] for r in test}
    assert prompts["Which number is larger, 9.11 or 9.9?"] == "9.9"
    assert prompts["Continue the Fibonacci sequence: 0, 1, 1, 2, 3, 5, 8,"] == "13"
    for part, sizes in ((train, 0), (test, 1)):
        for task, n in maker.SIZES.items():
            assert sum(r["task"] == task for r in part) == n[sizes]
    yes_no = [r["answer"] for r in train if r["task"] in ("threshold", "alert")]
    assert yes_no.count("yes") == yes_no.count("no")
    assert all(len(r["answer"]) <= 6 and " " not in r["answer"] for r in train + test)
