"""Run settings: config files, flag overrides, every error at once; schedules; optimizer fallback."""
import pytest
import torch

from qpeft.core import config
from qpeft.core.errors import OptionsError, QpeftError
from qpeft.core.optim import build_optimizer, build_schedule
from qpeft.core.trainer import TrainConfig


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

    from qpeft.core.trainer import Trainer

    results = []
    for flag in (False, True):
        model = adapted_tiny(tokenizer)
        cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, log_every=1, save_every=0, progress=False,
                          gradient_checkpointing=flag)
        results.append(Trainer(model, source(tokenizer, 8), cfg, tmp_path / str(flag)).train().history)
    assert [r["loss"] for r in results[1]] == pytest.approx([r["loss"] for r in results[0]], rel=1e-5)
