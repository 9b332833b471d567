"""Loading training examples: Alpaca, chat and plain-text files, the split, the bundled set.

Formats (detected per file from its first record, or forced with ``fmt``)::

    alpaca  {"instruction": "...", "input": "...", "output": "..."}   JSON list or JSONL
    chat    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
    text    {"text": "..."}

Any record may also carry ``answer`` (the checkable short answer) and ``task`` (a label);
other keys are ignored. Every record becomes one :class:`Example`. Anything wrong with a
file is a one-line :class:`DataError` naming the file and line (``data.jsonl:17: missing
'output'``): bad JSON, bytes that are not UTF-8, numbers too long or nesting too deep for
Python's json, lone surrogates (``"\\ud800"``). With ``skip_bad_lines=True`` such records are
skipped and counted in a single warning; a broken JSON list cannot be skipped.
"""
import codecs
import dataclasses
import json
import math
import random
import re
import reprlib
import sys
import warnings
from pathlib import Path

from qpeft.core.base.errors import QpeftError

FORMATS = ("auto", "alpaca", "chat", "text")
ROLES = ("system", "user", "assistant")
BUNDLED = "bundled"
MAX_BYTES_ENV = "QPEFT_MAX_DATA_BYTES"
_BUNDLED_FILES = {"train": "edge_tasks.train.jsonl", "test": "edge_tasks.test.jsonl"}


class DataError(QpeftError):
    """A data file is missing, malformed or of an unknown format."""


class _BadRecord(Exception):
    """One record is malformed; the message says how (without the file:line prefix)."""


@dataclasses.dataclass
class Example:
    """One training example, whatever format it came from.

    An instruction example has ``messages`` (the prompt turns, ending with a user turn)
    and ``response`` (the assistant's answer, the part trained on by default). A plain-text
    example has only ``text``, trained on in full.
    """

    messages: list = dataclasses.field(default_factory=list)
    response: str = ""
    text: str | None = None
    instruction: str | None = None  # kept from Alpaca records for the Alpaca template
    input: str = ""
    answer: str | None = None       # short checkable answer, for exact-match evaluation
    task: str | None = None
    source: str = ""                # "file:line", for messages

    @property
    def is_text(self) -> bool:
        """True for a plain-text example (no prompt/response structure)."""
        return self.text is not None


def load(path, fmt: str = "auto", skip_bad_lines: bool = False) -> list[Example]:
    """The examples in ``path`` (a JSON list or JSONL file), or the bundled train split.

    ``path`` may be ``"bundled"`` (or None) for the bundled dataset's train split.
    """
    if path in (None, "", BUNDLED):
        return bundled("train")
    if fmt not in FORMATS:
        raise DataError(f"unknown data format '{fmt}'; use one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        if path.exists():    # a FIFO, a device such as /dev/zero, a directory: never read
            raise DataError(f"{_shown(str(path))} is not a regular file ({_kind(path)}); pass a .jsonl or "
                            ".json file, or 'bundled'")
        raise DataError(f"no such data file: {_shown(str(path))}; pass a .jsonl or .json file, "
                        "or 'bundled'")
    size, limit = path.stat().st_size, max_bytes()
    if size > limit:
        raise DataError(f"data file {_shown(str(path))} is {size / 2**30:.1f} GiB, more than qpeft reads into "
                        f"memory ({limit / 2**30:.1f} GiB, a quarter of this machine's memory; set "
                        f"{MAX_BYTES_ENV} to change it); train on a sample or a split of it")
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data file {_shown(str(path))} "
                        f"({exc.strerror or type(exc).__name__}); "
                        "check the path and its permissions") from None
    return parse(content, path.name, fmt, skip_bad_lines)


def max_bytes() -> int:
    """The largest data file read (it is held in memory, with its examples): ``$QPEFT_MAX_DATA_BYTES``,
    else a quarter of the machine's physical memory."""
    import os

    if os.environ.get(MAX_BYTES_ENV, "").isdigit():
        return int(os.environ[MAX_BYTES_ENV])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):   # no sysconf: no limit
        return sys.maxsize


def _kind(path: Path) -> str:
    """What a path that exists but is no regular file is, in a few words."""
    import stat

    mode = path.stat().st_mode
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket or special file")


def parse(content: bytes | str, name: str, fmt: str = "auto",
          skip_bad_lines: bool = False) -> list[Example]:
    """Examples from the contents (bytes, or text) of a file called ``name`` (used in messages)."""
    name = _shown(name)
    if isinstance(content, str):
        content = content.encode("utf-8", "surrogatepass")  # a lone surrogate is a bad line
    examples, bad = [], []
    for where, record in _records(content.removeprefix(codecs.BOM_UTF8), name):
        try:
            if isinstance(record, _BadRecord):
                raise record
            if fmt == "auto":
                fmt = detect(record)
            examples.append(_convert(record, fmt, where))
        except _BadRecord as exc:
            if not skip_bad_lines:
                raise DataError(f"{where}: {exc}; fix it or pass --skip-bad-lines") from None
            bad.append(where.rsplit(":", 1)[-1])
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        warnings.warn(f"{name}: skipped {len(bad)} bad record(s) (lines {shown})", stacklevel=2)
    if not examples:
        raise DataError(f"{name} has no usable examples; add JSON records with 'instruction', "
                        "'messages' or 'text'")
    return examples


