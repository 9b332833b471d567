"""The command line through click's CliRunner: listings, JSON, one-line errors with exit 2."""
import json

from click.testing import CliRunner

from qpeft.core.cli.main import cli


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def test_list_shows_every_kind_with_origin_and_options():
    result = invoke("list")
    assert result.exit_code == 0, result.output
    for heading in ("quantizers", "adapters", "evaluators"):
        assert heading in result.output
    assert "none" in result.output and "[qpeft " in result.output
    assert "compute_dtype='auto'" in result.output


def test_list_json_is_machine_readable():
    result = invoke("list", "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    none = next(p for p in data["quantizer"] if p["name"] == "none")
    assert none["origin"] == "qpeft" and none["kind"] == "quantizer"
    assert {"name": "compute_dtype", "type": "auto|bfloat16|float16|float32", "default": "auto",
            "help": "dtype of matmuls and of the layers left unquantized (float32 for adapters that "
                    "need float32 activations, e.g. ia3, dora, adalora); auto: bfloat16 where the hardware computes it "
                    "natively (CUDA; CPUs with AVX-512 BF16 or AMX), else float32"} in none["options"]
    assert data["failures"] == []


def test_unknown_adapter_is_one_line_with_exit_status_2():
    result = invoke("run", "--adapter", "doraa")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Error: unknown adapter 'doraa'; did you mean 'dora'? Available: ")
    assert "Traceback" not in result.output


def test_bad_option_value_and_unknown_flag_are_one_line():
    result = invoke("run", "--quant", "none:compute_dtype=int3")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "must be one of auto, bfloat16, float16, float32; got 'int3'" in result.output
    result = invoke("run", "--adpter", "lora")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "No such option '--adpter'" in result.output and "'--adapter'" in result.output
    assert "(see 'qpeft run --help')" in result.output


def test_debug_shows_the_traceback():
    result = invoke("--debug", "run", "--adapter", "doraa")
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "UnknownPluginError"


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("qpeft, version ")


def test_eval_export_quantize_check_their_options_before_loading():
    cases = [(("eval", "/no/run", "--device", "bogus"), "must be auto, cpu, cuda, cuda:N or mps, got 'bogus'"),
             (("eval", "/no/run", "--limit", "-1"), "'--limit': -1 is not in the range x>=0"),
             (("eval", "/no/run", "--rank", "0"), "'--rank': 0 is not in the range x>=1"),
             (("export", "/tmp", "--out", "x", "--rank", "-2"), "'--rank': -2 is not in the range x>=1"),
             (("quantize", "--device", "cuda:x"), "got 'cuda:x'")]
    for args, expected in cases:
        result = invoke(*args)
        assert result.exit_code == 2, args
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, lines)
