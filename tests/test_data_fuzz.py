"""Fuzzing the data reader: any file either loads or gives one DataError line at file:line.

Inputs are random bytes, random JSON-ish text, and files of valid records mutated the ways
real files break (truncation, flipped bytes, deep nesting, huge numbers, lone surrogates,
NaN, bad UTF-8, stray line breaks), as JSONL or as one JSON list. Each is read with and
without ``skip_bad_lines``. Derandomized, so CI sees the same inputs every run.
"""
import dataclasses
import json
import re
import warnings

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qpeft.core.dataset import examples as data
from qpeft.core.dataset.examples import DataError, Example

NAME = "fuzz.jsonl"
RECORDS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5", "answer": 5, "task": "add"},
    {"instruction": "Pi?", "output": "3.14", "answer": 3.14},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    {"text": "Plain text, trained on in full."},
    {"instruction": "Say \u00e9t\u00e9 \U0001f600", "output": "ok"},
]
INSERTS = [b"[" * 2000, b"{\"a\":" * 50, b"9" * 5000, b"-" + b"9" * 4301, b"\\ud800", b"\\udfff",
           b"\"\\ud83d\"", b"NaN", b"Infinity", b"-Infinity", b"1e999", b"\xff", b"\xc3", b"\xed\xa0\x80",
           b"\xef\xbb\xbf", b"\n", b"\r", b"\xe2\x80\xa8", b"\x00", b"null", b"[]", b"{}", b",", b"]", b"\""]
VALUES = [b'"\\ud800"', b'"a\\udfffb"', b'"\\ud83d\\ude00"', b"NaN", b"Infinity", b"-Infinity",
          b"1e999", b"9" * 5000, b"[" * 2000 + b"1" + b"]" * 2000, b"[[[1]]]", b"null", b"5", b"true",
          b"{}", b'"\xff"', b'""', b'" "']
TOKENS = [b"{", b"}", b"[", b"]", b",", b":", b" ", b"\n", b"\"instruction\"", b"\"output\"",
          b"\"text\"", b"\"messages\"", b"\"role\"", b"\"content\"", b"\"user\"", b"\"assistant\"",
          b"\"x\"", b"1", b"-0.5e3", b"true", b"null"] + INSERTS
STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')  # a JSON string in a record's bytes
PER_RECORD = re.compile(rf"^{re.escape(NAME)}:(\d+|item (\d+)): ")


def numbers():
    """JSON numbers of any length: integers to twice Python's 4300-digit limit, long fractions."""
    digits = st.one_of(st.integers(1, 4300), st.integers(4301, 9000)).map(lambda n: b"9" * n)
    return st.one_of(digits, digits.map(lambda d: b"-" + d), digits.map(lambda d: d + b".5"),
                     digits.map(lambda d: b"1." + d + b"e" + d[:3]))


NUMBER = re.compile(rb"(?<![\w.\\])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])")  # a number outside strings, mostly


@st.composite
def mutated(draw):
    """One valid record's JSON, mutated a few times."""
    line = json.dumps(draw(st.sampled_from(RECORDS)), ensure_ascii=draw(st.booleans())).encode()
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(line)))
        op = draw(st.sampled_from(["value", "truncate", "flip", "insert", "nest", "delete", "value", "number",
                                   "number"]))
        if op == "number":  # a number, else a string value, replaced by a number of any length
            spots = list(NUMBER.finditer(line)) or [m for m in STRING.finditer(line)
                                                    if not line[m.end():].startswith(b":")]
            spot = draw(st.sampled_from(spots or [None]))
            if spot:
                line = line[:spot.start()] + draw(numbers()) + line[spot.end():]
        elif op == "value":  # one string value (not a key) replaced
            values = [m for m in STRING.finditer(line) if not line[m.end():].startswith(b":")]
            string = draw(st.sampled_from(values or [None]))
            if string:
                line = line[:string.start()] + draw(st.sampled_from(VALUES)) + line[string.end():]
        elif op == "truncate":
            line = line[:at]
        elif op == "flip" and at < len(line):
            line = line[:at] + bytes([line[at] ^ (1 << draw(st.integers(0, 7)))]) + line[at + 1:]
        elif op == "insert":
            line = line[:at] + draw(st.sampled_from(INSERTS)) + line[at:]
        elif op == "nest":
            depth = draw(st.sampled_from([1, 3, 900, 5000]))
            line = b"[" * depth + line + b"]" * draw(st.sampled_from([depth, 0]))
        elif op == "delete":
            line = line[:at] + line[at + draw(st.integers(1, 8)):]
    return line