def _shown(name: str) -> str:
    """``name`` fit for a one-line message: control characters and surrogates escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


def _records(content: bytes, name: str):
    """``(where, record)`` pairs; a record that fails to decode is a ``_BadRecord``."""
    if content.lstrip(b" \t\n\r").startswith(b"[") and not _jsonl_of_lists(content):
        yield from _list_records(content, name)
        return
    for number, raw in enumerate(content.split(b"\n"), 1):  # not splitlines: "\u2028" is text
        if raw.strip():
            yield f"{name}:{number}", _line_record(raw)


def _jsonl_of_lists(content: bytes) -> bool:
    """Whether a file starting with ``[`` is JSONL (its first line one whole JSON value, more
    lines after it) rather than one JSON list."""
    first, _, rest = content.lstrip(b" \t\n\r").partition(b"\n")
    return bool(rest.strip()) and not isinstance(_line_record(first), _BadRecord)


def _line_record(raw: bytes):
    """The JSON value on one line of a JSONL file, or a ``_BadRecord`` saying why there is none."""
    try:
        return json.loads(raw.decode("utf-8"), parse_int=_int)
    except UnicodeDecodeError as exc:
        return _BadRecord(_not_utf8(raw, exc))
    except (ValueError, RecursionError, _BadRecord) as exc:
        return _unreadable(exc)


def _not_utf8(content: bytes, exc: UnicodeDecodeError) -> str:
    """What is wrong with the byte at which decoding ``content`` as UTF-8 failed."""
    column = exc.start - content.rfind(b"\n", 0, exc.start)
    return (f"byte 0x{content[exc.start]:02x} at column {column} is not valid UTF-8 "
            "(the file must be UTF-8)")


def _unreadable(exc: Exception) -> _BadRecord:
    """Why Python's json could not read a value (``exc`` is what it raised)."""
    if isinstance(exc, _BadRecord):
        return exc
    if isinstance(exc, RecursionError):
        return _BadRecord("invalid JSON (nested too deeply for Python's json)")
    return _BadRecord(f"invalid JSON ({_shown(str(getattr(exc, 'msg', exc)))})")


def _int(digits: str) -> int:
    """A JSON integer; refused when too long for Python (``sys.get_int_max_str_digits``)."""
    limit = sys.get_int_max_str_digits()
    if limit and len(digits.lstrip("-")) > limit:
        raise _BadRecord(f"a number has more than {limit} digits (too long for Python's json)")
    return int(digits)


_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def _list_records(content: bytes, name: str):
    """``(where, record)`` for each item of a JSON list, decoded one by one.

    Records are then checked like JSONL lines. A broken list (syntax, encoding, an item json
    cannot read) is a :class:`DataError` at its line: no later item can be found.
    """
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _list_error(name, content.count(b"\n", 0, exc.start) + 1, _not_utf8(content, exc))
    decoder = json.JSONDecoder(parse_int=_int)
    pos = _SPACE.match(text, _SPACE.match(text).end() + 1).end()  # after the "["
    number = 0
    while not (number == 0 and text.startswith("]", pos)):
        number += 1
        item, pos = _list_item(decoder, text, pos, name, number)
        yield f"{name}:item {number}", item
        pos = _SPACE.match(text, pos).end()
        if text.startswith("]", pos):
            break
        if not text.startswith(",", pos):
            raise _list_error(name, _line(text, pos), "invalid JSON (Expecting ',' delimiter)")
        pos = _SPACE.match(text, pos + 1).end()
    end = _SPACE.match(text, pos + 1).end()
    if end != len(text):
        raise _list_error(name, _line(text, end), "invalid JSON (Extra data)")


def _list_item(decoder, text: str, pos: int, name: str, number: int):
    """``(item, end)``: item ``number`` of a JSON list, starting at ``text[pos]``."""
    try:
        return decoder.raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        raise _list_error(name, exc.lineno, f"invalid JSON ({exc.msg})") from None
    except (ValueError, RecursionError, _BadRecord) as exc:
        raise _list_error(name, _line(text, pos), f"item {number}: {_unreadable(exc)}") from None


def _line(text: str, pos: int) -> int:
    """The 1-based line number of ``text[pos]``."""
    return text.count("\n", 0, pos) + 1


def _list_error(name: str, line: int, what: str) -> DataError:
    """A broken JSON list, at ``name:line``."""
    return DataError(f"{name}:{line}: {what}; a broken JSON list cannot be skipped: fix it "
                     "or write one record per line (JSONL)")


def detect(record) -> str:
    """The format of one record: "chat", "alpaca" or "text"."""
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
    for key, fmt in (("messages", "chat"), ("instruction", "alpaca"), ("text", "text")):
        if key in record:
            return fmt
    raise _BadRecord("cannot tell the format: expected 'instruction', 'messages' or 'text'")


def _convert(record, fmt: str, where: str) -> Example:
    """One record of a known format as an :class:`Example`."""
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
    extra = {"answer": _optional(record, "answer", number_ok=True),
             "task": _optional(record, "task"), "source": where}
    if fmt == "text":
        return Example(text=_required(record, "text"), **extra)
    if fmt == "alpaca":
        instruction = _required(record, "instruction")
        inp = _optional(record, "input") or ""
        user = f"{instruction}\n\n{inp}" if inp else instruction
        return Example(messages=[{"role": "user", "content": user}],
                       response=_required(record, "output"),
                       instruction=instruction, input=inp, **extra)
    messages = _messages(record)
    return Example(messages=messages[:-1], response=messages[-1]["content"], **extra)


def _messages(record) -> list[dict]:
    """The validated ``messages`` list of a chat record; it must end with an assistant turn."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRecord("'messages' must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise _BadRecord(f"messages[{i}] must be an object with a text 'content'")
        if m.get("role") not in ROLES:
            raise _BadRecord(f"messages[{i}] has unknown role {reprlib.repr(m.get('role'))}; "
                             f"use one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": _valid(m["content"], f"messages[{i}]")})
    if out[-1]["role"] != "assistant":
        raise _BadRecord("the last message must have role 'assistant' (the response to learn)")
    if not any(m["role"] == "user" for m in out):
        raise _BadRecord("'messages' needs a 'user' message before the assistant's")
    return out


def _required(record: dict, key: str) -> str:
    """The non-empty text at ``record[key]``."""
    if key not in record:
        raise _BadRecord(f"missing '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise _BadRecord(f"'{key}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise _BadRecord(f"'{key}' is empty")
    return _valid(value, f"'{key}'")


def _optional(record: dict, key: str, number_ok: bool = False) -> str | None:
    """The text at ``record[key]``, or None; numbers become text when ``number_ok``."""
    value = record.get(key)
    if value is None or isinstance(value, str):
        return None if value is None else _valid(value, f"'{key}'")
    if not number_ok or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _BadRecord(f"'{key}' must be text, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):   # an int of any length is finite
        raise _BadRecord(f"'{key}' must be text or a finite number, got {value}")
    return str(value)


def _valid(text: str, what: str) -> str:
    """``text``, unless it holds a lone surrogate (from a broken ``\\u`` escape: unencodable)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _BadRecord(f"{what} contains an invalid character (lone surrogate "
                         f"\\u{ord(text[exc.start]):04x})") from None
    return text


def split(examples: list, val_fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """A seeded ``(train, validation)`` split; each part keeps the original order.

    The default 80/20 follows the thesis. The same examples and seed give the same split.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}; e.g. 0.2")
    n_val = max(1, round(len(examples) * val_fraction))
    if n_val >= len(examples):
        raise DataError(f"{len(examples)} example(s) are too few to split; add more or "
                        "pass a validation file")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return ([e for i, e in enumerate(examples) if i not in val],
            [e for i, e in enumerate(examples) if i in val])


def load_splits(path=None, validation=None, fmt: str = "auto", val_fraction: float = 0.2,
                seed: int = 0, skip_bad_lines: bool = False) -> tuple[list, list]:
    """``(train, validation)`` examples: from an explicit validation file, else a seeded split."""
    examples = load(path, fmt, skip_bad_lines)
    if validation is None:
        return split(examples, val_fraction, seed)
    return examples, load(validation, fmt, skip_bad_lines)


def bundled(split_name: str = "train") -> list[Example]:
    """The bundled edge-task dataset's ``"train"`` or ``"test"`` split (see docs/data.md)."""
    from importlib import resources

    if split_name not in _BUNDLED_FILES:
        raise DataError(f"the bundled dataset has no split '{split_name}'; use 'train' or 'test'")
    name = _BUNDLED_FILES[split_name]
    content = resources.files("qpeft.core").joinpath("resources", name).read_bytes()
    return parse(content, name, "alpaca")


def data_facts(train: list):
    """The :class:`~qpeft.core.plugin.base.DataFacts` of training examples (given to ``on_data``)."""
    from collections import Counter

    from qpeft.core.plugin.base import DataFacts

    counts = Counter(e.task for e in train if e.task is not None)
    return DataFacts(tasks=tuple(sorted(counts)), task_examples=dict(sorted(counts.items())),
                     examples=len(train), untasked=sum(1 for e in train if e.task is None))


def exact_match(generated: str, answer: str) -> bool:
    """True when the first line of ``generated`` is ``answer`` (case, spaces, final '.' ignored)."""
    lines = generated.strip().splitlines()

    def norm(s):
        return s.strip().rstrip(".").strip().lower()
    return bool(lines) and norm(lines[0]) == norm(answer)
