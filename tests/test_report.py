"""Report tables show a rate beside its count where the evaluator reports one (issue 24 item 5)."""
from qpeft.core.run import report
from qpeft.core.cli.eval_cmd import table


def test_a_rate_with_a_count_is_shown_as_k_of_n_and_the_count_row_folded_in():
    after = {"accuracy": {"accuracy": 0.925, "accuracy_n": 40}, "prompts": {"pass_rate": 0.5, "pass_rate_n": 2},
             "perplexity": {"perplexity": 3.25}}
    before = {"accuracy": {"accuracy": 0.125, "accuracy_n": 40}, "prompts": {"pass_rate": 0.0, "pass_rate_n": 2}}
    text = report.markdown({"quantizer": {"name": "nf4"}, "adapter": {"spec": "lora"}, "model": "m",
                            "qpeft_version": "0", "before": before, "after": after,
                            "training": {"steps": 1, "final_loss": 1.0, "tokens": 1, "seconds": 1,
                                         "examples": {"kept": 1, "truncated": 0, "dropped": 0}},
                            "facts": {}})
    assert "| accuracy | accuracy | 0.125 (5/40) | 0.925 (37/40) |" in text
    assert "| prompts | pass_rate | 0 (0/2) | 0.5 (1/2) |" in text
    assert "| perplexity | perplexity |  | 3.25 |" in text
    assert "accuracy_n" not in text and "pass_rate_n" not in text
    rows = table(after, before).splitlines()
    assert any(r.split() == ["prompts", "pass_rate", "0.5", "(1/2)", "0", "(0/2)"] for r in rows)
    assert not any("_n" in r for r in rows)


def test_the_report_title_keeps_the_quantizer_options():
    base = {"quantizer": {"name": "hqq"}, "adapter": {"spec": "lora+rslora"}}
    assert report.title({**base, "quant_spec": "hqq:nbits=2"}) == "hqq:nbits=2 × lora+rslora"
    assert report.title(base) == "hqq × lora+rslora"     # a report written before quant_spec
