"""Options dataclasses: defaults, parsing from strings, refusals with the user's message."""
import dataclasses
from typing import Literal

import pytest

from qpeft.core.base import options as opts
from qpeft.core.base import spec
from qpeft.core.base.errors import OptionsError


@dataclasses.dataclass
class Demo:
    r: int = opts.option(16, "rank")
    alpha: float = opts.option(32.0, "scale numerator")
    on: bool = opts.option(True, "switch")
    mode: Literal["a", "b"] = opts.option("a", "mode")
    targets: tuple[str, ...] = opts.option(("q", "v"), "layers")


def test_strings_are_parsed_to_field_types():
    o = opts.build(Demo, {"r": "8", "alpha": "1e1", "on": "false", "mode": "b", "targets": "q,k,v"}, "x")
    assert (o.r, o.alpha, o.on, o.mode, o.targets) == (8, 10.0, False, "b", ("q", "k", "v"))


def test_unknown_key_is_refused_with_the_closest_name():
    with pytest.raises(OptionsError) as err:
        opts.build(Demo, {"rr": 4}, "adapter 'lora'")
    assert str(err.value) == ("adapter 'lora' has no option 'rr'; did you mean 'r'? "
                              "Available: alpha, mode, on, r, targets")


def test_wrong_type_is_refused():
    with pytest.raises(OptionsError, match="adapter 'lora' option 'r' expects int, got 'sixteen'"):
        opts.build(Demo, {"r": "sixteen"}, "adapter 'lora'")
    with pytest.raises(OptionsError, match="option 'on' expects true or false"):
        opts.build(Demo, {"on": "maybe"}, "x")
    with pytest.raises(OptionsError, match="must be one of a, b; got 'c'"):
        opts.build(Demo, {"mode": "c"}, "x")
    with pytest.raises(OptionsError, match="expects int, got 2.5"):
        opts.build(Demo, {"r": 2.5}, "x")


def test_describe_lists_defaults_and_help():
    rows = {row["name"]: row for row in opts.describe(Demo)}
    assert rows["r"] == {"name": "r", "type": "int", "default": 16, "help": "rank"}
    assert rows["mode"]["type"] == "a|b"


def test_plugin_options_range_check_becomes_one_line():
    from qpeft.plugins.quantizers.none import NoQuantization

    with pytest.raises(OptionsError, match="quantizer 'none' option 'compute_dtype' must be one of"):
        NoQuantization.from_values({"compute_dtype": "int3"})


def test_spec_grammar():
    assert spec.parse("lora:r=8+loftq:iters=2") == [("lora", {"r": "8"}), ("loftq", {"iters": "2"})]
    assert spec.split_list("none; nf4;hqq:nbits=2") == ["none", "nf4", "hqq:nbits=2"]
    assert spec.format_spec(spec.parse("hqq:nbits=2:group_size=32")) == "hqq:nbits=2:group_size=32"
    with pytest.raises(OptionsError, match="expected key=value, got 'r'"):
        spec.parse("lora:r")
    with pytest.raises(OptionsError, match="empty component"):
        spec.parse("lora++rslora")


def test_a_repeated_option_key_is_refused():
    from qpeft.core.base.spec import parse

    with pytest.raises(OptionsError, match="'lora': option 'r' is given twice; keep one"):
        parse("lora:r=4:r=8")
