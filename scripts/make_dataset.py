"""Generate qpeft's bundled edge-task dataset: core/resources/edge_tasks.{train,test}.jsonl.

    python scripts/make_dataset.py            # rewrite both files (byte-identical each run)
    python scripts/make_dataset.py --check    # exit 1 if the committed files differ

Five tasks with short, fixed-form answers, so exact match is meaningful:

* ``decimal``    "Which number is larger, 9.11 or 9.9?" -> "9.9"
* ``sequence``   "Continue the sequence: 2, 4, 6, 8," -> "10" (arithmetic, geometric,
  squares, Fibonacci-like)
* ``threshold``  "Temperature 78.5 °C, alert threshold 75 °C. Alert? Answer yes or no." -> "yes"
* ``conversion`` °C<->°F, km/h<->m/s, kPa<->psi, with the rounding rule stated
* ``alert``      three readings, alert if at least two exceed a threshold -> "yes"/"no"

Test questions use different numbers from train: the decimal task draws whole parts from
disjoint seeded sets (9 is test-only), and for every task each question's *key* (see
:func:`key`) never occurs in the other split. The test split also holds the two prompts of
the IoT paper. All arithmetic is on integers (tenths, hundredths), so output is exact.
"""
import argparse
import json
import random
import re
import sys
from fractions import Fraction
from pathlib import Path

SEED = 20240911
OUT = Path(__file__).resolve().parent.parent / "core" / "resources"
SIZES = {  # task: (train, test)
    "decimal": (64, 32), "sequence": (96, 40), "threshold": (80, 40),
    "conversion": (48, 24), "alert": (32, 24)}
PAPER_PROMPTS = [
    ("sequence", "Continue the Fibonacci sequence: 0, 1, 1, 2, 3, 5, 8,", "13"),
    ("decimal", "Which number is larger, 9.11 or 9.9?", "9.9")]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def key(task: str, instruction: str) -> tuple:
    """The numbers that identify a question; no key is shared by train and test."""
    numbers = _NUMBER.findall(instruction)
    return {"decimal": numbers[:2], "sequence": numbers[:2], "threshold": numbers[:1],
            "conversion": numbers[:1], "alert": numbers[:3]}[task]


def fixed(units: int, places: int) -> str:
    """An integer count of 10**-places as a decimal string: fixed(-45, 1) == "-4.5"."""
    sign, units = ("-" if units < 0 else ""), abs(units)
    if places == 0:
        return f"{sign}{units}"
    whole, frac = divmod(units, 10 ** places)
    return f"{sign}{whole}.{frac:0{places}d}"


def decimal(rng: random.Random, wholes: list) -> tuple:
    """A larger-number question over numbers with whole parts from ``wholes``."""
    w = rng.choice(wholes)
    kind = rng.choice(["trap", "trap", "reverse", "same", "whole"])
    d1 = rng.randint(1, 8)
    a = f"{w}.{d1}{rng.randint(1, 9)}"  # two decimals
    if kind == "trap":      # 9.11 vs 9.9: the shorter one is larger
        b = f"{w}.{rng.randint(d1 + 1, 9)}"
    elif kind == "reverse":  # 9.81 vs 9.5: the longer one is larger
        b = f"{w}.{rng.randint(0, d1 - 1)}" if d1 > 1 else f"{w}.0"
    elif kind == "same":
        b = f"{w}.{rng.randint(1, 9)}{rng.randint(1, 9)}"
    else:
        b = f"{rng.choice([x for x in wholes if x != w])}.{rng.randint(1, 9)}"
    if Fraction(a) == Fraction(b):
        return None
    larger = a if Fraction(a) > Fraction(b) else b
    first, second = (a, b) if rng.random() < 0.5 else (b, a)
    return f"Which number is larger, {first} or {second}?", larger


def sequence(rng: random.Random, kind: str) -> tuple:
    """A continue-the-sequence question of one kind."""
    if kind == "arithmetic":
        start, step = rng.randint(1, 60), rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 10, 11, -2, -3, -5])
        if step < 0:
            start += 40
        terms = [start + step * i for i in range(5)]
    elif kind == "geometric":
        start, ratio = rng.randint(1, 15), rng.choice([2, 3, 4, 5])
        terms = [start * ratio ** i for i in range(5)]
    elif kind == "squares":
        start = rng.randint(1, 45)
        terms = [(start + i) ** 2 for i in range(5)]
    else:
        terms = [rng.randint(1, 15), rng.randint(1, 15)]
        while len(terms) < 7:
            terms.append(terms[-1] + terms[-2])
    shown = ", ".join(map(str, terms[:-1]))
    return f"Continue the sequence: {shown},", str(terms[-1])


QUANTITIES = [  # name, unit, thresholds and largest distance (in units of 10**-places), alert when, places
    ("Temperature", "°C", range(600, 901, 50), 150, "above", 1),
    ("Humidity", "%", range(600, 801, 50), 150, "above", 1),
    ("Pressure", "kPa", range(1000, 3001, 250), 400, "above", 1),
    ("Vibration", "mm/s", range(40, 121, 10), 40, "above", 1),
    ("Battery", "V", range(330, 371, 10), 60, "below", 2)]


