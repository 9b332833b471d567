"""Loss that tells the truth (issue 24 item 3, core/loss_log.py): each logged line carries the
step's loss, the mean over the logging window and a bias-corrected EMA; the validation loss
lands on its step's line (one line per step); final loss is the last window's mean; all of it
survives a resume."""
import json
import math

import pytest

from qpeft.core.train.loss_log import LossLog
from qpeft.core.train.trainer import Trainer
from test_trainer import Interrupt, adapted_tiny, cfg, source


def test_window_mean_and_bias_corrected_ema():
    log = LossLog(beta=0.5)
    for x in (4.0, 2.0):
        log.add(x)
    assert log.fields() == {"loss_mean": 3.0, "loss_ema": (0.25 * 4 + 0.5 * 2) / (1 - 0.25)}
    log.add(1.0)
    state = log.state()
    again = LossLog(beta=0.5)
    again.load(state)
    assert again.fields() == log.fields() == {"loss_mean": 1.0, "loss_ema": pytest.approx(1.5 / 0.875)}
    assert math.isnan(LossLog().fields()["loss_mean"])


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def validation(model):
    return {"eval_loss": 1.0}


def test_the_window_mean_is_the_mean_of_the_steps_and_validation_lands_on_its_step(tokenizer, tmp_path):
    every = Trainer(adapted_tiny(tokenizer), source(tokenizer, 40), cfg(steps=10, log_every=1, eval_every=0),
                    tmp_path / "a").train()
    steps = [r["loss"] for r in every.history]
    assert len(steps) == 10 and all(r["loss_mean"] == r["loss"] for r in every.history)
    result = Trainer(adapted_tiny(tokenizer), source(tokenizer, 40), cfg(steps=10, log_every=5), tmp_path / "b",
                     evaluate=validation).train()
    got = lines(tmp_path / "b")
    assert [r["step"] for r in got] == [2, 4, 5, 6, 8, 10]       # --eval-every -1: every 10/5 steps
    assert [r["step"] for r in got if "eval_loss" in r] == [2, 4, 6, 8, 10]
    assert [r["step"] for r in got if "loss" in r] == [5, 10]
    assert got[2]["loss_mean"] == pytest.approx(sum(steps[:5]) / 5, rel=1e-6)
    assert result.final_loss == got[-1]["loss_mean"] == pytest.approx(sum(steps[5:]) / 5, rel=1e-6)
    ema = 0.0
    for x in steps:
        ema = 0.9 * ema + 0.1 * x
    assert got[-1]["loss_ema"] == pytest.approx(ema / (1 - 0.9 ** 10), rel=1e-6)
    assert result.final_loss < steps[0]


def test_smoothing_survives_a_resume(tokenizer, tmp_path):
    config = cfg(steps=10, log_every=4, save_every=3, eval_every=0)
    Trainer(adapted_tiny(tokenizer), source(tokenizer, 40), config, tmp_path / "a").train()
    with pytest.raises(KeyboardInterrupt):       # killed in step 8: step-000006 is the newest checkpoint
        Trainer(adapted_tiny(tokenizer), source(tokenizer, 40), config, tmp_path / "b",
                hooks=[Interrupt(7)]).train()
    Trainer(adapted_tiny(tokenizer), source(tokenizer, 40), config, tmp_path / "b").train(resume=True)
    straight, resumed = lines(tmp_path / "a"), lines(tmp_path / "b")
    keys = ("step", "loss", "loss_mean", "loss_ema")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]


def test_the_validation_time_stays_out_of_the_training_time_and_throughput(tokenizer, tmp_path):
    import time

    def slow(model):
        time.sleep(0.5)
        return {"eval_loss": 1.0}

    began = time.perf_counter()
    result = Trainer(adapted_tiny(tokenizer), source(tokenizer, 16), cfg(steps=2, eval_every=1), tmp_path,
                     evaluate=slow).train()
    wall = time.perf_counter() - began
    assert result.seconds < wall - 1.0, (result.seconds, wall)        # two 0.5 s validations left out
    assert lines(tmp_path)[-1]["tokens_per_s"] == pytest.approx(result.tokens / result.seconds, rel=0.5)
