"""Merged and re-quantized export, and what it costs in quality (``qpeft export --merge --quant``).

    rebuild(RUN)   adapter on the quantized base          ── quality "trained"  (what was trained)
                   + each layer's full-precision pre-image P (base_weights.py)
      merge ─▶     P + ΔW, full precision (--dtype)       ── quality "merged"
               ╰─▶ saved: safetensors + tokenizer + qpeft_quant.json
      Quantizer(SPEC).quantize_model                      ── quality "shipped"  (what is shipped)
      --calibrate N: GPTQ onto SPEC's grid (calibrate.py) ── quality "calibrated" (then the one saved)

Re-quantizing P + ΔW rather than the merged Ŵ + ΔW keeps the fine-tune: Ŵ is already on the
grid and a short fine-tune's ΔW rounds back onto it (base_weights.py, docs/deploy.md).

All three on the run's own validation split, with the run's template and eval limit, by one
metric of one of the run's evaluators with the options the run gave it (``--quality
EVALUATOR[:METRIC]``; by default the first evaluator with a primary metric — perplexity for
the default evaluators), so "trained" is the number in the run's report.

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

from qpeft.core.base import progress
from qpeft.core.base.errors import QpeftError

QUANT_FILE = "qpeft_quant.json"
REPORT_FILE = "export_report.json"
STAGES = {"trained": "adapter on the quantized base (trained)",
          "merged": "merged, full precision",
          "shipped": "merged and re-quantized (shipped)",
          "calibrated": "merged and re-quantized with GPTQ calibration"}


def check_spec(spec: str):
    """The quantizer of ``--quant SPEC``, built (so checked) before anything loads."""
    from qpeft.core.plugin import registry
    from qpeft.core.run.pipeline import build_plugin

    return build_plugin("quantizer", spec, registry.default())


def validation(run_dir, quality: str | None = None):
    """``(settings, plan, quality, record)`` of a finished run: the plan holds the one evaluator of
    ``quality`` (``EVALUATOR[:METRIC]``, as ``qpeft compare --edge-quality`` takes it; None:
    the first of the run's evaluators with a primary metric), with the options the run gave
    it, over the run's own validation split (template, --max-length, --eval-limit as its
    report used them)."""
    from qpeft.core.compare import metrics as compare_metrics
    from qpeft.core.run import pipeline
    from qpeft.core.plugin import registry
    from qpeft.core.run.record import RunRecord
    from qpeft.core.base.spec import split_list

    record = RunRecord.read(run_dir)
    cfg = record.settings(run_dir)
    specs = split_list(cfg.evaluators)
    chosen = compare_metrics.resolve_quality(quality, specs, registry.default(), flag="--quality")
    cfg.evaluators = specs[compare_metrics.evaluator_names(specs).index(chosen.evaluator)]
    return cfg, pipeline.plan(cfg, record), chosen, record


def quality_value(cfg, plan, quality, model, tokenizer, stage: str = "after") -> float:
    """``quality``'s metric for ``model`` on the run's validation split — any causal LM, e.g.
    one transformers read back from an exported file."""
    from qpeft.core.run import pipeline

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ctx = pipeline.eval_context(cfg, model, tokenizer, "cpu", plan.validation, plan.test)
    with progress.evaluating(f"{stage} {plan.evaluators[0].name}"):     # a bar while it evaluates
        result = plan.evaluators[0].evaluate(ctx(stage=stage, facts={}))
    value = result.get(quality.metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        why = result.get("error") or f"it reported {', '.join(result) or 'nothing'}"
        raise QpeftError(f"evaluator '{quality.evaluator}' gave no '{quality.metric}' for the {stage} model "
                         f"of {cfg.run_dir} ({why}); choose another with --quality EVALUATOR:METRIC")
    return float(value)


def measure(run_dir, quantizer, spec: str, dtype: str = "float32", rank: int | None = None,
            save=None, say=print, quality: str | None = None, checked=None, calibrate: int | None = None,
            road: str = "W+ΔW") -> dict:
    """Rebuild the run, merge, re-quantize with ``quantizer``; the report (see the module doc).
    ``checked``: what :func:`validation` returned for this run and ``quality``, if the caller
    already checked it. ``road``: "W+ΔW" re-quantizes the base's full-precision weights plus
    the adapter's update, "Ŵ+ΔW" the merged model as trained (:mod:`base_weights`).
    ``calibrate``: also round with GPTQ over that many of the run's training batches
    (:mod:`calibrate`); that model is then the one saved.

    ``save(model, tokenizer)`` is called with the full-precision model whose re-quantization
    is shipped (the merged one; with ``calibrate``, its GPTQ rounding, already on the grid).
    """
    import copy

    import torch

    from qpeft.core.compare import base_weights, calibrate as calibrating
    from qpeft.core.kinds.quantizer import model_bytes
    from qpeft.core.run import rebuild
    from qpeft.core.run.record import PluginRecord

    run_dir = Path(run_dir)
    cfg, plan, chosen, record = checked or validation(run_dir, quality)   # settings, evaluator, data: before the load
    grids = calibrating.grids_for(quantizer) if calibrate else None
    if calibrate and grids is None:
        raise QpeftError(f"--calibrate rounds onto a fixed 4-bit grid; '{spec}' has none "
                         "(nf4 and fp4 have; or --format gguf --gguf-type q4_0): drop --calibrate")
    label = f"{chosen.evaluator}:{chosen.metric}"
    say(f"qpeft: rebuilding {run_dir.name} to measure the merge and re-quantization ({spec}) by {label}")
    if road == "W+ΔW":
        built, pre = base_weights.rebuild(run_dir, record, plan, rank)
    else:
        built, pre = rebuild.rebuild(run_dir, rank=rank, record=record, plan=plan), {}   # the record read once

    def measured(model, stage):
        value = quality_value(cfg, plan, chosen, model, built.tokenizer, stage)
        say(f"  {STAGES[stage]}: {label} {value:.4f}")
        return value

    values, sizes = {"trained": measured(built.model, "trained")}, {"trained": model_bytes(built.model)}
    corrections = base_weights.corrections(built.model, pre)
    merged = built.composition.method.merge(built.model, torch.float32)
    base_weights.apply(merged, corrections)
    del corrections
    _cast(merged, getattr(torch, dtype))
    if save is not None and not calibrate:
        save(merged, built.tokenizer)
    values["merged"], sizes["merged"] = measured(merged, "merged"), model_bytes(merged)
    merged.float()                       # what `qpeft run --model DIR` loads (float32), then quantizes
    tuned = copy.deepcopy(merged) if calibrate else None
    quantizer.quantize_model(merged, device="cpu", progress=True)     # a bar per layer (HQQ: minutes)
    values["shipped"], sizes["shipped"] = measured(merged, "shipped"), model_bytes(merged)
    del merged
    calibration = None
    if calibrate:
        if built.tokenizer.pad_token is None:
            built.tokenizer.pad_token = built.tokenizer.eos_token
        data = calibrating.batches(cfg, plan, built.tokenizer, calibrate)
        names = {name for name, *_ in quantizer.targets(tuned)}
        say(f"  GPTQ over {calibrate} training batches ({sum(int(b['attention_mask'].sum()) for b in data)} "
            f"tokens), {len(names)} layers")
        errors = calibrating.calibrate(tuned, dict.fromkeys(names, grids), data)
        calibration = {"method": "GPTQ (Frantar et al. 2023, Algorithm 1), block by block", "batches": calibrate,
                       "tokens": sum(int(b["attention_mask"].sum()) for b in data), "damp": calibrating.gptq.DAMP,
                       **calibrating.summary(errors)}
        if save is not None:
            save(tuned, built.tokenizer)
        quantizer.quantize_model(tuned, device="cpu", progress=True)
        values["calibrated"] = measured(tuned, "calibrated")
    gaps = {"merged_vs_trained": _gap(values["merged"], values["trained"]),
            "shipped_vs_trained": _gap(values["shipped"], values["trained"]),
            "shipped_vs_merged": _gap(values["shipped"], values["merged"])}
    if calibrate:
        gaps["calibrated_vs_trained"] = _gap(values["calibrated"], values["trained"])
    return {"run": record.run, "base_model": record.model or "embedded",
            "trained_with": {"quantizer": record.quantizer.name, "quantizer_options": record.quantizer.options,
                             "adapter": record.adapter_spec},
            "quant": spec, "quantizer": PluginRecord.of(quantizer).to_dict(), "merged_dtype": dtype,
            "rank": rank, "validation_examples": len(plan.validation),
            "requantized_from": {"road": road, "what": base_weights.ROADS[road]},
            "calibration": calibration, "saved": "calibrated" if calibrate else "shipped",
            "quality": {"evaluator": chosen.evaluator, "metric": chosen.metric, "higher_is_better": chosen.higher,
                        "options": PluginRecord.of(plan.evaluators[0]).options},
            "values": values, "relative_gap": gaps,
            "model_mb": {k: round(v / 2**20, 3) for k, v in sizes.items()}}


def _cast(model, dtype) -> None:
    """The merged model in ``dtype`` (weights and the config transformers saves)."""
    model.to(dtype)
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype


def _gap(value: float, reference: float) -> float:
    return round(value / reference - 1, 6) if reference else math.nan


def export(run_dir, out, quantizer, spec: str, dtype: str = "float32", rank: int | None = None,
           max_shard_size: str = "500MB", say=print, quality: str | None = None, checked=None,
           calibrate: int | None = None, road: str = "W+ΔW") -> dict:
    """Write the merged model + ``qpeft_quant.json`` + ``export_report.json`` to ``out`` (built
    beside it, swapped in only when complete); returns the report."""
    from qpeft.core.base.rundir import Staged
    from qpeft.core.base.version import __version__

    out = Path(out)
    with Staged(out) as staged:
        def save(merged, tokenizer):
            merged.save_pretrained(staged.path, max_shard_size=max_shard_size)
            tokenizer.save_pretrained(staged.path)

        report = measure(run_dir, quantizer, spec, dtype, rank, save, say, quality, checked, calibrate, road)
        record = {"quant": spec, "quantizer": report["quantizer"], "qpeft_version": __version__,
                  "source_run": str(Path(run_dir).resolve()), "merged_dtype": dtype, "saved": report["saved"],
                  "requantized_from": report["requantized_from"]["road"],
                  "load_with": f"qpeft run --model {out} --quant '{spec}'"}
        (staged.path / QUANT_FILE).write_text(json.dumps(record, indent=2))
        (staged.path / REPORT_FILE).write_text(json.dumps(report, indent=2))
        staged.commit()
    return report


COMPARE_CALIBRATION = 8     # training batches of qpeft compare --export-quant's calibrated column


def cached(run_dir, spec: str, quality: str | None = None, say=print) -> dict:
    """The report of ``run_dir`` re-quantized with ``spec`` and measured by ``quality``, measured
    once and kept beside the run's other evaluations as ``export-<spec>.json`` (``qpeft compare
    --export-quant``); a kept report measured by another metric, or before the calibrated
    column existed, is measured again. Where ``spec``'s format has a grid, the report also
    holds GPTQ's calibrated re-quantization over :data:`COMPARE_CALIBRATION` training batches."""
    from qpeft.core.compare.calibrate import grids_for

    path = Path(run_dir) / f"export-{re.sub(r'[^A-Za-z0-9_.+-]', '_', spec)}.json"
    if path.is_file():
        kept = json.loads(path.read_text())
        by = kept.get("quality") or {}
        if ("values" in kept and "calibration" in kept
                and quality in (None, by.get("evaluator"), f"{by.get('evaluator')}:{by.get('metric')}")):
            return kept
    quantizer = check_spec(spec)
    calibrate = COMPARE_CALIBRATION if grids_for(quantizer) is not None else None
    report = measure(run_dir, quantizer, spec, say=say, quality=quality, calibrate=calibrate)
    path.write_text(json.dumps(report, indent=2))
    return report


