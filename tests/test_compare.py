"""``qpeft compare``: a real 2×2 grid on the tiny model (one process per cell), failures, resume;
bad specs and flags stop the grid before any cell runs."""
import csv
import json
import math

import pytest
from click.testing import CliRunner

from qpeft.core.compare import table as compare, grid as compare_grid
from qpeft.core.cli.main import cli
from qpeft.core.base.errors import QpeftError

QUANTS = ["none:compute_dtype=float32", "hqq"]
ADAPTERS = ["lora:r=4", "ia3"]
FLAGS = ["--steps", "2", "--eval-limit", "4", "--save-every", "100", "--batch-size", "2",
         "--evaluators", "perplexity;prompts:max_new_tokens=4", "--evaluators", "footprint"]
PPL, PASS = "perplexity:perplexity:after", "prompts:pass_rate:after"
TRAINABLE, MODEL_MB = "footprint:trainable_params:after", "footprint:model_mb:after"


@pytest.fixture(scope="module")
def grid_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    compare.compare(QUANTS, ADAPTERS, out, FLAGS + ["--model", tiny_dir], budget="10GB",
                    model=tiny_dir, say=lambda _: None)
    return out


def test_the_grid_writes_tables_and_plots_with_a_row_per_combination(grid_dir):
    for name in ("comparison.md", "comparison.csv", "comparison.json", "quality_vs_memory.png",
                 "quality_vs_runtime.png", "loss_curves.png"):
        assert (grid_dir / name).stat().st_size > 0, name
    table = json.loads((grid_dir / "comparison.json").read_text())
    rows = table["rows"]
    assert "export_shipped" not in table["columns"] and "export_shipped" not in rows[0]
    assert table["edge_quality"] == "perplexity:perplexity"       # the first evaluator's primary metric
    assert list(table["columns"])[:9] == [
        "quant", "adapter", "status", "perplexity:perplexity:before", PPL, "perplexity:eval_loss:before",
        "perplexity:eval_loss:after", "prompts:pass_rate:before", PASS]
    assert table["columns"][PPL] == "perplexity after" and table["columns"][PASS] == "prompts pass_rate after"
    assert "footprint:model_mb:before" not in table["columns"]    # footprint compares "after" only
    assert [(r["quant"], r["adapter"]) for r in rows] == [(q, a) for q in QUANTS for a in ADAPTERS]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 4
    for r in ok:
        assert r[TRAINABLE] > 0 and r[PPL] > 1 and r["peak_memory_mb"] > 0
        assert r["train_seconds"] > 0 and r[PASS] is not None and r["disk_mb"] > r[MODEL_MB]
        assert 0 < r["edge_score"] <= 1 and r["within_budget"] is True
    assert max(r["edge_score"] for r in ok) < 1 or len({r["edge_score"] for r in ok}) > 1
    hqq = {r["adapter"]: r for r in ok if r["quant"] == "hqq"}
    none = {r["adapter"]: r for r in ok if r["quant"] != "hqq"}
    assert hqq["lora:r=4"][MODEL_MB] < none["lora:r=4"][MODEL_MB]
    assert hqq["ia3"][TRAINABLE] < hqq["lora:r=4"][TRAINABLE]
    with open(grid_dir / "comparison.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    # comparison.md opens with who won (issue 24) and lists the rows best edge score first
    text = (grid_dir / "comparison.md").read_text()
    best = max(ok, key=lambda r: r["edge_score"])
    assert (f"- Best edge score within the memory budget (9537 MiB): **{best['quant']} × {best['adapter']}** "
            f"({best['edge_score']:.3g}).") in text
    assert f"(n = {ok[0]['perplexity:perplexity_n:after']})" in text.split("- perplexity after: ")[1].splitlines()[0]
    assert "prompts pass_rate after: **" in text and "/2, ±" in text
    ranked = [line.split(" | ")[:2] for line in text.split("Rows sorted by edge score")[1].splitlines()
              if line.startswith("| none") or line.startswith("| hqq")]
    by_score = sorted(ok, key=lambda r: -r["edge_score"])
    assert ranked == [[f"| {r['quant']}", r["adapter"]] for r in by_score]


def test_export_quant_adds_the_merge_cost_of_each_finished_cell(grid_dir, tiny_dir):
    rows = compare.compare(QUANTS, ADAPTERS, grid_dir, FLAGS + ["--model", tiny_dir], model=tiny_dir,
                           say=lambda _: None, export_quant="none:compute_dtype=float32")
    for r in rows:
        assert r["export_trained"] == pytest.approx(r[PPL], rel=1e-4)      # by the edge quality: perplexity
        assert r["export_merged"] == pytest.approx(r["export_trained"], rel=1e-2)
        assert r["export_gap_pct"] == pytest.approx(
            100 * (r["export_shipped"] / r["export_trained"] - 1), abs=1e-2)
    assert len(list(grid_dir.glob("*/export-none_compute_dtype_float32.json"))) == 4
    md = (grid_dir / "comparison.md").read_text()
    assert "| export: shipped (merged + re-quantized) |" in md and "`perplexity:perplexity` on the run's" in md and "re-quantized with `none:compute_dtype=float32`" in md
    with open(grid_dir / "comparison.csv") as f:
        assert "export_gap_pct" in csv.DictReader(f).fieldnames


def test_a_failing_cell_is_recorded_and_the_others_still_run(monkeypatch, tmp_path):
    cells = compare_grid.grid(["none", "hqq"], ["lora", "dora"])
    started = []

    def fake_run_cell(cell, output_dir, flags, log_dir, mode="new"):
        started.append(cell.name)
        return "Error: boom" if cell.name == "none-lora" else None
    monkeypatch.setattr(compare_grid, "run_cell", fake_run_cell)
    errors = compare_grid.run_grid(cells, tmp_path, [], say=lambda _: None)
    assert started == [c.name for c in cells]
    assert errors == {"none-lora": "Error: boom", "none-dora": None, "hqq-lora": None, "hqq-dora": None}


def test_an_interrupted_grid_leaves_the_table_of_the_cells_finished_and_says_its_eta(
        monkeypatch, grid_dir, tiny_dir, tmp_path):
    """Issue 20 item 5: the tables are rewritten after every cell, and each cell's line
    carries the grid's progress and ETA."""
    import shutil

    ran, said = [], []

    def fake_run_cell(cell, output_dir, flags, log_dir, mode="new"):
        if len(ran) == 2:
            raise KeyboardInterrupt
        ran.append(cell.name)
        shutil.copytree(grid_dir / cell.name, output_dir / cell.name)   # a finished cell's run directory
        return None
    monkeypatch.setattr(compare_grid, "run_cell", fake_run_cell)
    with pytest.raises(KeyboardInterrupt):
        compare.compare(QUANTS, ADAPTERS, tmp_path, FLAGS + ["--model", tiny_dir], model=tiny_dir, say=said.append)
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert [(r["quant"], r["adapter"], r["status"]) for r in table["rows"]] == [
        (QUANTS[0], ADAPTERS[0], "ok"), (QUANTS[0], ADAPTERS[1], "ok")]
    assert (table["finished"], table["cells"]) == (2, 4)
    assert all(r[PPL] > 1 and r["edge_score"] > 0 for r in table["rows"])
    assert "grid: 2 combinations (2 of 4 finished so far" in (tmp_path / "comparison.md").read_text()
    lines = [line for line in said if "cells ·" in line]
    assert len(lines) == 2 and " · 1/4 cells · " in lines[0] and " · 2/4 cells · " in lines[1]
    assert all("ETA " in line for line in lines)
    assert not list(tmp_path.glob(".comparison*.part"))


def test_cells_skip_the_validation_during_training_unless_the_flags_or_the_file_ask(grid_dir, tmp_path):
    """A grid's cells run with --eval-every 0 (the after perplexity measures the same split)."""
    first = compare_grid.grid(QUANTS, ADAPTERS)[0].name
    record = json.loads((grid_dir / first / "config.json").read_text())["config"]
    assert record["train"]["eval_every"] == 0
    lines = [json.loads(line) for line in (grid_dir / first / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert lines and not any("eval_loss" in line for line in lines)
    assert compare_grid.grid_defaults([]) == ["--eval-every", "0"]
    assert compare_grid.grid_defaults(["--eval-every", "5"]) == compare_grid.grid_defaults(["--eval-every=5"]) == []
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  eval_every: 3\n")
    assert compare_grid.grid_defaults(["--config", str(config)]) == []


def test_the_eta_is_the_mean_cell_time_times_the_cells_left():
    cells = compare_grid.grid(["none", "nf4"], ["lora", "dora"])
    modes = {"nf4-dora": "done"}                               # skipped: no time for it
    line = compare_grid.progress_line(1, 4, [100.0], 100.0, cells[1:], modes)
    assert line == "1/4 cells · 1m40s elapsed · ETA 3m20s"
    assert compare_grid.progress_line(4, 4, [100.0] * 4, 400.0, [], None) == "4/4 cells · 6m40s elapsed · grid done"
    assert [compare_grid.clock(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_a_rerun_skips_finished_cells(grid_dir, tiny_dir):
    reports = sorted(grid_dir.glob("*/report.json"))
    assert len(reports) == 4
    before = {p: p.stat().st_mtime_ns for p in reports}
    result = CliRunner().invoke(cli, ["compare", "--quant", ";".join(QUANTS), "--adapter", ADAPTERS[0], "--adapter", ADAPTERS[1],
                                      "--model", tiny_dir, "--output-dir", str(grid_dir),
                                      "--memory-budget", "1MB", *FLAGS])
    assert result.exit_code == 0, result.output
    assert result.output.count("done before with these settings, skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in reports} == before
    rows = json.loads((grid_dir / "comparison.json").read_text())["rows"]
    assert all(r["within_budget"] is False and r["edge_score"] is None for r in rows if r["status"] == "ok")


def grid_args(grid_dir, tiny_dir, *extra):
    return ["compare", "--quant", ";".join(QUANTS), "--adapter", ";".join(ADAPTERS), "--model", tiny_dir,
            "--output-dir", str(grid_dir), *FLAGS, *extra]


def test_a_rerun_with_other_settings_stops_before_any_cell_runs(grid_dir, tiny_dir):
    reports = {p: p.stat().st_mtime_ns for p in grid_dir.glob("*/report.json")}
    result = CliRunner().invoke(cli, grid_args(grid_dir, tiny_dir, "--steps", "3"))
    assert result.exit_code == 2
    first = grid_dir / compare_grid.grid(QUANTS, ADAPTERS)[0].name
    assert result.stderr.strip() == (f"Error: {first} was run with --steps 2 (this grid: 3) (and 3 more cells); "
                                      "nothing was run: pass --overwrite to run those cells again, or another "
                                      "--output-dir to keep both")
    assert {p: p.stat().st_mtime_ns for p in grid_dir.glob("*/report.json")} == reports


def test_a_cell_stopped_before_its_report_resumes_and_other_settings_need_overwrite(grid_dir, tiny_dir, tmp_path,
                                                                                    monkeypatch):
    import shutil

    cell = compare_grid.grid(QUANTS[:1], ADAPTERS[:1])[0]
    out = tmp_path / "grid"
    shutil.copytree(grid_dir / cell.name, out / cell.name)
    (out / cell.name / "report.json").unlink()                 # stopped after training, before its report
    flags = FLAGS + ["--model", tiny_dir]
    assert compare_grid.cell_modes([cell], out, flags) == {cell.name: "resume"}
    assert compare_grid.cell_modes([cell], out, flags + ["--lr", "0.1"], overwrite=True) == {cell.name: "overwrite"}
    with pytest.raises(QpeftError, match=r"was run with --lr 0.0003 \(this grid: 0.1\); nothing was run"):
        compare_grid.cell_modes([cell], out, flags + ["--lr", "0.1"])
    (out / cell.name / "config.json").write_text("{")
    with pytest.raises(QpeftError, match="its run record cannot be used .*is not valid JSON"):
        compare_grid.cell_modes([cell], out, flags)
    shutil.copy(grid_dir / cell.name / "config.json", out / cell.name / "config.json")

    rows = compare.compare(QUANTS[:1], ADAPTERS[:1], out, flags, model=tiny_dir, say=lambda _: None)
    assert rows[0]["status"] == "ok" and (out / cell.name / "report.json").is_file()
    assert (out / "logs" / f"{cell.name}.log").read_text().splitlines()[0].endswith("--resume")
    assert rows[0][PPL] == pytest.approx(json.loads((grid_dir / cell.name / "report.json").read_text())
                                         ["after"]["perplexity"]["perplexity"], rel=1e-5)


def test_a_cell_failing_at_run_time_records_its_last_stderr_line(tiny_dir, tmp_path):
    rows = compare.compare(["hqq:group_size=48"], ["lora:r=4"], tmp_path, FLAGS + ["--model", tiny_dir],
                           say=lambda _: None)
    assert rows[0]["status"] == "failed"
    assert "cannot be split into groups of 48" in rows[0]["error"]     # the last stderr line
    assert (tmp_path / "logs" / "hqq_group_size48-lora_r4.log").is_file()
    assert rows[0]["edge_score"] is None
    md = (tmp_path / "comparison.md").read_text()
    assert "## Failed combinations" in md and "hqq:group_size=48 × lora:r=4: " in md
    assert "**Edge score** = Q^0.40 · M^0.20 · D^0.20 · T^0.20" in md


def test_edge_score_is_the_weighted_geometric_mean_of_ratios_to_the_best():
    def r(ppl, mem, disk, secs):
        return {"status": "ok", PPL: ppl, "peak_memory_mb": mem, "disk_mb": disk,
                "train_seconds": secs, "edge_score": None}
    rows = [r(10.0, 1000, 100, 10), r(20.0, 500, 50, 20), r(5.0, 4000, 100, 10)]
    compare.edge_scores(rows, PPL, False, compare.WEIGHTS, budget_mb=2000)
    # the third row is over the budget: no score, and not a reference (best ppl is 10, not 5)
    a = (10 / 10) ** 0.4 * (500 / 1000) ** 0.2 * (50 / 100) ** 0.2 * (10 / 10) ** 0.2
    b = (10 / 20) ** 0.4 * 1 * 1 * (10 / 20) ** 0.2
    assert rows[0]["edge_score"] == pytest.approx(a, abs=1e-4)
    assert rows[1]["edge_score"] == pytest.approx(b, abs=1e-4)
    assert rows[2]["within_budget"] is False and rows[2]["edge_score"] is None
    rows = [r(0.5, 1000, 100, 10), r(0.25, 1000, 100, 10)]   # the same key, read as higher-is-better
    compare.edge_scores(rows, PPL, True, {"quality": 1.0, "memory": 0, "disk": 0, "time": 0})
    assert [row["edge_score"] for row in rows] == [1.0, 0.5]
    assert math.isclose(sum(compare.parse_weights("quality=2,time=2").values()), 1.0)


def test_memory_budgets_and_flags_are_checked_before_anything_runs(tmp_path):
    assert compare.parse_memory("8GiB") == 8192
    assert compare.parse_memory("8GB") == pytest.approx(8e9 / 2**20)
    assert compare.parse_memory("500") == 500
    with pytest.raises(QpeftError, match="cannot read memory budget 'lots'; write e.g. 8GB"):
        compare.parse_memory("lots")
    result = CliRunner().invoke(cli, ["compare", "--output-dir", str(tmp_path), "--name", "x"])
    assert result.exit_code == 2 and "compare sets --name for each cell" in result.output
    result = CliRunner().invoke(cli, ["compare", "--output-dir", str(tmp_path), "--stepz", "2"])
    assert result.exit_code == 2 and "No such option '--stepz'" in result.output
    assert not list(tmp_path.iterdir())


def _no_cell(*args, **kwargs):
    raise AssertionError("a cell ran before every spec and flag was checked")


@pytest.mark.parametrize("args, expected", [
    (["--quant", "none;bogus"], ["--quant 'bogus': unknown quantizer 'bogus'", "nothing was run"]),
    (["--quant", "none;bogus", "--adapter", "lora;lora:r=-1"],
     ["--quant 'bogus': unknown quantizer", "--adapter 'lora:r=-1': adapter 'lora': r must be at least 1",
      "fix or drop the specs"]),
    (["--lr", "-1"], ["--lr must be > 0, got -1.0; e.g. --lr 3e-4"]),
    (["--export-quant", "bogus"], ["--export-quant 'bogus': unknown quantizer 'bogus'", "nothing was run"]),
    (["--batch-size", "0", "--device", "bogus"], ["--batch-size must be ≥ 1", "--device must be auto"]),
    (["--quant", "none,nf4"], ["--quant: 'none,nf4': a plugin name cannot hold ','", "(e.g. 'none;nf4')"]),
    (["--adapter", "lora:r=4,dora"], ["option 'r' expects int, got '4,dora'", "separate specs with ';'"]),
    (["--evaluators", "perplexity,prompts"], ["--evaluators: 'perplexity,prompts': a plugin name cannot"]),
    (["--edge-quality", "perplexity:pass_rate"],
     ["--edge-quality 'perplexity:pass_rate': evaluator 'perplexity' declares no direction for 'pass_rate'; "
      "use one of perplexity:perplexity, perplexity:eval_loss"]),
    (["--edge-quality", "perplexty"], ["--edge-quality 'perplexty': unknown evaluator 'perplexty'; "
                                       "did you mean 'perplexity'? Available: "]),
    (["--edge-quality", "mmlu", "--evaluators", "perplexity"],
     ["--edge-quality 'mmlu': 'mmlu' is not among --evaluators (perplexity); add it"]),
])
def test_bad_specs_and_flags_stop_the_grid_before_any_cell_runs(monkeypatch, tmp_path, args, expected):
    monkeypatch.setattr(compare_grid, "run_cell", _no_cell)
    out = tmp_path / "grid"
    result = CliRunner().invoke(cli, ["compare", "--output-dir", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert all(part in lines[0] for part in expected), lines[0]
    assert not out.exists()


def test_compare_runs_exactly_the_cells_written_from_flags_or_a_config_file(monkeypatch, tmp_path):
    started = []

    def fake_run_cell(cell, output_dir, flags, log_dir, mode="new"):
        started.append((cell.quant, cell.adapter))
        return "not run in this test"
    monkeypatch.setattr(compare_grid, "run_cell", fake_run_cell)
    result = CliRunner().invoke(cli, ["compare", "--output-dir", str(tmp_path / "a"), "--quant", "none",
                                      "--quant", "hqq:nbits=4", "--adapter", "lora:r=4:targets=q_proj,v_proj;dora"])
    assert result.exit_code == 0, result.output
    assert started == [("none", "lora:r=4:targets=q_proj,v_proj"), ("none", "dora"),
                       ("hqq:nbits=4", "lora:r=4:targets=q_proj,v_proj"), ("hqq:nbits=4", "dora")]
    assert "4 combinations: none × lora:r=4:targets=q_proj,v_proj, none × dora, " in result.stderr
    started.clear()
    file = tmp_path / "grid.yaml"
    file.write_text('quant: [none, "hqq:nbits=4"]\nadapter: "lora:targets=q_proj,v_proj"\n'
                    'evaluators: [perplexity, "prompts:max_new_tokens=4"]\n')
    result = CliRunner().invoke(cli, ["compare", "--output-dir", str(tmp_path / "b"), "--config", str(file),
                                      "--adapter", "ia3"])
    assert result.exit_code == 0, result.output
    assert started == [("none", "ia3"), ("hqq:nbits=4", "ia3")]        # the flag wins over the file
    meta = json.loads((tmp_path / "b" / "comparison.json").read_text())
    assert meta["evaluators"] == ["perplexity", "prompts:max_new_tokens=4"]
    assert meta["edge_quality"] == "perplexity:perplexity"


DISTINCT = '''
from qpeft import hookimpl
from qpeft.core.kinds.evaluator import Evaluator

class Distinct(Evaluator):
    name = "distinct"
    description = "distinct-n of greedy answers"
    higher_is_better = {"distinct_1": True, "distinct_2": True}
    def evaluate(self, ctx):
        return {}

@hookimpl
def register_evaluators(register):
    register(Distinct)
'''


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """The default registry with a third-party ``distinct`` evaluator from a fake distribution."""
    from qpeft.core.plugin import registry
    from test_registry import make_distribution

    monkeypatch.syspath_prepend(str(tmp_path))
    make_distribution(tmp_path, "qpeft-plugin-distinct", "0.1", "qpeft_distinct", DISTINCT, "distinct")
    monkeypatch.setattr(registry, "_default", registry.Registry())
    assert registry.default().get("evaluator", "distinct").origin.distribution == "qpeft-plugin-distinct"


def fake_report(ppl: float, d2: float, disk: float) -> dict:
    facts = {"quantized_model_mb": disk, "adapter_disk_mb": 0.0, "peak_rss_mb": 100.0, "train_seconds": 10.0}
    after = {"perplexity": {"perplexity": ppl, "eval_tokens": 50},
             "distinct": {"distinct_1": 0.5, "distinct_2": d2, "n": 40}}
    return {"before": {"perplexity": {"perplexity": 2 * ppl}, "distinct": {"distinct_2": 0.1}},
            "after": after, "facts": facts}


def test_a_third_party_evaluator_gets_columns_and_can_be_the_edge_quality(third_party, monkeypatch, tmp_path):
    reports = {"none-lora": fake_report(10.0, 0.8, 100.0), "none-ia3": fake_report(5.0, 0.4, 100.0)}

    def fake_run_cell(cell, output_dir, flags, log_dir, mode="new"):
        (output_dir / cell.name).mkdir()
        (output_dir / cell.name / "report.json").write_text(json.dumps(reports[cell.name]))
        record = {"run": cell.name, "qpeft_version": "0",   # the record a run with these flags writes
                  "config": compare_grid.cell_settings(cell, output_dir, flags).to_dict(),
                  "quantizer": {"name": cell.quant, "options": {}},
                  "adapter": {"spec": cell.adapter, "parts": [{"name": cell.adapter, "options": {}}]}}
        (output_dir / cell.name / "config.json").write_text(json.dumps(record))
    monkeypatch.setattr(compare_grid, "run_cell", fake_run_cell)
    flags = ["--evaluators", "perplexity;distinct"]
    rows = compare.compare(["none"], ["lora", "ia3"], tmp_path, flags, quality="distinct:distinct_2",
                           weights="quality=1", say=lambda _: None)
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert table["columns"]["distinct:distinct_2:after"] == "distinct distinct_2 after"
    assert "distinct:n:after" not in table["columns"]       # no direction declared: report.json only
    assert [r["distinct:distinct_2:after"] for r in rows] == [0.8, 0.4]
    assert [r["distinct:distinct_2:before"] for r in rows] == [0.1, 0.1]
    assert [r["edge_score"] for r in rows] == [1.0, 0.5]     # higher is better: 0.4 / 0.8
    assert table["edge_quality_label"] == "distinct distinct_2 after (higher is better)"
    assert "| distinct distinct_2 after |" in (tmp_path / "comparison.md").read_text()
    rows = compare.compare(["none"], ["lora", "ia3"], tmp_path, flags, weights="quality=1", say=lambda _: None)
    assert [r["edge_score"] for r in rows] == [0.5, 1.0]     # the default: perplexity, lower is better
    with pytest.raises(QpeftError) as err:
        compare.compare(["none"], ["lora"], tmp_path, flags, quality="distinct", say=lambda _: None)
    assert str(err.value) == ("--edge-quality 'distinct': evaluator 'distinct' has no primary metric; "
                              "name one: distinct:distinct_1, distinct:distinct_2")
