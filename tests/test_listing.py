"""The kept plugin listing (qpeft.core.plugin.listing): read only under the environment's key."""
import os
import subprocess
import sys

import pytest

from qpeft.core.plugin import listing, registry
from test_registry import GOOD, make_distribution


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache, no registry loaded in this process, the fakes on sys.path."""
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QPEFT_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("QPEFT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_default", None)
    yield tmp_path
    registry._default = None


def test_the_key_follows_installed_plugins_their_files_and_the_autoload_switch(fresh, monkeypatch):
    before = listing.environment_key()
    assert listing.environment_key() == before                      # a function of the environment
    make_distribution(fresh, "qpeft-plugin-echo", "1.0", "qpeft_echo", GOOD, "echo")
    installed = listing.environment_key()
    assert installed != before
    source = fresh / "qpeft_echo.py"
    source.write_text(source.read_text().replace("Says one", "Says one!"))
    assert listing.environment_key() != installed                   # an edited plugin file
    monkeypatch.setenv("QPEFT_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert len({listing.environment_key(), installed, before}) == 3


def test_a_kept_listing_is_read_only_under_its_key(fresh, monkeypatch):
    key = listing.environment_key()
    kept = {kind: [] for kind in registry.KINDS} | {"failures": [], "adapter": [{"name": "kept-only"}]}
    listing.write(key, kept)
    assert listing.every_plugin() == kept and registry._default is None      # nothing was loaded
    monkeypatch.setenv("QPEFT_STRICT_PLUGINS", "1")                            # strict mode loads
    assert "lora" in [r["name"] for r in listing.every_plugin()["adapter"]]
    monkeypatch.delenv("QPEFT_STRICT_PLUGINS")
    assert "lora" in [r["name"] for r in listing.every_plugin()["adapter"]]  # the process's registry


def test_damaged_or_foreign_listings_are_not_read_and_old_ones_go(fresh):
    key = listing.environment_key()
    listing.path(key).parent.mkdir(parents=True)
    listing.path(key).write_text("{not json")
    assert listing.read(key) is None
    listing.path(key).write_text('{"key": "another", "listing": {}}')
    assert listing.read(key) is None
    keys = [f"{i:x}" * 64 for i in range(listing.KEEP + 2)]
    for i, other in enumerate(keys):
        listing.write(other, {"n": i})
        os.utime(listing.path(other), (1000 + i, 1000 + i))      # older than the damaged file
    left = list(listing.path(key).parent.glob("listing-*.json"))
    assert len(left) == listing.KEEP and listing.path(key) in left                 # the newest stay
    assert [listing.read(k) for k in keys] == [None, None, None, {"n": 3}, {"n": 4}, {"n": 5}]


def test_qpeft_list_shows_an_edited_third_party_plugin(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "qpeft-plugin-echo", "1.0", "qpeft_echo", GOOD, "echo")
    env = {**os.environ, "QPEFT_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}

    def evaluators():
        out = subprocess.run([sys.executable, "-m", "qpeft", "list", "evaluator"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-600:]
        return out.stdout

    assert "Says one  [qpeft-plugin-echo 1.0]" in evaluators()
    source = site / "qpeft_echo.py"
    source.write_text(source.read_text().replace("Says one", "Says two"))
    assert "Says two  [qpeft-plugin-echo 1.0]" in evaluators()
    assert len(list((tmp_path / "cache" / "plugins").glob("listing-*.json"))) == 2