def compare_columns(run_dir, spec: str, quality: str | None = None, say=print) -> dict:
    """``qpeft compare --export-quant`` columns of one finished cell (on failure: None values
    and the error under "export_error"; the grid goes on). The calibrated columns are None
    where ``spec``'s format has no grid (HQQ, int8)."""
    try:
        report = cached(run_dir, spec, quality, say=say)
    except (QpeftError, RuntimeError, ValueError, OSError) as exc:
        say(f"  {Path(run_dir).name}: export measurement failed: {exc}")
        return {"export_trained": None, "export_merged": None, "export_shipped": None,
                "export_gap_pct": None, "export_calibrated": None, "export_calibrated_gap_pct": None,
                "export_error": str(exc).splitlines()[0]}
    values, gaps = report["values"], report["relative_gap"]
    calibrated = gaps.get("calibrated_vs_trained")
    return {"export_trained": values["trained"], "export_merged": values["merged"],
            "export_shipped": values["shipped"],
            "export_gap_pct": round(100 * gaps["shipped_vs_trained"], 3),
            "export_calibrated": values.get("calibrated"),
            "export_calibrated_gap_pct": None if calibrated is None else round(100 * calibrated, 3)}


def table(report: dict) -> str:
    """The measurements and their gaps, for people."""
    values, trained_q, q = report["values"], report["trained_with"]["quantizer"], report["quality"]
    calibration = report.get("calibration")
    road = (report.get("requantized_from") or {}).get("road", "Ŵ+ΔW")
    labels = {"trained": f"adapter on the {trained_q} base (trained)",
              "merged": f"merged ({road}), {report['merged_dtype']} (full precision)",
              "shipped": f"merged, re-quantized {report['quant']}"
                         + (", plain rounding" if calibration else " (shipped)"),
              "calibrated": f"merged, re-quantized {report['quant']}, GPTQ over "
                            f"{(calibration or {}).get('batches')} batches (shipped)"}
    heading = q["metric"] if q["metric"] == q["evaluator"] else f"{q['evaluator']} {q['metric']}"
    rows = [("model", heading, "vs trained")]
    rows += [(labels[k], f"{values[k]:.4f}", "–" if k == "trained" else f"{_gap(values[k], values['trained']):+.2%}")
             for k in ("trained", "merged", "shipped", "calibrated") if k in values]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"shipped vs merged: {report['relative_gap']['shipped_vs_merged']:+.2%} "
                 f"({'higher' if q['higher_is_better'] else 'lower'} is better) · "
                 f"{report['validation_examples']} validation examples · "
                 f"size {report['model_mb']['merged']:.1f} MB merged → {report['model_mb']['shipped']:.1f} MB "
                 "quantized in memory")
    if calibration:
        lines.append(f"GPTQ: relative output error of the {calibration['layers']} layers on the calibration inputs "
                     f"{calibration['output_error_plain']:.2e} (nearest level) → {calibration['output_error_gptq']:.2e}")
    return "\n".join(lines)