def threshold(rng: random.Random, yes: bool) -> tuple:
    """A single-reading alert question whose answer is ``yes`` or not."""
    name, unit, limits, spread, direction, places = rng.choice(QUANTITIES)
    limit = rng.choice(limits)
    value = limit + rng.randint(1, spread) * (1 if yes == (direction == "above") else -1)
    label = "low-battery threshold" if direction == "below" else "alert threshold"
    shown_limit = fixed(limit, places).rstrip("0").rstrip(".")
    return (f"{name} {fixed(value, places)} {unit}, {label} {shown_limit} {unit}. "
            "Alert? Answer yes or no."), "yes" if yes else "no"


def conversion(rng: random.Random, kind: str) -> tuple:
    """A unit conversion with an exact, stated rounding rule and no ties."""
    whole = "Answer with the number only, rounded to the nearest whole number."
    units = {"c2f": ("°C", "°F", Fraction(9, 5), 32, (-40, 120)),
             "f2c": ("°F", "°C", Fraction(5, 9), Fraction(-160, 9), (0, 250)),
             "kmh2ms": ("km/h", "m/s", Fraction(5, 18), 0, (10, 250)),
             "kpa2psi": ("kPa", "psi", Fraction(1000000, 6894757), 0, (50, 900)),
             "psi2kpa": ("psi", "kPa", Fraction(6894757, 1000000), 0, (5, 150))}
    if kind == "ms2kmh":
        value = rng.randint(1, 70)
        return (f"Convert {value} m/s to km/h. Answer with the number only, to one decimal place.",
                fixed(value * 36, 1))
    src, dst, factor, offset, (low, high) = units[kind]
    value = rng.randint(low, high)
    exact = value * factor + offset
    if exact - (exact // 1) == Fraction(1, 2):
        return None  # a tie would make the rounding rule ambiguous
    return f"Convert {value} {src} to {dst}. {whole}", str(int(exact // 1 + (exact % 1 > Fraction(1, 2))))


def alert(rng: random.Random, yes: bool) -> tuple:
    """Three readings; alert if at least two are above the threshold."""
    limit = rng.randint(12, 18) * 50  # 60.0 .. 90.0 °C in tenths
    above = rng.choice([2, 3]) if yes else rng.choice([0, 1])
    flags = [True] * above + [False] * (3 - above)
    rng.shuffle(flags)
    values = [limit + (rng.randint(1, 80) if up else -rng.randint(1, 80)) for up in flags]
    shown = ", ".join(fixed(v, 1) for v in values)
    return (f"Readings: {shown} °C. Raise an alert if at least two readings are above "
            f"{limit // 10} °C. Alert? Answer yes or no.", "yes" if yes else "no")


def question(task: str, rng: random.Random, i: int, split: str, wholes: dict):
    """The ``i``-th question of ``task`` (None when the draw must be redrawn)."""
    if task == "decimal":
        return decimal(rng, wholes[split])
    if task == "sequence":
        return sequence(rng, ["arithmetic", "geometric", "squares", "fibonacci"][i % 4])
    if task == "conversion":
        return conversion(rng, ["c2f", "f2c", "kmh2ms", "ms2kmh", "kpa2psi", "psi2kpa"][i % 6])
    return (threshold if task == "threshold" else alert)(rng, yes=i % 2 == 0)


def is_fibonacci_window(instruction: str) -> bool:
    """True when a sequence question shows part of the Fibonacci sequence itself."""
    fib = [0, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    pairs = set(zip(fib, fib[1:]))
    numbers = [int(n) for n in _NUMBER.findall(instruction)[:2]]
    return tuple(numbers) in pairs


def build(seed: int = SEED) -> tuple[list, list]:
    """``(train, test)`` records; the same seed gives the same records."""
    rng = random.Random(seed)
    pool = [w for w in range(0, 40) if w != 9]
    rng.shuffle(pool)
    wholes = {"test": sorted([9] + pool[:12]), "train": sorted(pool[12:])}
    test = [record(task, q, a) for task, q, a in PAPER_PROMPTS]
    used = {(t, tuple(key(t, r["instruction"]))) for t, r in ((r["task"], r) for r in test)}
    train = []
    for split, out in (("test", test), ("train", train)):
        for task, sizes in SIZES.items():
            target = sizes[0 if split == "train" else 1]
            i = sum(r["task"] == task for r in out)
            while i < target:
                made = question(task, rng, i, split, wholes)
                if made is None or (split == "train" and task == "sequence"
                                    and is_fibonacci_window(made[0])):
                    continue
                k = (task, tuple(key(task, made[0])))
                if k in used:
                    continue
                used.add(k)
                out.append(record(task, *made))
                i += 1
    rng.shuffle(train)
    rest = test[len(PAPER_PROMPTS):]
    rng.shuffle(rest)  # tasks interleaved; the paper's prompts stay first
    return train, test[:len(PAPER_PROMPTS)] + rest


def record(task: str, instruction: str, answer: str) -> dict:
    """One Alpaca-style record with its checkable answer and task label."""
    return {"instruction": instruction, "output": answer, "answer": answer, "task": task}


def dumps(records: list) -> bytes:
    """JSONL bytes (UTF-8, one record a line, keys in a fixed order)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def main(argv=None) -> int:
    """Write (or with --check, compare) the two dataset files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write to")
    args = parser.parse_args(argv)
    train, test = build()
    for name, records in (("edge_tasks.train.jsonl", train), ("edge_tasks.test.jsonl", test)):
        path, data = args.out / name, dumps(records)
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                print(f"{path} is out of date; run: python scripts/make_dataset.py", file=sys.stderr)
                return 1
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote {path} ({len(records)} records, {len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
