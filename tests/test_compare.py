"""``qpeft compare``: a real 2×2 grid on the tiny model (one process per cell), failures, resume;
bad specs and flags stop the grid before any cell runs."""
import csv
import json
import math

import pytest
from click.testing import CliRunner

from qpeft.core import compare
from qpeft.core.cli.main import cli
from qpeft.core.errors import QpeftError

QUANTS = ["none:compute_dtype=float32", "hqq"]
ADAPTERS = ["lora:r=4", "ia3"]
FLAGS = ["--steps", "2", "--eval-limit", "4", "--save-every", "100", "--batch-size", "2",
         "--evaluators", "perplexity,prompts:max_new_tokens=4,footprint"]


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
    assert "export_ppl_shipped" not in table["columns"] and "export_ppl_shipped" not in rows[0]
    assert [(r["quant"], r["adapter"]) for r in rows] == [(q, a) for q in QUANTS for a in ADAPTERS]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 4
    for r in ok:
        assert r["trainable_params"] > 0 and r["ppl_after"] > 1 and r["peak_memory_mb"] > 0
        assert r["train_seconds"] > 0 and r["prompts_pass_rate"] is not None
        assert 0 < r["edge_score"] <= 1 and r["within_budget"] is True
    assert max(r["edge_score"] for r in ok) < 1 or len({r["edge_score"] for r in ok}) > 1
    hqq = {r["adapter"]: r for r in ok if r["quant"] == "hqq"}
    none = {r["adapter"]: r for r in ok if r["quant"] != "hqq"}
    assert hqq["lora:r=4"]["model_mb"] < none["lora:r=4"]["model_mb"]
    assert hqq["ia3"]["trainable_params"] < hqq["lora:r=4"]["trainable_params"]
    with open(grid_dir / "comparison.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_export_quant_adds_the_merge_cost_of_each_finished_cell(grid_dir, tiny_dir):
    rows = compare.compare(QUANTS, ADAPTERS, grid_dir, FLAGS + ["--model", tiny_dir], model=tiny_dir,
                           say=lambda _: None, export_quant="none:compute_dtype=float32")
    for r in rows:
        assert r["export_ppl_trained"] == pytest.approx(r["ppl_after"], rel=1e-4)
        assert r["export_ppl_merged"] == pytest.approx(r["export_ppl_trained"], rel=1e-2)
        assert r["export_gap_pct"] == pytest.approx(
            100 * (r["export_ppl_shipped"] / r["export_ppl_trained"] - 1), abs=1e-2)
    assert len(list(grid_dir.glob("*/export-none_compute_dtype_float32.json"))) == 4
    md = (grid_dir / "comparison.md").read_text()
    assert "| ppl shipped (merged + re-quantized) |" in md and "re-quantized with `none:compute_dtype=float32`" in md
    with open(grid_dir / "comparison.csv") as f:
        assert "export_gap_pct" in csv.DictReader(f).fieldnames


def test_a_failing_cell_is_recorded_and_the_others_still_run(monkeypatch, tmp_path):
    cells = compare.grid(["none", "hqq"], ["lora", "dora"])
    started = []

    def fake_run_cell(cell, output_dir, flags, log_dir):
        started.append(cell.name)
        return "Error: boom" if cell.name == "none-lora" else None
    monkeypatch.setattr(compare, "run_cell", fake_run_cell)
    errors = compare.run_grid(cells, tmp_path, [], say=lambda _: None)
    assert started == [c.name for c in cells]
    assert errors == {"none-lora": "Error: boom", "none-dora": None, "hqq-lora": None, "hqq-dora": None}


def test_a_rerun_skips_finished_cells(grid_dir, tiny_dir):
    reports = sorted(grid_dir.glob("*/report.json"))
    assert len(reports) == 4
    before = {p: p.stat().st_mtime_ns for p in reports}
    result = CliRunner().invoke(cli, ["compare", "--quant", ",".join(QUANTS), "--adapter", ",".join(ADAPTERS),
                                      "--model", tiny_dir, "--output-dir", str(grid_dir),
                                      "--memory-budget", "1MB", *FLAGS])
    assert result.exit_code == 0, result.output
    assert result.output.count("done before, skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in reports} == before
    rows = json.loads((grid_dir / "comparison.json").read_text())["rows"]
    assert all(r["within_budget"] is False and r["edge_score"] is None for r in rows if r["status"] == "ok")


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
    def r(ppl, mem, model_mb, secs):
        return {"status": "ok", "ppl_after": ppl, "peak_memory_mb": mem, "model_mb": model_mb,
                "adapter_mb": 0.0, "train_seconds": secs, "edge_score": None}
    rows = [r(10.0, 1000, 100, 10), r(20.0, 500, 50, 20), r(5.0, 4000, 100, 10)]
    compare.edge_scores(rows, "perplexity", compare.WEIGHTS, budget_mb=2000)
    # the third row is over the budget: no score, and not a reference (best ppl is 10, not 5)
    a = (10 / 10) ** 0.4 * (500 / 1000) ** 0.2 * (50 / 100) ** 0.2 * (10 / 10) ** 0.2
    b = (10 / 20) ** 0.4 * 1 * 1 * (10 / 20) ** 0.2
    assert rows[0]["edge_score"] == pytest.approx(a, abs=1e-4)
    assert rows[1]["edge_score"] == pytest.approx(b, abs=1e-4)
    assert rows[2]["within_budget"] is False and rows[2]["edge_score"] is None
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
    (["--quant", "none,bogus"], ["--quant 'bogus': unknown quantizer 'bogus'", "nothing was run"]),
    (["--quant", "none,bogus", "--adapter", "lora,lora:r=-1"],
     ["--quant 'bogus': unknown quantizer", "--adapter 'lora:r=-1': adapter 'lora': r must be at least 1",
      "fix or drop the specs"]),
    (["--lr", "-1"], ["--lr must be > 0, got -1.0; e.g. --lr 3e-4"]),
    (["--export-quant", "bogus"], ["--export-quant 'bogus': unknown quantizer 'bogus'", "nothing was run"]),
    (["--batch-size", "0", "--device", "bogus"], ["--batch-size must be ≥ 1", "--device must be auto"]),
])
def test_bad_specs_and_flags_stop_the_grid_before_any_cell_runs(monkeypatch, tmp_path, args, expected):
    monkeypatch.setattr(compare, "run_cell", _no_cell)
    out = tmp_path / "grid"
    result = CliRunner().invoke(cli, ["compare", "--output-dir", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert all(part in lines[0] for part in expected), lines[0]
    assert not out.exists()
