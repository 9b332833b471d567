"""The plugin examples of docs/writing-plugins.md run as written: the fixedscale modifier, the
nexttoken evaluator, the ortholora method (training hooks), the inputpca modifier (calibration),
the tasklora method (task hooks) and the rtn quantizer (from
docs/quantizers.md), each with its documented tests, in a fresh pytest process that sees
only the public surface (the modules are not installed; ``testing.registry_with`` loads them)."""
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).parent.parent / "docs"


def blocks(doc: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / doc).read_text(), re.S)


def block(starts: str, after: str | None = None, doc: str = "writing-plugins.md") -> str:
    """The first python block of ``doc`` that starts with ``starts`` (after the one starting with ``after``)."""
    found = blocks(doc)
    first = next(i for i, b in enumerate(found) if b.startswith(after)) + 1 if after else 0
    return next(b for b in found[first:] if b.startswith(starts))


def test_the_documented_plugins_and_their_tests_pass(tmp_path):
    files = {
        "qpeft_fixedscale.py": block('"""qpeft-plugin-fixedscale'),
        "test_fixedscale.py": block("# tests/test_fixedscale.py") + "\n\n"
        + block("def test_the_conformance_kit_passes", after="# tests/test_fixedscale.py"),
        "qpeft_nexttoken.py": block("# qpeft_nexttoken.py"),
        "test_nexttoken.py": block("from types import SimpleNamespace"),
        "qpeft_rtn.py": block("# qpeft_rtn.py", doc="quantizers.md"),
        "test_rtn.py": block("import qpeft_rtn"),
        "qpeft_ortholora.py": block("# qpeft_ortholora.py"),
        "test_ortholora.py": block("# tests/test_ortholora.py"),
        "qpeft_inputpca.py": block("# qpeft_inputpca.py"),
        "test_inputpca.py": block("# tests/test_inputpca.py"),
        "qpeft_tasklora.py": block("# qpeft_tasklora.py"),
        "test_tasklora.py": block("# tests/test_tasklora.py"),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert re.search(r"\b12 passed\b", run.stdout), run.stdout[-500:]


def test_the_python_example_of_adapters_md_runs_on_the_public_surface(tmp_path):
    """docs/adapters.md, "Using an adapter from Python": public names only; the reloaded
    adapter (qpeft.load_adapter) gives the saved model's logits exactly."""
    code = block("import qpeft", doc="adapters.md")
    check = ('\nimport torch\nx = torch.randint(0, 1000, (1, 8))\n'
             'with torch.no_grad():\n    a, b = model.eval()(x).logits, fresh.eval()(x).logits\n'
             'assert torch.equal(a, b), (a - b).abs().max()\nprint("ok")\n')
    script = code.replace("merged = again.method.merge(fresh)", "") + check
    assert "qpeft.core" not in code and "qpeft.plugins" not in code
    (tmp_path / "example.py").write_text(script)
    run = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_the_python_example_of_data_md_runs(tmp_path, tokenizer):
    """docs/data.md's first block: the bundled data encoded and batched as `qpeft run` does."""
    code = blocks("data.md")[0]
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    shapes = eval(run.stdout.strip().splitlines()[-1])
    assert set(shapes) == {"input_ids", "attention_mask", "labels"}
    assert len(set(shapes.values())) == 1 and shapes["input_ids"][0] == 8 and shapes["input_ids"][1] > 10
