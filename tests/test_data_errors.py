"""Data files json or UTF-8 cannot read: one-line DataErrors at file:line, skippable per record."""
import json
import re
import warnings

import pytest
from click.testing import CliRunner

from qpeft.core.dataset import examples as data
from qpeft.core.cli.main import cli
from qpeft.core.dataset.examples import DataError

GOOD = json.dumps({"instruction": "Add 2 and 3.", "output": "5"}).encode()
CHAT = json.dumps({"messages": [{"role": "user", "content": "Add 2 and 3."},
                                {"role": "assistant", "content": "5"}]}).encode()


def write(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def jsonl(tmp_path, bad: bytes, name="data.jsonl"):
    """A file whose lines 1, 3 and 5 are good (chat if ``bad`` is) and lines 2 and 4 are ``bad``."""
    good = CHAT if b"messages" in bad else GOOD
    return write(tmp_path, name, b"\n".join([good, bad, good, bad, good]) + b"\n")


def refused(path, message):
    """The one-line DataError of ``data.load(path)``; it must match ``message`` from the start."""
    with pytest.raises(DataError) as info:
        data.load(path)
    text = str(info.value)
    assert "\n" not in text and re.match(message, text), text
    return text


def skipped(path, lines: str, kept: int):
    """``data.load(path, skip_bad_lines=True)`` warns once about ``lines`` and keeps ``kept``."""
    with pytest.warns(UserWarning, match=rf"skipped \d+ bad record\(s\) \({re.escape(lines)}\)") as record:
        examples = data.load(path, skip_bad_lines=True)
    assert len(record) == 1 and len(examples) == kept
    assert all(e.response == "5" for e in examples)


# -- JSONL: each case is a bad record at its line ----------------------------------------
@pytest.mark.parametrize("bad, message", [
    (b'{"instruction": "caf\xe9", "output": "5"}',
     r"data.jsonl:2: byte 0xe9 at column 21 is not valid UTF-8 \(the file must be UTF-8\)"),
    (b'{"instruction": "x", "output": "5", "id": ' + b"9" * 5000 + b"}",
     r"data.jsonl:2: a number has more than 4300 digits"),
    (b"[" * 100_000, r"data.jsonl:2: invalid JSON \(nested too deeply"),
    (b'{"instruction": "x\\ud800", "output": "5"}',
     r"data.jsonl:2: 'instruction' contains an invalid character \(lone surrogate \\ud800\)"),
    (b'{"messages": [{"role": "user", "content": "\\udfff"}, {"role": "assistant", "content": "5"}]}',
     r"data.jsonl:2: messages\[0\] contains an invalid character \(lone surrogate \\udfff\)"),
    (b'{"instruction": NaN, "output": "5"}', r"data.jsonl:2: 'instruction' must be text, got float"),
    (b'{"instruction": "x", "output": Infinity}', r"data.jsonl:2: 'output' must be text, got float"),
    (b'{"instruction": "x", "output": "5", "answer": -Infinity}',
     r"data.jsonl:2: 'answer' must be text or a finite number, got -inf"),
    (b'{"instruction": "x", "output": "5", "answer": 1e999}',
     r"data.jsonl:2: 'answer' must be text or a finite number, got inf"),
])
def test_unreadable_line_is_a_bad_record(tmp_path, bad, message):
    path = jsonl(tmp_path, bad)
    assert refused(path, message).endswith("; fix it or pass --skip-bad-lines")
    skipped(path, "lines 2, 4", kept=3)


def test_line_numbers_count_only_newlines(tmp_path):
    # "\u2028", "\x1c" and a lone "\r" split str.splitlines() but not a JSONL file's lines.
    odd = json.dumps({"instruction": "a\u2028b\x1cc", "output": "5"}, ensure_ascii=False).encode()
    path = write(tmp_path, "data.jsonl", b"\n".join([odd, GOOD + b"\r", b"\xff", GOOD]))
    refused(path, r"data.jsonl:3: byte 0xff at column 1 ")
    skipped(path, "lines 3", kept=3)


def test_utf8_byte_order_mark_is_ignored(tmp_path):
    assert len(data.load(write(tmp_path, "bom.jsonl", b"\xef\xbb\xbf" + GOOD + b"\n" + GOOD))) == 2


def test_parse_takes_bytes_or_text():
    assert data.parse(GOOD, "a.jsonl") == data.parse(GOOD.decode(), "a.jsonl")
    with pytest.raises(DataError, match=r"^t.jsonl:1: byte 0xed at column 2 "):
        data.parse('"\ud800"', "t.jsonl")  # a lone surrogate in text cannot be UTF-8


def test_unknown_role_is_shown_short(tmp_path):
    role = b"[" * 50 + b'"x"' + b"]" * 50
    path = jsonl(tmp_path, b'{"messages": [{"role": ' + role + b', "content": "hi"}]}')
    assert len(refused(path, r"data.jsonl:2: messages\[0\] has unknown role \[\[")) < 200


def test_file_name_with_control_characters_stays_one_line(tmp_path):
    refused(jsonl(tmp_path, b"{", name="a\nb.jsonl"), r"a\\nb.jsonl:2: invalid JSON")


def test_file_that_cannot_be_read(tmp_path, monkeypatch):
    def fail(self):
        raise IsADirectoryError(21, "Is a directory")

    monkeypatch.setattr(type(tmp_path), "read_bytes", fail)
    refused(write(tmp_path, "d.jsonl", GOOD), r"cannot read data file .*d.jsonl \(Is a directory\); check the path")


# -- JSON lists: records skip per item; an item json cannot read breaks the list ---------
LIST_ITEMS = b'[\n  %s,\n  3,\n  {"instruction": "\\ud83d", "output": "5"},\n  %s\n]\n' % (GOOD, GOOD)


def test_json_list_bad_items_are_bad_records(tmp_path):
    path = write(tmp_path, "data.json", LIST_ITEMS)
    refused(path, r"data.json:item 2: expected a JSON object, got int; fix it or pass --skip-bad-lines")
    skipped(path, "lines item 2, item 3", kept=2)


@pytest.mark.parametrize("bad, message", [
    (b"[" * 100_000, r"data.json:3: item 2: invalid JSON \(nested too deeply"),
    (b"1" * 5000, r"data.json:3: item 2: a number has more than 4300 digits"),
    (b'"caf\xc3"', r"data.json:3: byte 0xc3 at column 7 is not valid UTF-8"),
    (b'{"instruction": "x"', r"data.json:4: invalid JSON \(Expecting ',' delimiter\)"),
    (b"", r"data.json:4: invalid JSON \(Expecting value\)"),
    (GOOD + b"]\n]", r"data.json:4: invalid JSON \(Extra data\)"),
    (GOOD + b" " + GOOD + b"]", r"data.json:3: invalid JSON \(Expecting ',' delimiter\)"),
])
def test_broken_json_list_is_refused_at_its_line(tmp_path, bad, message):
    path = write(tmp_path, "data.json", b"[\n" + GOOD + b",\n  " + bad + b"\n")
    for skip in (False, True):
        with pytest.raises(DataError) as info:
            data.load(path, skip_bad_lines=skip)
        assert re.match(message, str(info.value)) and "\n" not in str(info.value)
        assert str(info.value).endswith("a broken JSON list cannot be skipped: fix it or write "
                                        "one record per line (JSONL)")


def test_json_list_whitespace_and_empty(tmp_path):
    assert len(data.load(write(tmp_path, "a.json", b" \r\n[ " + GOOD + b" ,\t" + GOOD + b" ] \n"))) == 2
    with pytest.raises(DataError, match="^e.json has no usable examples"):
        data.load(write(tmp_path, "e.json", b"[ ]"))


def test_all_lines_bad_names_the_file(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="^bad.jsonl has no usable examples"):
            data.load(write(tmp_path, "bad.jsonl", b"\xff\n[[[\n"), skip_bad_lines=True)


# -- the command line --------------------------------------------------------------------
def test_cli_refuses_a_non_utf8_file_in_one_line_before_loading_the_model(tmp_path, tiny_dir, monkeypatch):
    from qpeft.core.model import streaming

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(streaming, "load_quantized", no_model)
    path = jsonl(tmp_path, b'{"instruction": "\xff", "output": "5"}', name="bad.jsonl")
    result = CliRunner().invoke(cli, ["run", "--data", str(path), "--model", str(tiny_dir),
                                      "--output-dir", str(tmp_path / "runs")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0] == ("Error: bad.jsonl:2: byte 0xff at column 18 is not valid UTF-8 (the file "
                        "must be UTF-8); fix it or pass --skip-bad-lines")
    assert not (tmp_path / "runs").exists()


# -- issue 22 ------------------------------------------------------------------------------
@pytest.mark.parametrize("number", [b"9" * 400, b"-" + b"9" * 400, b"1" * 4300])
def test_a_numeric_answer_of_any_length_that_python_reads_is_its_text(tmp_path, number):
    record = b'{"instruction": "Count.", "output": "many", "answer": ' + number + b"}"
    for skip in (False, True):
        (example,) = data.load(write(tmp_path, "long.jsonl", record), skip_bad_lines=skip)
        assert example.answer == number.decode()
    refused(write(tmp_path, "long.json", b"[" + record.replace(number, b"1" * 400 + b".5") + b"]"),
            r"long\.json:item 1: 'answer' must be text or a finite number, got inf")


def test_a_jsonl_file_whose_first_line_is_a_list_is_read_as_jsonl(tmp_path):
    path = write(tmp_path, "lists.jsonl", b"[1, 2]\n" + GOOD + b"\n" + GOOD + b"\n")
    refused(path, r"lists\.jsonl:1: expected a JSON object, got list; fix it or pass --skip-bad-lines$")
    skipped(path, "lines 1", kept=2)
    # one JSON list, on one line or pretty-printed, is still a list
    assert len(data.load(write(tmp_path, "one.json", b"[" + GOOD + b", " + GOOD + b"]\n"))) == 2
    assert len(data.load(write(tmp_path, "two.json", b"[\n" + GOOD + b",\n" + GOOD + b"\n]"))) == 2


def test_a_fifo_a_device_or_a_directory_is_not_called_missing(tmp_path):
    import os

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    refused(fifo, rf"{re.escape(str(fifo))} is not a regular file \(a FIFO \(named pipe\)\); pass a .jsonl")
    refused("/dev/zero", r"/dev/zero is not a regular file \(a device\); pass a .jsonl or .json file")
    refused(tmp_path, rf"{re.escape(str(tmp_path))} is not a regular file \(a directory\)")


def test_a_data_file_larger_than_the_limit_is_refused_by_size_unread(tmp_path, monkeypatch):
    path = write(tmp_path, "big.jsonl", b"\n".join([GOOD] * 40))
    monkeypatch.setenv(data.MAX_BYTES_ENV, "1000")
    monkeypatch.setattr(type(path), "read_bytes", lambda self: pytest.fail("the file was read"))
    refused(path, rf"data file {re.escape(str(path))} is 0.0 GiB, more than qpeft reads into memory "
                  rf"\(0.0 GiB, a quarter of this machine's memory; set QPEFT_MAX_DATA_BYTES to change it\)")
    monkeypatch.undo()
    assert data.max_bytes() > 2**20 and len(data.load(path)) == 40
