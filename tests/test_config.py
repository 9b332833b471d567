"""Run settings: config files, flag overrides, every error at once, ranges and damaged
files as one line before the model loads; schedules; optimizer fallback."""
import json

import pytest
import torch

from qpeft.core.settings import config
from qpeft.core.base.errors import OptionsError, QpeftError
from qpeft.core.train.optim import build_optimizer, build_schedule
from qpeft.core.train.trainer import TrainConfig
from qpeft.core.run.record import RunRecord


def test_yaml_file_with_flags_overriding_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("quant: hqq:nbits=2\nadapter: lora+rslora\nbatch-size: 16\ntrain:\n  lr: 1.0e-4\n  steps: 7\n")
    cfg = config.build(str(path), {"steps": 9})
    assert (cfg.quant, cfg.adapter, cfg.train.batch_size, cfg.train.lr, cfg.train.steps) == \
        ("hqq:nbits=2", "lora+rslora", 16, 1e-4, 9)
    assert cfg.run_dir.name == "hqq_nbits2-lora+rslora"


def test_json_file_and_every_bad_key_reported_at_once(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"adaptr": "dora", "lr": "fast", "steps": 3}')
    with pytest.raises(OptionsError) as err:
        config.build(str(path), {})
    message = str(err.value)
    assert "unknown setting 'adaptr'; did you mean 'adapter'?" in message
    assert "--lr expects float, got 'fast'" in message


def test_bad_config_files_are_one_line_errors(tmp_path):
    with pytest.raises(QpeftError, match="no such config file"):
        config.build(str(tmp_path / "missing.yaml"), {})
    broken = tmp_path / "broken.yaml"
    broken.write_text("adapter: [unclosed\n")
    with pytest.raises(QpeftError, match="is not valid YAML"):
        config.build(str(broken), {})
    listed = tmp_path / "list.yaml"
    listed.write_text("- adapter\n")
    with pytest.raises(QpeftError, match="must hold a mapping of settings"):
        config.build(str(listed), {})


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [1 / 3, 2 / 3, 1.0, 0.8535534, 0.5, 0.1464466]),
])
def test_schedules_warm_up_then_follow_their_shape(schedule, expected):
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(lr=1.0, schedule=schedule, warmup_steps=2)
    opt = build_optimizer([param], cfg, torch.device("cpu"))
    sched = build_schedule(opt, cfg, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(expected, abs=1e-6)


def test_paged_optimizer_on_cpu_falls_back_with_a_message(capsys):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([param], TrainConfig(optimizer="paged_adamw_8bit"), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert "needs CUDA; on CPU, using torch AdamW" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_first_step(tokenizer, tmp_path):
    from test_trainer import adapted_tiny, source

    from qpeft.core.train.trainer import Trainer

    results = []
    for flag in (False, True):
        model = adapted_tiny(tokenizer)
        cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, log_every=1, save_every=0, progress=False,
                          gradient_checkpointing=flag)
        results.append(Trainer(model, source(tokenizer, 8), cfg, tmp_path / str(flag)).train().history)
    assert [r["loss"] for r in results[1]] == pytest.approx([r["loss"] for r in results[0]], rel=1e-5)


# -- bad inputs: one line on stderr, exit 2, before any model loads ------------------------
def _refuse(*args, **kwargs):
    raise AssertionError("the model was loaded before the input was checked")


def one_line_error(monkeypatch, *args) -> str:
    """Invoke the CLI with the model loader booby-trapped; the single stderr line."""
    from click.testing import CliRunner

    from qpeft.core.model import streaming
    from qpeft.core.cli.main import cli

    monkeypatch.setattr(streaming, "load_quantized", _refuse)
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, AssertionError), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output and "loading" not in result.output
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--lr", "-1"], "--lr must be > 0, got -1.0; e.g. --lr 3e-4"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--batch-size", "0"], "--batch-size must be ≥ 1, got 0; e.g. --batch-size 8"),
    (["--grad-accum", "0"], "--grad-accum must be ≥ 1, got 0"),
    (["--batch-size", "6", "--grad-accum", "4"], "--batch-size 6 must be divisible by --grad-accum 4"),
    (["--log-every", "0"], "--log-every must be ≥ 1, got 0"),
    (["--eval-every", "-2"], "--eval-every must be ≥ -1, got -2"),
    (["--save-every", "-1"], "--save-every must be ≥ 0, got -1"),
    (["--eval-limit", "-1"], "--eval-limit must be ≥ 0, got -1"),
    (["--steps", "-1"], "--steps must be ≥ 0, got -1"),
    (["--steps", "0", "--epochs", "0"], "--epochs must be > 0 when --steps is 0, got 0.0"),
    (["--epochs", "nan"], "--epochs must be a finite number, got nan"),
    (["--warmup-steps", "-2"], "--warmup-steps must be ≥ 0, got -2"),
    (["--weight-decay", "-0.1"], "--weight-decay must be ≥ 0, got -0.1"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be ≥ 0, got -1.0"),
    (["--max-length", "4"], "--max-length must be ≥ 8, got 4"),
    (["--seed", "-1"], "--seed must be ≥ 0 and ≤ 4294967295, got -1"),
    (["--seed", str(2**32)], "--seed must be ≥ 0 and ≤ 4294967295, got 4294967296"),
    (["--device", "bogus"], "--device must be auto, cpu, cuda, cuda:N or mps, got 'bogus'; e.g. --device cpu"),
])
def test_out_of_range_run_options_are_one_line_before_the_model_loads(monkeypatch, args, expected):
    assert expected in one_line_error(monkeypatch, "run", *args)


