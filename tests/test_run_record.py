"""The typed run record (core/run/record.py): written once, read back equal, the one source
that --resume, qpeft eval, export and requant start from."""
import dataclasses
import json

import pytest

from qpeft.core.settings import config
from qpeft.core.run import pipeline
from qpeft.core.plugin import registry
from qpeft.core.base.errors import QpeftError
from qpeft.core.run.record import PluginRecord, RunRecord, write


def started(tmp_path, **flags):
    cfg = config.build(None, {"quant": "nf4:blocksize=128", "adapter": "lora:r=4+rslora",
                              "evaluators": "perplexity;footprint", "output_dir": str(tmp_path),
                              "name": "r1", **flags})
    return cfg, RunRecord.started(cfg, pipeline.plan(cfg), cfg.run_name)


def test_a_record_written_reads_back_equal_and_rebuilds_its_settings(tmp_path):
    cfg, record = started(tmp_path, steps=7, lr=1e-3)
    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    write(run_dir, record)
    back = RunRecord.read(run_dir)
    assert back == record
    assert back.quantizer.name == "nf4" and back.quantizer.options["blocksize"] == 128
    assert [p.name for p in back.adapter_parts] == ["lora", "rslora"]
    assert back.adapter_parts[0].options["r"] == 4
    assert [e.name for e in back.evaluators] == ["perplexity", "footprint"]
    settings = back.settings(run_dir)
    assert dataclasses.replace(settings, resume=False) == cfg      # every setting, train ones too
    assert settings.train.steps == 7 and settings.train.lr == 1e-3


def test_the_file_keeps_the_shape_earlier_versions_wrote(tmp_path):
    _, record = started(tmp_path)
    data = json.loads(record.text())
    assert set(data) == {"run", "qpeft_version", "config", "quantizer", "adapter", "evaluators"}
    assert set(data["quantizer"]) == {"name", "origin", "version", "options"}
    assert data["adapter"]["spec"] == "lora:r=4+rslora" and len(data["adapter"]["parts"]) == 2
    # a record of an earlier version: no evaluators list, plugin records without origin
    old = {"run": "old", "qpeft_version": "0.1", "config": config.RunConfig().to_dict(),
           "quantizer": {"name": "nf4", "options": {}}, "adapter": {"spec": "lora", "parts": [
               {"name": "lora", "options": {"r": 8}}]}}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    back = RunRecord.read(tmp_path / "old")
    assert back.evaluators == () and back.quantizer == PluginRecord("nf4", {})
    assert back.composition(registry.default()).method.options.r == 8


def test_plugins_come_from_the_recorded_options_not_the_spec_text(tmp_path):
    """A run's spec said 'nf4' when nf4's blocksize default was 128: the record says so, and
    evaluating it again builds that quantizer, whatever today's default is."""
    cfg, record = started(tmp_path)
    record = dataclasses.replace(record, quantizer=dataclasses.replace(
        record.quantizer, options={**record.quantizer.options, "blocksize": 256}))
    cfg.quant = "nf4"
    plan = pipeline.plan(cfg, record)
    assert plan.quantizer.options.blocksize == 256
    assert [p.name for p in plan.adapter.parts] == ["lora", "rslora"]
    assert plan.adapter.method.options.r == 4


def test_a_record_naming_a_plugin_no_longer_installed_is_one_line(tmp_path):
    _, record = started(tmp_path)
    gone = dataclasses.replace(record, adapter_parts=(PluginRecord("pissa", {}),), adapter_spec="pissa")
    with pytest.raises(QpeftError, match="pissa"):
        gone.composition(registry.default())


def test_adapter_meta_names_the_base_and_the_quantizer_as_recorded(tmp_path):
    _, record = started(tmp_path)
    meta = record.adapter_meta()
    assert meta["base_model"] == "SmolLM2-135M-Instruct"        # model None: the embedded one
    assert meta["quantizer"]["options"]["blocksize"] == 128
    assert meta["adapter_spec"] == "lora:r=4+rslora"


def test_resume_starts_from_the_record_with_the_flags_given_on_top(tmp_path):
    _, record = started(tmp_path, steps=7)
    flags = record.flags(tmp_path / "r1")
    assert flags["resume"] is False and flags["name"] == "r1" and flags["output_dir"] == str(tmp_path)
    resumed = config.build(None, {"steps": 9, "resume": True}, flags)
    assert resumed.train.steps == 9 and resumed.adapter == "lora:r=4+rslora" and resumed.resume
