"""Every registered adapter × every registered quantizer, and every quantizer's layer
contract, through the conformance kit (qpeft.testing). Generated from the registry: a new
built-in is covered without editing this file."""
import re

import pytest

from qpeft.core.kit import conformance
from qpeft.core.plugin import registry

BUILTINS = registry.Registry(entry_points=[])  # an installed third party runs the kit itself
ADAPTERS, QUANTS = BUILTINS.names("adapter"), BUILTINS.names("quantizer")
# The only pairs a built-in refuses, with the one line it refuses them with.
REFUSED = {("loftq", "none"): r"refused: loftq has nothing to correct.*lossy quantizer"}
# Options a cell runs with: the kit calibrates on random tokens, whose layer inputs have no
# dominant directions, so EVA would spend its 25 passes without settling (as PEFT would, forever).
OPTIONS = {"eva": {"max_passes": 2}}


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapter_trains_reloads_exactly_and_merges_over_quantizer(adapter, quant):
    outcome = conformance.check_adapter(BUILTINS.get("adapter", adapter), BUILTINS, options=OPTIONS.get(adapter),
                                        quantizers=[quant])
    expected = REFUSED.get((adapter, quant))
    if expected:
        assert re.match(expected, outcome[quant]), outcome
    else:
        assert outcome == {quant: "ok"}


@pytest.mark.parametrize("quant", QUANTS)
def test_quantizer_layer_contract(quant):
    assert conformance.check_quantizer(BUILTINS.get("quantizer", quant), BUILTINS, methods=[]) == {}


def test_the_matrix_covers_int8_every_method_and_every_modifier():
    roles = {name: BUILTINS.get("adapter", name).role for name in ADAPTERS}
    assert {"none", "nf4", "hqq", "int8"} <= set(QUANTS)
    assert {n for n, r in roles.items() if r == "method"} >= {"lora", "dora", "ia3", "qdylora"}
    assert {n for n, r in roles.items() if r == "modifier"} >= {"rslora", "loftq", "olora"}


def test_check_quantizer_runs_under_every_method_and_modifiers_under_the_most_general_host(monkeypatch):
    cells = []
    monkeypatch.setattr(conformance, "cell", lambda q, compose: cells.append((q.name, compose().spec)) or "ok")
    out = conformance.check_quantizer(BUILTINS.get("quantizer", "none"), BUILTINS)
    methods = [n for n in ADAPTERS if BUILTINS.get("adapter", n).role == "method"]
    assert out == {m: "ok" for m in methods}
    assert cells == [("none", m) for m in methods]
    cells.clear()
    conformance.check_adapter(BUILTINS.get("adapter", "loftq"), BUILTINS)
    assert cells == [(q, "lora+loftq") for q in QUANTS]  # not dora+loftq: dora subclasses lora
