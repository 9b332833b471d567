"""The import rules of docs/architecture.md ("Import rules"), read from the source with
``ast`` (every import statement, module level and inside functions; tests/import_graph.py):

- core/'s rooms import only their own room and lower floors, never the other room on their floor
  (:data:`FLOORS`, the table in docs/architecture.md); nothing imports a deprecated old path;
- no circle among qpeft's modules;
- a module under ``plugins/`` or ``examples/`` imports only the public ``qpeft`` package
  (``qpeft.testing`` in tests), never ``qpeft.core`` nor another built-in plugin; a private
  module of the plugins package (``plugins/quantizers/_bnb.py``) may be shared;
- nothing below the CLI imports ``qpeft.core.cli``.
"""
from pathlib import Path

import pytest

import import_graph

ROOT = import_graph.ROOT
ALLOWED_IN_TESTS = {"qpeft.testing"}


def test_the_walk_sees_every_module_and_imports_inside_functions():
    graph = import_graph.edges()
    assert len(graph) == len(list((ROOT / "core").rglob("*.py")) + list((ROOT / "plugins").rglob("*.py"))
                             + list((ROOT / "qpeft").glob("*.py")))
    assert "qpeft.core.model.models" in graph["qpeft.core.run.pipeline"]          # module level
    assert "qpeft.core.plugin.registry" in graph["qpeft.core.kit.conformance"]     # inside a function only


def test_no_import_cycle():
    circles = import_graph.cycles(import_graph.edges())
    assert not circles, "import cycles: " + "; ".join(" → ".join(c) for c in circles)


def test_a_cycle_is_reported_with_its_modules():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert import_graph.cycles(graph) == [["a", "b", "c", "a"]]


def plugin_violations(module: str, path: Path, is_test: bool = False) -> list[str]:
    """What a plugin-side module imports from qpeft besides the public package."""
    known = set(import_graph.modules())
    out = []
    for name, line in import_graph.imported_names(path, module):
        target = import_graph._target(name, known)
        if target is None or target == module or target == "qpeft":
            continue
        if is_test and target in ALLOWED_IN_TESTS:
            continue
        private = target.startswith("qpeft.plugins.") and target.rpartition(".")[2].startswith("_")
        if not private:
            where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
            out.append(f"{where}:{line} imports {target}")
    return sorted(set(out))


def plugin_side_modules():
    for module, path in import_graph.modules().items():
        if module.startswith("qpeft.plugins"):
            yield module, path, False
    for path in import_graph.example_files():
        yield path.stem, path, "tests" in path.relative_to(import_graph.EXAMPLES).parts


def test_plugins_and_examples_import_only_the_public_package():
    found = [v for module, path, is_test in plugin_side_modules() for v in plugin_violations(module, path, is_test)]
    assert not found, "plugins must import only `qpeft` (add what they need to qpeft/__init__.py): " + "; ".join(found)


def test_the_check_catches_a_core_import_and_a_sibling_plugin(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from qpeft import hookimpl\nfrom qpeft.core.base.errors import QpeftError\n\n"
                   "def f():\n    from qpeft.plugins.quantizers.nf4 import NF4\n"
                   "    from qpeft.plugins.quantizers._bnb import import_bitsandbytes\n")
    assert [v.rsplit(" imports ", 1)[1] for v in plugin_violations("qpeft.plugins.x", bad, False)] == [
        "qpeft.core.base.errors", "qpeft.plugins.quantizers.nf4"]


def test_nothing_below_the_cli_imports_it():
    upward = [f"{module} → {target}" for module, targets in import_graph.edges().items()
              if not module.startswith("qpeft.core.cli") and module != "qpeft.__main__"  # python -m qpeft
              for target in targets if target.startswith("qpeft.core.cli")]
    assert not upward, upward


# -- rooms -----------------------------------------------------------------------------------
# core/'s rooms, lowest floor first (docs/architecture.md, "Rooms"): a module of core/ imports
# only its own room and rooms on lower floors; rooms on one floor do not import each other.
FLOORS = [
    ["base"],
    ["plugin", "settings"],
    ["kinds", "dataset"],
    ["model", "train"],
    ["interop", "kit"],
    ["run"],
    ["compare"],
    ["cli"],
]
FLOOR = {room: floor for floor, rooms in enumerate(FLOORS) for room in rooms}
# Old paths the docs once showed, kept one release as deprecated aliases (CHANGELOG.md).
SHIMS = {"qpeft.core.registry": "qpeft.core.plugin.registry", "qpeft.core.adapter": "qpeft.core.kinds.adapter",
         "qpeft.core.testing": "qpeft.core.kit.testing", "qpeft.core.peft_format": "qpeft.core.kinds.peft_format",
         "qpeft.core.data": "qpeft.core.dataset.examples", "qpeft.core.templates": "qpeft.core.dataset.templates",
         "qpeft.core.batching": "qpeft.core.dataset.batching"}
# Where core/ may reach outside itself: the registry walks the built-ins to register them.
OUTSIDE = {"plugin": {"qpeft.plugins"}}