def files():
    """Whole files: JSONL or a JSON list of (mostly mutated) records, random tokens, random bytes."""
    lines = st.lists(st.one_of(mutated(), st.sampled_from([json.dumps(r).encode() for r in RECORDS])),
                     min_size=1, max_size=6)
    return st.one_of(
        lines.map(b"\n".join),
        lines.map(lambda ls: b"[\n" + b",\n".join(ls) + b"\n]"),
        st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join),
        st.binary(max_size=300),
    )


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / NAME


def read(path, skip: bool):
    """``("ok", examples)`` or ``("error", message)``; anything but a DataError propagates."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return "ok", data.load(path, skip_bad_lines=skip)
        except DataError as exc:
            return "error", str(exc)


def check_error(message: str, content: bytes):
    """One line, naming the file, and the line or item of a per-record failure."""
    assert "\n" not in message and "\r" not in message and NAME in message, message
    if message.startswith(f"{NAME} has no usable examples"):
        return event("no usable examples")
    where = PER_RECORD.match(message)
    assert where, message
    event(re.sub(r"0x\w+|\d+", "N", message[where.end():].split(";")[0]))  # --hypothesis-show-statistics
    if where.group(2) is None:
        assert 1 <= int(where.group(1)) <= content.count(b"\n") + 1, message
    assert message.endswith(("fix it or pass --skip-bad-lines", "one record per line (JSONL)")), message


def check_examples(examples):
    assert examples and all(isinstance(e, Example) for e in examples)
    for e in examples:  # every string can be encoded, i.e. tokenized
        json.dumps(dataclasses.asdict(e), ensure_ascii=False).encode("utf-8")


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(content=files())
def test_any_file_loads_or_gives_one_line_at_file_line(path, content):
    path.write_bytes(content)
    strict, skipping = read(path, skip=False), read(path, skip=True)
    for outcome, value in (strict, skipping):
        if outcome == "ok":
            check_examples(value)
            event("loaded")
        else:
            check_error(value, content)
    if strict[0] == "ok":  # nothing to skip: the same examples
        assert skipping[0] == "ok" and skipping[1] == strict[1]
    if skipping[0] == "error":  # only a broken JSON list or a file of nothing usable remains
        assert strict[0] == "error"
        assert skipping[1].endswith("(JSONL)") or "no usable examples" in skipping[1], skipping[1]


# -- config files: YAML anchors and aliases ------------------------------------------------
KEYS = ["adapter", "quant", "steps", "lr", "data", "evaluators", "train", "template", "seed", "name", "model", "x"]


@st.composite
def yaml_with_aliases(draw):
    """A YAML mapping whose values are scalars, lists and aliases of earlier anchors, up to a
    "billion laughs": each level a list of nine aliases of the one before."""
    lines, anchors = [], []
    for i, key in enumerate(draw(st.permutations(KEYS))[:draw(st.integers(1, len(KEYS)))]):
        kind = draw(st.sampled_from(["scalar", "list", "alias", "laughs"]))
        if kind == "scalar" or not anchors and kind != "list":
            value = draw(st.sampled_from(["lora", "nf4", "100", "3.0e-4", "'" + "9" * 5000 + "'", "[]", "{}"]))
        elif kind == "list":
            value = "[" + ", ".join(draw(st.lists(st.sampled_from(["lol", "1", "x"]), max_size=9))) + "]"
        elif kind == "alias":
            value = "*" + draw(st.sampled_from(anchors))
        else:
            value = "[" + ", ".join(["*" + anchors[-1]] * 9) + "]"
        anchor = f"a{i}"
        anchors.append(anchor)
        lines.append(f"{key}: &{anchor} {value}")
    return "\n".join(lines) + "\n"


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(text=yaml_with_aliases())
def test_a_config_file_with_aliases_is_one_short_line_at_once(tmp_path_factory, text):
    import time

    from qpeft.core.settings import config
    from qpeft.core.base.errors import QpeftError

    path = tmp_path_factory.mktemp("yaml") / "run.yaml"
    path.write_text(text)
    started = time.perf_counter()
    try:
        settings_ = config.read_file(str(path))
        config.build(str(path), {})
    except QpeftError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 1500, message[:1500]
        event(message.split(":")[1][:40] if "alias" in message else "other error")
    else:
        assert "*" not in text, settings_   # every alias is refused
        event("loaded")
    assert time.perf_counter() - started < 5
