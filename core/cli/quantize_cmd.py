"""``qpeft quantize``: quantize a model and print what it cost and what it saved (Table 4.1).

    load model ──model_bytes──▶ size before
               ──quantize_model(measure=True)──▶ per layer: bytes, ‖W−Ŵ‖/‖W‖
               ──model_bytes──▶ size after

Nothing is saved but the quantized-base cache (docs/cache.md): a model other than ``tiny``
is streamed and quantized by ``streaming.load_quantized`` (its layers read from the cache when
that base and quantizer are there; ``--no-cache`` quantizes afresh, to time it). ``--model tiny`` quantizes the random two-layer
model of :mod:`qpeft.core.kit.testing` (hidden size 64) — a smoke test that needs no model files.
"""
import dataclasses
import json
import time

import click

from qpeft.core.cli import params

from qpeft.core.plugin import registry
from qpeft.core.base.errors import OptionsError
from qpeft.core.base.spec import format_spec, parse

TINY = "tiny"


def build_quantizer(spec: str):
    """A Quantizer instance from ``name[:key=value...]``, e.g. ``hqq:nbits=2``."""
    parts = parse(spec)
    if len(parts) != 1:
        raise OptionsError(f"--quant takes one quantizer, got '{spec}'; "
                           "run one command per quantizer, e.g. --quant hqq:nbits=2")
    name, values = parts[0]
    return registry.get("quantizer", name).from_values(values)


def load(model_spec: str | None):
    """The model to measure: ``tiny``, or anything :func:`qpeft.core.model.models.load_model` takes."""
    if model_spec == TINY:
        from qpeft.core.kit.testing import tiny_model

        return tiny_model(vocab_size=1000)
    from qpeft.core.model.models import load_model

    return load_model(model_spec)[0]


def measure(model, quantizer, device: str = "cpu", progress: bool = False) -> dict:
    """Quantize ``model`` in place and return the Table 4.1 figures as a JSON-able dict."""
    from qpeft.core.kinds.quantizer import model_bytes

    before = model_bytes(model)
    dtype_before = str(next(model.parameters()).dtype).removeprefix("torch.")
    start = time.perf_counter()
    stats = quantizer.quantize_model(model, device=device, measure=True, progress=progress)
    return figures(model, quantizer, stats, before, dtype_before, time.perf_counter() - start)


def measure_streamed(model_spec, quantizer, device: str = "cpu", progress: bool = False,
                     cache: bool = True) -> dict:
    """The figures of :func:`measure` for ``model_spec`` loaded by ``streaming.load_quantized``
    (through the quantized-base cache unless ``cache`` is False; ``base_cache`` says how)."""
    from qpeft.core.model import streaming

    model, _, facts = streaming.load_quantized(model_spec, quantizer, device, measure=True,
                                               progress=progress, cache=cache)
    before = round(facts["model_mb_before"] * 2**20)
    report = figures(model, quantizer, facts["layer_stats"], before, "checkpoint dtypes", facts["quantize_seconds"])
    return {**report, "base_cache": facts["base_cache"]}


def figures(model, quantizer, stats, before: int, dtype_before: str, seconds: float) -> dict:
    """The Table 4.1 figures of a quantized ``model`` from its layers' ``stats``."""
    from qpeft.core.kinds.quantizer import model_bytes

    if not stats:
        raise OptionsError("the model has no linear layers to quantize; pass another --model")
    weights = sum(s.weights for s in stats)
    errors = [s.rel_error for s in stats]
    worst = max(stats, key=lambda s: s.rel_error)
    return {
        "model": getattr(model.config, "qpeft_source", None),
        "quantizer": quantizer.name,
        "options": dataclasses.asdict(quantizer.options),
        "layers": len(stats),
        "quantized_weights": weights,
        "bytes_before": before,
        "dtype_before": dtype_before,
        "bytes_after": model_bytes(model),
        "bytes_per_weight": sum(s.bytes_after for s in stats) / weights,
        "rel_error_mean": sum(errors) / len(errors),
        "rel_error_worst": worst.rel_error,
        "worst_layer": worst.name,
        "seconds": seconds,
        "per_layer": [{"name": s.name, "weights": s.weights,
                       "bytes_per_weight": s.bytes_after / s.weights,
                       "rel_error": s.rel_error} for s in stats],
    }


def human_bytes(n: int) -> str:
    """``135.0 MB`` / ``1.35 GB`` (decimal units, as model cards use)."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def render(report: dict, spec: str, layers: bool) -> str:
    """The human-readable table."""
    ratio = report["bytes_before"] / report["bytes_after"]
    lines = [
        f"model            {report['model']}",
        f"quantizer        {spec}",
        f"linear layers    {report['layers']} ({report['quantized_weights'] / 1e6:.1f} M weights)",
        f"size before      {human_bytes(report['bytes_before'])} ({report['dtype_before']})",
        f"size after       {human_bytes(report['bytes_after'])} ({ratio:.2f}x smaller)",
        f"bytes/weight     {report['bytes_per_weight']:.4f} (quantized linear layers, all tensors held)",
        f"rel. error       mean {report['rel_error_mean']:.4f}, worst {report['rel_error_worst']:.4f}"
        f" ({report['worst_layer']})",
        f"time             {report['seconds']:.1f} s (quantizing and measuring"
        + (", quantized layers from the cache)" if report.get("base_cache") == "read" else ")"),
    ]
    if layers:
        lines += ["", f"{'layer':<40} {'weights':>10} {'bytes/w':>8} {'rel.err':>8}"]
        lines += [f"{r['name']:<40} {r['weights']:>10} {r['bytes_per_weight']:>8.4f} "
                  f"{r['rel_error']:>8.4f}" for r in report["per_layer"]]
    return "\n".join(lines)


@click.command("quantize")
@click.option("--quant", "spec", default="nf4", show_default=True, metavar="SPEC",
              help="Quantizer as name[:key=value...], e.g. hqq:nbits=2 or nf4:double_quant=false.")
@click.option("--model", "model_spec", default=None, metavar="MODEL",
              help="Hugging Face id or directory, a .gguf file, or 'tiny'; default: the embedded model.")
@click.option("--device", default="cpu", show_default=True, callback=params.device, help="Where to quantize (cpu, cuda, ...).")
@click.option("--layers", is_flag=True, help="Also list every layer's bytes/weight and error.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--no-cache", "no_cache", is_flag=True,
              help="Quantize afresh even when the quantized-base cache holds this model and quantizer.")
def quantize_command(spec: str, model_spec: str | None, device: str, layers: bool, as_json: bool,
                     no_cache: bool) -> None:
    """Quantize a model and report size before/after, bytes/weight, ‖W−Ŵ‖/‖W‖ and time.

    \b
    Examples:  qpeft quantize --quant hqq:nbits=2
               qpeft quantize --quant nf4:double_quant=false --layers
    """
    quantizer = build_quantizer(spec)
    if model_spec == TINY:
        report = measure(load(model_spec), quantizer, device=device, progress=not as_json)
    else:
        report = measure_streamed(model_spec, quantizer, device, progress=not as_json, cache=not no_cache)
    spec = format_spec(parse(spec))
    if as_json:
        if not layers:
            report.pop("per_layer")
        click.echo(json.dumps({"spec": spec, **report}, indent=2, default=str))
    else:
        click.echo(render(report, spec, layers))
