"""The public API: every name of docs/writing-plugins.md's table is an attribute of a
bare ``import qpeft``, which itself imports no torch."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).parent.parent / "docs" / "writing-plugins.md"


def documented_names() -> list[str]:
    table = DOC.read_text().split("<!-- public-api -->")[1].split("<!-- /public-api -->")[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return [name for row in rows for name in re.findall(r"`([A-Za-z_]+)`", row)]


def test_the_table_lists_the_whole_surface():
    import qpeft

    names = documented_names()
    assert len(names) == 51
    assert sorted(names) == sorted(n for n in qpeft.__all__ if n != "__version__")


@pytest.mark.parametrize("name", documented_names())
def test_each_documented_name_resolves(name):
    import qpeft

    assert getattr(qpeft, name) is not None


def test_bare_import_is_torch_free_and_then_resolves():
    code = ("import sys, qpeft; assert 'torch' not in sys.modules, 'torch imported'; "
            "from qpeft import LowRankMethod, peft_format, testing; "
            "assert issubclass(LowRankMethod, qpeft.AdapterMethod); "
            "assert qpeft.registry.get('adapter', 'lora').__mro__[1] is LowRankMethod")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-400:]


def test_all_is_sorted():
    import qpeft

    assert qpeft.__all__ == sorted(qpeft.__all__)


def test_unknown_names_fail_as_attribute_errors():
    import qpeft

    with pytest.raises(AttributeError, match="no attribute 'LoRA'"):
        qpeft.LoRA


def test_a_folder_named_qpeft_in_the_working_directory_is_named_in_one_line(tmp_path):
    """``python -m qpeft`` run beside a checkout (or any folder) named qpeft: Python imports
    that folder as a namespace package; qpeft says so instead of failing every plugin."""
    (tmp_path / "qpeft").mkdir()
    run = subprocess.run([sys.executable, "-m", "qpeft", "list"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip() == (f"Error: the folder {tmp_path / 'qpeft'} hides the installed qpeft package (a "
                                  "folder named qpeft in the current directory or on PYTHONPATH); run from "
                                  "another directory, or rename that folder")
    code = "from qpeft.core.plugin import registry\ntry:\n registry.default()\nexcept Exception as e: print(type(e).__name__, e)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True).stdout
    assert out.startswith(f"PluginLoadError the folder {tmp_path / 'qpeft'} hides the installed qpeft package")
