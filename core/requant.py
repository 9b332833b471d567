"""Merged and re-quantized export, and what it costs in quality (``qpeft export --merge --quant``).

    rebuild(RUN)   adapter on the quantized base          ── perplexity "trained"  (what was trained)
      merge ─▶     full-precision model (--dtype)         ── perplexity "merged"
               ╰─▶ saved: safetensors + tokenizer + qpeft_quant.json
      Quantizer(SPEC).quantize_model                      ── perplexity "shipped"  (what is shipped)

All three on the run's own validation split, with the run's template, eval limit and the
``perplexity`` evaluator, so "trained" is the number in the run's report.

**The saved form** is the merged model in full precision (what transformers and llama.cpp's
converter read) plus ``qpeft_quant.json`` naming the quantizer, rather than the quantized
storage: the Quantizer contract has no save/load of its storage (bitsandbytes and hqq each
have their own, tied to their versions, and a third-party quantizer would need one too), while
every quantizer can quantize a full-precision model. ``qpeft run --model DIR --quant SPEC``
quantizes it again on load; qpeft's quantizers are deterministic, so that is exactly the model
measured here as "shipped" (the tests check this). The price: the directory is full size on
disk; the quantized size is in ``export_report.json``.
"""
import json
import math
import re
from pathlib import Path

from qpeft.core.errors import QpeftError

QUANT_FILE = "qpeft_quant.json"
REPORT_FILE = "export_report.json"
STAGES = {"trained": "adapter on the quantized base (trained)",
          "merged": "merged, full precision",
          "shipped": "merged and re-quantized (shipped)"}


def check_spec(spec: str):
    """The quantizer of ``--quant SPEC``, built (so checked) before anything loads."""
    from qpeft.core import registry
    from qpeft.core.pipeline import build_plugin

    return build_plugin("quantizer", spec, registry.default())


def validation(run_dir):
    """``(settings, plan)`` of a finished run, with the ``perplexity`` evaluator and the run's own
    validation split (template, --max-length, --eval-limit as its report used them)."""
    from qpeft.core import config, pipeline, rebuild

    cfg = rebuild.run_settings(config.read_run(run_dir), run_dir)
    cfg.evaluators = "perplexity"
    return cfg, pipeline.plan(cfg)


def perplexity(cfg, plan, model, tokenizer, stage: str = "after") -> dict:
    """The perplexity evaluator's result for ``model`` on the run's validation split — any
    causal LM, e.g. one transformers read back from an exported GGUF file."""
    from qpeft.core import pipeline

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ctx = pipeline.eval_context(cfg, model, tokenizer, "cpu", plan.validation, plan.test)
    result = plan.evaluators[0].evaluate(ctx(stage=stage, facts={}))
    if "perplexity" not in result:
        raise QpeftError(f"no validation example of {cfg.run_dir} fits --max-length; "
                         "the perplexity cannot be measured")
    return result


def measure(run_dir, quantizer, spec: str, dtype: str = "float32", rank: int | None = None,
            save=None, say=print) -> dict:
    """Rebuild the run, merge, re-quantize with ``quantizer``; the report (see the module doc).

    ``save(merged_model, tokenizer)`` is called with the merged full-precision model, before it
    is re-quantized in place.
    """
    import torch

    from qpeft.core import pipeline, rebuild
    from qpeft.core.quantizer import model_bytes

    run_dir = Path(run_dir)
    cfg, plan = validation(run_dir)      # checks the run's settings and data before the load
    say(f"qpeft: rebuilding {run_dir.name} to measure the merge and re-quantization ({spec})")
    built = rebuild.rebuild(run_dir, rank=rank)

    def measured(model, stage):
        result = perplexity(cfg, plan, model, built.tokenizer, stage)
        say(f"  {STAGES[stage]}: perplexity {result['perplexity']:.4f}")
        return result

    values, sizes = {"trained": measured(built.model, "trained")}, {"trained": model_bytes(built.model)}
    merged = built.composition.method.merge(built.model, getattr(torch, dtype))
    if save is not None:
        save(merged, built.tokenizer)
    values["merged"], sizes["merged"] = measured(merged, "merged"), model_bytes(merged)
    merged.float()                       # what `qpeft run --model DIR` loads (float32), then quantizes
    quantizer.quantize_model(merged, device="cpu")
    values["shipped"], sizes["shipped"] = measured(merged, "shipped"), model_bytes(merged)
    ppl = {stage: v["perplexity"] for stage, v in values.items()}
    return {"run": built.resolved["run"], "base_model": built.cfg.model or "embedded",
            "trained_with": {"quantizer": built.resolved["quantizer"]["name"],
                             "quantizer_options": built.resolved["quantizer"]["options"],
                             "adapter": built.resolved["adapter"]["spec"]},
            "quant": spec, "quantizer": pipeline.plugin_record(quantizer), "merged_dtype": dtype,
            "rank": rank, "validation_examples": len(plan.validation),
            "eval_tokens": values["trained"].get("eval_tokens"), "perplexity": ppl,
            "relative_gap": {"merged_vs_trained": _gap(ppl["merged"], ppl["trained"]),
                             "shipped_vs_trained": _gap(ppl["shipped"], ppl["trained"]),
                             "shipped_vs_merged": _gap(ppl["shipped"], ppl["merged"])},
            "model_mb": {k: round(v / 2**20, 3) for k, v in sizes.items()}}


