"""The spec grammar: ';' (or a repeated flag, or a YAML list) separates specs, ',' separates
the items of a list-valued option, and every spec example in the docs parses and builds."""
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from qpeft.core.settings import config
from qpeft.core.plugin import registry
from qpeft.core.base import spec
from qpeft.core.cli.main import cli
from qpeft.core.base.errors import OptionsError
from qpeft.core.run.record import PluginRecord, RunRecord

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FLAG = re.compile(r"--(quant|adapter|evaluators|export-quant)(?:=|[ \t]+)(\"[^\"]*\"|'[^']*'|[a-z][^\s`|\\)\]\"']*)")
YAML = re.compile(r"^(quant|adapter|evaluators):[ \t]+(.+?)(?:[ \t]+#.*)?$", re.M)
KIND = {"quant": "quantizer", "export-quant": "quantizer", "adapter": "adapter", "evaluators": "evaluator"}


def test_specs_in_a_list_are_separated_by_semicolons_and_commas_stay_in_values():
    assert spec.split_list("none; nf4;hqq:nbits=2") == ["none", "nf4", "hqq:nbits=2"]
    assert spec.split_list(["nf4", "hqq:nbits=2;none"]) == ["nf4", "hqq:nbits=2", "none"]
    assert spec.split_list("lora:r=4:targets=q_proj,v_proj;dora") == ["lora:r=4:targets=q_proj,v_proj", "dora"]
    assert spec.parse("lora:r=4:targets=q_proj,v_proj+rslora") == [
        ("lora", {"r": "4", "targets": "q_proj,v_proj"}), ("rslora", {})]
    assert spec.join_list(["perplexity", "distinct:n=1,2,3"]) == "perplexity;distinct:n=1,2,3"


@pytest.mark.parametrize("text, fix", [
    ("none,nf4,hqq", "none;nf4;hqq"),
    ("perplexity,distinct:n=1,2,3", "perplexity;distinct:n=1,2,3"),
    ("lora,lora+rslora,dora", "lora;lora+rslora;dora"),
])
def test_a_comma_separated_list_of_specs_is_refused_with_the_form_to_type(text, fix):
    with pytest.raises(OptionsError) as err:
        spec.split_list(text)
    assert str(err.value) == (f"'{text}': a plugin name cannot hold ','; separate specs with ';' "
                              f"(e.g. '{fix}') or repeat the flag")
    assert spec.split_list(fix)      # and the suggested form parses


def test_a_comma_in_a_one_value_option_says_specs_take_semicolons():
    from qpeft.core.kinds.adapter import compose

    with pytest.raises(OptionsError) as err:
        compose("lora:r=4,dora", registry.default())
    assert str(err.value) == ("adapter 'lora' option 'r' expects int, got '4,dora'; ',' separates the "
                              "items of a list option only: separate specs with ';'")


def test_lists_build_the_same_from_flags_and_yaml(tmp_path):
    from qpeft.core.cli.run_cmd import run_command

    file = tmp_path / "c.yaml"
    file.write_text('evaluators: [perplexity, "prompts:max_new_tokens=4"]\nquant: hqq:nbits=2\n')
    assert config.build(str(file), {}).evaluators == "perplexity;prompts:max_new_tokens=4"
    flags = run_command.make_context("run", ["--evaluators", "perplexity", "--evaluators",
                                             "prompts:max_new_tokens=4"]).params
    assert config.build(None, {"evaluators": flags["evaluators"]}).evaluators == "perplexity;prompts:max_new_tokens=4"
    file.write_text("quant: [nf4, hqq]\nevaluators: perplexity,accuracy\n")
    with pytest.raises(OptionsError) as err:
        config.build(str(file), {})
    assert str(err.value) == (
        "--quant takes one spec, got a list; to try several, use 'qpeft compare --quant \"nf4;hqq\"'; "
        "--evaluators: 'perplexity,accuracy': a plugin name cannot hold ','; separate specs with ';' "
        "(e.g. 'perplexity;accuracy') or repeat the flag")


def test_run_refuses_a_comma_list_in_one_line_before_loading_anything():
    result = CliRunner().invoke(cli, ["run", "--evaluators", "perplexity,accuracy"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: --evaluators: 'perplexity,accuracy': a plugin name cannot hold ','; separate specs "
        "with ';' (e.g. 'perplexity;accuracy') or repeat the flag"]


def test_a_run_recorded_with_the_old_comma_lists_still_reads():
    def record(text, names):
        return RunRecord("x", "0", {"evaluators": text, "model": None}, PluginRecord("nf4", {}), "lora",
                         (PluginRecord("lora", {}),), tuple(PluginRecord(n, {}) for n in names))

    assert record("perplexity,accuracy", ["perplexity", "accuracy"]).flags("runs/x")["evaluators"] == \
        "perplexity;accuracy"
    assert record("lm-eval:tasks=a,b", ["lm-eval"]).flags("runs/x")["evaluators"] == "lm-eval:tasks=a,b"


def documented_specs() -> list[tuple[str, str, str, bool]]:
    """``(file, kind, spec, shown_failing)`` of every spec after a spec flag or YAML key in
    README/docs; ``shown_failing``: the next line shows the error it gives."""
    import yaml

    out = []
    for path in DOCS:
        text = path.read_text()
        found = [*FLAG.finditer(text), *YAML.finditer(text)]
        for m in found:
            key, value = m.group(1), m.group(2).strip("'\"")
            following = text[text.find("\n", m.end()) + 1:].lstrip(" ")
            failing = following.startswith("Error: ")
            if value.startswith("["):           # a YAML flow list of specs
                value = yaml.safe_load(value)
            out += [(path.name, KIND[key], s, failing) for s in spec.split_list(value)]
    return out


def test_every_documented_spec_round_trips_and_the_installed_ones_build():
    from qpeft.core.kinds.adapter import compose
    from qpeft.core.base.errors import QpeftError
    from qpeft.core.run.pipeline import build_plugin

    examples = documented_specs()
    assert len(examples) > 60
    assert ("evaluators.md", "evaluator", "lm-eval:tasks=qpeft_mc,qpeft_gen", False) in examples
    assert ("adapters.md", "adapter", "ia3+loftq", True) in examples
    reg = registry.default()
    built = failed = 0
    for file, kind, text, failing in examples:
        parts = spec.parse(text)
        assert spec.format_spec(parts) == text.replace(" ", ""), (file, text)
        if not all(name in reg.names(kind) for name, _ in parts):
            continue                            # a third-party plugin of a tutorial
        if "include_path=tasks/" in text or "path=cases.jsonl" in text:
            continue                            # names a file of the reader's
        build = lambda: compose(text, reg) if kind == "adapter" else build_plugin(kind, text, reg)  # noqa: E731
        if failing:
            with pytest.raises(QpeftError):
                build()
            failed += 1
        else:
            build()
            built += 1
    assert built > 40 and failed == 2