def test_every_bad_setting_of_a_file_is_reported_at_once(monkeypatch, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("validation_split: 1.5\ntrain:\n  lr: .nan\n  steps: .inf\n")
    line = one_line_error(monkeypatch, "run", "--config", str(path))
    for part in ("--validation-split must be > 0 and < 1, got 1.5; e.g. --validation-split 0.2",
                 "--lr must be a finite number, got nan", "--steps expects int, got inf"):
        assert part in line


def test_a_device_this_machine_lacks_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert one_line_error(monkeypatch, "run", "--device", "cuda") == \
        "Error: --device cuda: no CUDA device is visible; use --device cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "--device cuda:1: only 1 CUDA device is visible; use --device cuda:0" in \
        one_line_error(monkeypatch, "run", "--device", "cuda:1")
    assert config.device_problem("cuda:0") is None and config.device_problem("cpu") is None


@pytest.mark.parametrize("name, content, expected", [
    ("train-number.yaml", b"train: 5\n", "'train' must be a mapping of training settings"),
    ("train-list.yaml", b"train: [1, 2]\n", "'train' must be a mapping of training settings"),
    ("list.yaml", b"- adapter: dora\n", "must hold a mapping of settings, such as 'adapter: dora'"),
    ("latin1.yaml", "adapter: déra\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9"),
    ("latin1.json", '{"adapter": "déra"}'.encode("latin-1"), "is not UTF-8 text (byte 0xe9"),
    ("keys.yaml", b"1: 2\n", "setting names must be text, got 1"),
])
def test_config_files_of_the_wrong_shape_are_one_line_naming_the_file(monkeypatch, tmp_path, name,
                                                                      content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    line = one_line_error(monkeypatch, "run", "--config", str(path))
    assert str(path) in line and expected in line


def resolved_run() -> dict:
    """A well-formed config.json as 'qpeft run' writes it."""
    return {"run": "r", "qpeft_version": "0", "config": config.RunConfig().to_dict(),
            "quantizer": {"name": "nf4", "options": {}},
            "adapter": {"spec": "lora", "parts": [{"name": "lora", "options": {}}]}}


def _without(key):
    out = resolved_run()
    del out[key]
    return json.dumps(out).encode()


@pytest.mark.parametrize("content, expected", [
    (json.dumps(resolved_run()).encode()[:40], "is not valid JSON"),
    (b"not json", "is not valid JSON"),
    (b"[]", "is damaged: it holds a list"),
    (_without("config"), "is damaged: 'config' is missing"),
    (_without("quantizer"), "is damaged: 'quantizer' is missing"),
    (_without("adapter"), "is damaged: 'adapter' is missing"),
    (json.dumps({**resolved_run(), "adapter": {"spec": "lora", "parts": ["lora"]}}).encode(),
     "is damaged: 'adapter' needs"),
    (json.dumps({**resolved_run(), "quantizer": {"name": "nf4"}}).encode(), "'quantizer' lacks 'options'"),
    (json.dumps({**resolved_run(), "config": {"model": None, "train": {"lr": -1}}}).encode(),
     "holds settings this qpeft cannot use: --lr must be > 0"),
    ('{"run": "é"}'.encode("latin-1"), "is not UTF-8 text"),
])
def test_a_damaged_run_config_is_one_line_naming_it(monkeypatch, tmp_path, content, expected):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.json").write_bytes(content)
    for args in (["run", str(run_dir), "--resume"], ["eval", str(run_dir)]):
        line = one_line_error(monkeypatch, *args)
        assert str(run_dir / "config.json") in line and expected in line and "--overwrite" in line


def test_a_well_formed_run_config_reads_back(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**resolved_run(), "config": {
        **config.RunConfig().to_dict(), "device": "cuda"}}))
    record = RunRecord.read(tmp_path)        # a GPU run's config reads on any machine
    assert record.settings(tmp_path).device == "cuda"


def test_each_setting_is_declared_once_and_the_flags_and_ranges_come_from_it():
    """Issue 17 item 5: a setting's default, help and range live in its field; the flag, its
    '[default: …]' and RANGES are generated, so they cannot disagree."""
    import dataclasses

    from click.testing import CliRunner

    from qpeft.core.cli.main import cli
    from qpeft.core.settings import config, flags

    fields = [f for cls in (config.RunConfig, config.TrainConfig) for f in dataclasses.fields(cls)]
    flagged = {"--" + f.name.replace("_", "-") for f in fields if f.metadata.get("flag")}
    assert flagged == {s[0] for s in flags.SETTINGS} | {f[0] for f in flags.FLAGS}
    assert len(flagged) == 37 and {"validation_split", "progress", "train"}.isdisjoint(flagged)
    numeric = {f.name for f in fields if f.type in ("int", "float", int, float)} - {"progress"}
    assert set(config.RANGES) == numeric
    assert config.RANGES["eval_every"].problem(-2) == "must be ≥ -1"
    text = " ".join(CliRunner().invoke(cli, ["run", "--help"], terminal_width=400).output.split())
    for f in fields:
        if f.metadata.get("flag") and not f.metadata["shown"] and f.type not in ("bool", bool):
            assert f"[default: {f.default}]" in text.split("--" + f.name.replace("_", "-"), 1)[1], f.name