def _gap(value: float, reference: float) -> float:
    return round(value / reference - 1, 6) if reference else math.nan


def export(run_dir, out, quantizer, spec: str, dtype: str = "float32", rank: int | None = None,
           max_shard_size: str = "500MB", say=print) -> dict:
    """Write the merged model + ``qpeft_quant.json`` + ``export_report.json`` to ``out`` (built
    beside it, swapped in only when complete); returns the report."""
    from qpeft.core.rundir import Staged
    from qpeft.core.version import __version__

    out = Path(out)
    with Staged(out) as staged:
        def save(merged, tokenizer):
            merged.save_pretrained(staged.path, max_shard_size=max_shard_size)
            tokenizer.save_pretrained(staged.path)

        report = measure(run_dir, quantizer, spec, dtype, rank, save, say)
        record = {"quant": spec, "quantizer": report["quantizer"], "qpeft_version": __version__,
                  "source_run": str(Path(run_dir).resolve()), "merged_dtype": dtype,
                  "load_with": f"qpeft run --model {out} --quant '{spec}'"}
        (staged.path / QUANT_FILE).write_text(json.dumps(record, indent=2))
        (staged.path / REPORT_FILE).write_text(json.dumps(report, indent=2))
        staged.commit()
    return report


def cached(run_dir, spec: str, say=print) -> dict:
    """The report of ``run_dir`` re-quantized with ``spec``, measured once and kept beside
    the run's other evaluations as ``export-<spec>.json`` (``qpeft compare --export-quant``)."""
    path = Path(run_dir) / f"export-{re.sub(r'[^A-Za-z0-9_.+-]', '_', spec)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    report = measure(run_dir, check_spec(spec), spec, say=say)
    path.write_text(json.dumps(report, indent=2))
    return report


def compare_columns(run_dir, spec: str, say=print) -> dict:
    """``qpeft compare --export-quant`` columns of one finished cell (on failure: None values
    and the error under "export_error"; the grid goes on)."""
    try:
        report = cached(run_dir, spec, say=say)
    except (QpeftError, RuntimeError, ValueError, OSError) as exc:
        say(f"  {Path(run_dir).name}: export measurement failed: {exc}")
        return {"export_ppl_trained": None, "export_ppl_merged": None, "export_ppl_shipped": None,
                "export_gap_pct": None, "export_error": str(exc).splitlines()[0]}
    ppl = report["perplexity"]
    return {"export_ppl_trained": ppl["trained"], "export_ppl_merged": ppl["merged"],
            "export_ppl_shipped": ppl["shipped"],
            "export_gap_pct": round(100 * report["relative_gap"]["shipped_vs_trained"], 3)}


def table(report: dict) -> str:
    """The three perplexities and their gaps, for people."""
    ppl, trained_q = report["perplexity"], report["trained_with"]["quantizer"]
    labels = {"trained": f"adapter on the {trained_q} base (trained)",
              "merged": f"merged, {report['merged_dtype']} (full precision)",
              "shipped": f"merged, re-quantized {report['quant']} (shipped)"}
    rows = [("model", "perplexity", "vs trained")]
    rows += [(labels[k], f"{ppl[k]:.4f}", "–" if k == "trained" else f"{_gap(ppl[k], ppl['trained']):+.2%}")
             for k in ("trained", "merged", "shipped")]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"shipped vs merged: {report['relative_gap']['shipped_vs_merged']:+.2%} · "
                 f"{report['validation_examples']} validation examples, {report['eval_tokens']} tokens · "
                 f"size {report['model_mb']['merged']:.1f} MB merged → {report['model_mb']['shipped']:.1f} MB "
                 "quantized in memory")
    return "\n".join(lines)
