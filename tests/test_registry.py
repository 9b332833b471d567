"""Plugin discovery: built-ins, a fake third-party distribution, a broken one, strict mode."""
import textwrap

import pytest

from qpeft.core.plugin import registry
from qpeft.core.base.errors import PluginLoadError, UnknownPluginError

GOOD = '''
from qpeft import hookimpl
from qpeft.core.kinds.evaluator import Evaluator

class Echo(Evaluator):
    name = "echo"
    description = "Says one"
    def evaluate(self, ctx):
        return {"one": 1}

@hookimpl
def register_evaluators(register):
    register(Echo)
'''


def make_distribution(root, dist, version, module, source, ep_name):
    """A real installed-looking distribution: a module plus a .dist-info with an entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[qpeft]\n{ep_name} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("QPEFT_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("QPEFT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    yield tmp_path
    registry._default = None  # the next user rediscovers, without this test's fakes


def test_builtins_are_found_with_qpeft_origin():
    reg = registry.Registry(entry_points=[])
    assert "none" in reg.names("quantizer")
    cls = reg.get("quantizer", "none")
    assert cls.origin.distribution == "qpeft"
    assert reg.names("quantizer") == sorted(reg.names("quantizer"))


def test_third_party_distribution_is_found_with_its_origin(site):
    make_distribution(site, "qpeft-plugin-echo", "1.2.3", "qpeft_echo", GOOD, "echo")
    reg = registry.Registry()
    cls = reg.get("evaluator", "echo")
    assert (cls.origin.distribution, cls.origin.version) == ("qpeft-plugin-echo", "1.2.3")
    assert cls().evaluate(None) == {"one": 1}


def test_broken_plugin_is_reported_and_others_keep_working(site, capsys):
    make_distribution(site, "qpeft-plugin-echo", "1.0", "qpeft_echo", GOOD, "echo")
    make_distribution(site, "qpeft-plugin-bad", "0.1", "qpeft_bad", "import no_such_module_xyz\n", "bad")
    reg = registry.Registry()
    assert "echo" in reg.names("evaluator")
    assert "none" in reg.names("quantizer")
    [failure] = reg.failures
    assert failure.name == "bad" and failure.origin.distribution == "qpeft-plugin-bad"
    assert "No module named 'no_such_module_xyz'" in failure.error
    assert "plugin 'bad' from qpeft-plugin-bad 0.1 failed to load" in capsys.readouterr().err
    with pytest.raises(PluginLoadError, match="no_such_module_xyz.*pip install --force-reinstall qpeft-plugin-bad"):
        reg.get("adapter", "bad")


def test_strict_mode_makes_a_broken_plugin_fatal(site, monkeypatch):
    make_distribution(site, "qpeft-plugin-bad", "0.1", "qpeft_bad", "raise RuntimeError('boom')\n", "bad")
    monkeypatch.setenv("QPEFT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="RuntimeError: boom"):
        registry.Registry()


MISSPELLED = GOOD.replace("def register_evaluators", "def register_evaluator")


def test_a_misspelled_hook_is_reported_by_name_and_fatal_when_strict(site, monkeypatch, capsys):
    make_distribution(site, "qpeft-plugin-echo", "1.0", "qpeft_echo_typo", MISSPELLED, "echo")
    reg = registry.Registry()
    [failure] = reg.failures
    assert failure.name == "echo" and failure.origin.distribution == "qpeft-plugin-echo"
    assert failure.error == ("QpeftError: it implements 'register_evaluator', which is not a qpeft hook; "
                             "did you mean 'register_evaluators'?")
    assert "plugin 'echo' from qpeft-plugin-echo 1.0 failed to load" in capsys.readouterr().err
    monkeypatch.setenv("QPEFT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="register_evaluator'.*QPEFT_STRICT_PLUGINS=1"):
        registry.Registry()


def test_disable_autoload_loads_builtins_only(site, monkeypatch):
    make_distribution(site, "qpeft-plugin-echo", "1.0", "qpeft_echo", GOOD, "echo")
    monkeypatch.setenv("QPEFT_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = registry.Registry()
    assert "echo" not in reg.names("evaluator")
    assert "none" in reg.names("quantizer")


def test_unknown_name_suggests_the_closest():
    reg = registry.Registry(entry_points=[])
    with pytest.raises(UnknownPluginError, match=r"unknown quantizer 'nonee'; did you mean 'none'\? Available: .*none"):
        reg.get("quantizer", "nonee")


def test_register_rejects_a_wrong_kind_and_a_duplicate_name():
    from qpeft import hookimpl
    from qpeft.plugins.quantizers.none import NoQuantization

    class Impostor:
        @hookimpl
        def register_adapters(self, register):
            register(NoQuantization)        # a quantizer offered as an adapter

    class Twin:
        @hookimpl
        def register_quantizers(self, register):
            register(type("Other", (NoQuantization,), {}))  # another class named "none"

    reg = registry.Registry(builtins=True, entry_points=[])
    for obj in (Impostor(), Twin()):
        reg.add(obj, registry.Origin("qpeft-plugin-x", "0"))
    reg.plugins = {k: {} for k in registry.KINDS}
    reg.failures.clear()
    reg._collect()
    errors = " | ".join(f.error for f in reg.failures)
    assert "is not a adapter plugin class" in errors or "is not an adapter" in errors
    assert "already provided by" in errors
    assert reg.get("quantizer", "none") is NoQuantization


def test_public_facade():
    import qpeft.registry as public

    assert public.names("quantizer") == registry.names("quantizer")
    assert public.get("quantizer", "none").origin.distribution == "qpeft"
    assert isinstance(public.failures(), list)


def test_a_bare_import_reaches_registry_and_testing_without_torch():
    import subprocess
    import sys

    code = ("import sys, qpeft; assert 'torch' not in sys.modules; "
            "assert callable(qpeft.registry.names) and callable(qpeft.testing.tiny_model_dir); "
            "assert 'torch' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_fix_hint_tells_an_editable_install_to_edit_its_source():
    from qpeft.core.plugin.registry import fix_hint

    assert fix_hint("qpeft-plugin-that-is-not-installed") == (
        "fix or reinstall it: pip install --force-reinstall qpeft-plugin-that-is-not-installed")
    hint = fix_hint("qpeft")               # this checkout is installed with pip install -e
    assert hint.startswith("fix its source in /") and hint.endswith("reinstalling changes nothing)")
