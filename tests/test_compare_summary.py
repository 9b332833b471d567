"""comparison.md names its winners, sorts its rows and marks differences inside the noise (issue 24 item 4)."""
from qpeft.core.compare import table as compare, summary as compare_summary

ACC, PPL = "accuracy:accuracy:after", "perplexity:perplexity:after"


def row(quant, adapter, acc, n, ppl, tokens, mem, secs, score):
    return {"quant": quant, "adapter": adapter, "status": "ok", "error": "", "memory_kind": "rss",
            ACC: acc, "accuracy:accuracy_n:after": n, PPL: ppl, "perplexity:perplexity_n:after": tokens,
            "peak_memory_mb": mem, "train_seconds": secs, "disk_mb": 100.0, "tokens_per_s": 1.0,
            "within_budget": None, "edge_score": score}


ROWS = [row("none", "lora", 0.900, 40, 3.20, 28, 900.0, 50.0, 0.61),
        row("nf4", "lora", 0.925, 40, 3.30, 28, 500.0, 60.0, 0.97),
        row("nf4", "dora", 0.300, 40, 3.05, 28, 600.0, 80.0, 0.70)]
META = {"model": "m", "edge_weights": dict(compare.WEIGHTS), "edge_quality": "accuracy:accuracy",
        "edge_quality_label": "accuracy after (higher is better)", "memory_budget_mb": None,
        "export_quant": None, "directions": {ACC: True, PPL: False}}


def test_the_summary_names_the_winners_with_their_noise_and_the_rows_are_sorted():
    text = compare.markdown(ROWS, META, [])
    assert "- Best edge score: **nf4 × lora** (0.97)." in text
    # 0.925 vs 0.900 over 40 answers: 1 answer apart, inside 2 standard errors; 0.300 is not
    assert ("- accuracy after: **nf4 × lora** 0.925 (37/40, ±0.042); not separable from none × lora "
            "0.9 (36/40, ±0.047).") in text
    assert "- perplexity after: **nf4 × dora** 3.05 (n = 28) — compare the sample size" in text
    assert "- Least peak memory: nf4 × lora (500 MiB)." in text and "- Fastest training: none × lora (50 s)." in text
    table = [line for line in text.splitlines() if line.startswith("| nf4") or line.startswith("| none")]
    assert [line.split(" | ")[:2] for line in table] == [["| nf4", "lora"], ["| nf4", "dora"], ["| none", "lora"]]
    assert "accuracy_n" not in text.split("Rows sorted")[1] and "perplexity_n" not in text


def test_sort_by_a_metric_follows_its_direction():
    ranked = compare_summary.sort_rows(ROWS, PPL, higher=False)
    assert [r[PPL] for r in ranked] == [3.05, 3.20, 3.30]
    assert compare_summary.separable(ROWS[1], ROWS[2], ACC) is True
    assert compare_summary.separable(ROWS[0], ROWS[1], ACC) is False