def room(module: str) -> str | None:
    """The room of a ``qpeft.core`` module (``qpeft.core.kinds.lowrank`` → ``kinds``); None for
    ``qpeft.core`` itself and for modules directly in it (the shims)."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["qpeft", "core"] and parts[2] in FLOOR else None


def room_violations(graph: dict[str, dict[str, int]]) -> list[str]:
    """Every import in ``graph`` (module → {target → line}) from a room of core/ that goes up,
    sideways to another room on its floor, to a shim, or out of core/ where :data:`OUTSIDE`
    does not allow it."""
    out = []
    for module, targets in sorted(graph.items()):
        here = room(module)
        if here is None:
            continue
        for target, line in sorted(targets.items()):
            there = room(target)
            if there == here:
                continue
            if there is None:
                inside_core = target == "qpeft.core" or target.startswith("qpeft.core.")
                allowed = not inside_core and any(target == o or target.startswith(o + ".")
                                                  for o in OUTSIDE.get(here, ()))
                if not allowed:
                    out.append(f"{module}:{line} ({here}) imports {target} (outside the rooms below it)")
            elif FLOOR[there] >= FLOOR[here]:
                way = "on its floor" if FLOOR[there] == FLOOR[here] else "above it"
                out.append(f"{module}:{line} ({here}) imports {target} ({there}, {way})")
    return out


def test_every_module_of_core_is_in_a_declared_room():
    core = import_graph.PACKAGES["qpeft.core"]
    folders = {p.name for p in core.iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(FLOOR), "declare each room of core/ in FLOORS (and docs/architecture.md)"
    loose = {m for m in import_graph.modules() if m.startswith("qpeft.core") and room(m) is None}
    assert loose == {"qpeft.core", *SHIMS}, "a module of core/ belongs in a room"


def test_rooms_import_only_their_own_and_lower_floors():
    found = room_violations(import_graph.edges())
    assert not found, "core/'s rooms import only downward (docs/architecture.md): " + "; ".join(found)


def test_nothing_imports_a_deprecated_path():
    graph = import_graph.edges()
    for shim, new in SHIMS.items():
        assert graph[shim] == {new: graph[shim][new]}, f"{shim} only re-exports {new}"
    users = [f"{m} → {t}" for m, targets in graph.items() for t in targets if t in SHIMS]
    assert not users, users


def test_the_room_check_catches_up_sideways_and_out():
    graph = {"qpeft.core.kinds.quantizer": {"qpeft.core.base.errors": 1, "qpeft.core.kinds.adapter": 2,
                                            "qpeft.core.run.pipeline": 3, "qpeft.core.dataset.templates": 4,
                                            "qpeft.core.registry": 5, "qpeft.plugins.quantizers.nf4": 6},
             "qpeft.core.plugin.registry": {"qpeft.plugins": 7, "qpeft": 8},
             "qpeft.core.cli.main": {"qpeft.core.compare.table": 9}}
    assert [v.split(" imports ")[1].split(" ")[0] for v in room_violations(graph)] == [
        "qpeft.core.dataset.templates", "qpeft.core.registry", "qpeft.core.run.pipeline",
        "qpeft.plugins.quantizers.nf4", "qpeft"]


@pytest.mark.parametrize("old", sorted(SHIMS))
def test_an_old_path_warns_and_is_the_new_module(old):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=SHIMS[old]):
        module = importlib.import_module(old)
    assert module is importlib.import_module(SHIMS[old])


# -- settings without torch ------------------------------------------------------------------
def run_qpeft(tmp_path, *args, block_torch=True, env=None):
    """``python -m qpeft ARGS`` with its own $QPEFT_CACHE, where importing torch raises (and
    leaves a mark) unless ``block_torch`` is False."""
    import os
    import subprocess
    import sys

    blocker = tmp_path / "blocked" / "torch"
    blocker.mkdir(parents=True, exist_ok=True)
    mark = tmp_path / "torch-was-imported"
    mark.unlink(missing_ok=True)
    (blocker / "__init__.py").write_text(f"open({str(mark)!r}, 'a').write('x')\n"
                                         "raise ImportError('torch is blocked in this test')\n")
    path = [str(blocker.parent)] if block_torch else []
    env = {**os.environ, "QPEFT_CACHE": str(tmp_path / "cache"), **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [*path, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "qpeft", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    return out, mark.exists()


def test_version_imports_no_torch(tmp_path):
    from qpeft.core.base.version import __version__

    out, tried = run_qpeft(tmp_path, "--version")
    assert (out.returncode, tried) == (0, False), out.stderr[-600:]
    assert __version__ in out.stdout


@pytest.mark.parametrize("args", [("list",), ("list", "--json"), ("list", "adapter")])
def test_list_imports_no_torch_once_the_listing_is_kept(tmp_path, args):
    """The first listing of an environment loads the plugins (and torch) and keeps what it
    printed; every later one reads it (qpeft.core.plugin.listing)."""
    first, tried = run_qpeft(tmp_path, *args, block_torch=False)
    assert (first.returncode, tried) == (0, False) and "lora" in first.stdout
    out, tried = run_qpeft(tmp_path, *args)
    assert (out.returncode, tried) == (0, False), out.stderr[-600:]
    assert out.stdout == first.stdout and "failed to load" not in out.stdout + out.stderr
    assert ("perplexity" in out.stdout) == (args[-1] != "adapter")


def test_list_without_torch_and_no_listing_names_each_failure(tmp_path):
    out, tried = run_qpeft(tmp_path, "list", "quantizer")
    assert (out.returncode, tried) == (0, True)
    assert "failed to load" in out.stdout and "torch is blocked in this test" in out.stdout
    assert "nf4" in out.stdout        # reported by name
