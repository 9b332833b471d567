"""Memory and precision facts: peak GPU memory reserved/allocated, peak process RSS.

The seed paper reports *peak reserved* GPU memory (what the caching allocator holds,
which is what decides whether a job fits); qpeft reports both reserved and allocated.
"""
import contextlib
import resource
import sys

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def current_mb(device: torch.device) -> float:
    """Memory in use now: GPU allocated on CUDA, else the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def peaks(device: torch.device) -> dict:
    """The report's memory fields."""
    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        out["peak_gpu_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
        out["peak_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def autocast(device: torch.device, model=None):
    """bf16 autocast on CUDA (where it is supported); nothing on CPU, where the quantizer's
    compute dtype already decides the precision, nor for a model that holds its activations
    in float32 (``needs_float32_activations``, or ``compute_dtype=float32``): autocast would
    run its attention and head in bf16 in training but not in evaluation."""
    embeddings = model.get_input_embeddings() if model is not None else None
    if embeddings is not None and embeddings.weight.dtype == torch.float32:
        return contextlib.nullcontext()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
