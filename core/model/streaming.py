"""Streaming load: build the model without weights, then fill it one checkpoint tensor at a time.

    config.json ──from_config, parameters on meta──▶ module tree (no weights; the small
                                                      non-persistent buffers, e.g. RoPE's
                                                      inv_freq, computed by the modules' own
                                                      __init__ on CPU)
    *.safetensors ──one tensor at a time──▶ target linear: float32 on the device
                                              ──Quantizer.quantize_one──▶ codes; fp32 freed
                                          └─▶ any other tensor: straight to the compute dtype

``models.load_model`` + ``Quantizer.quantize_model`` holds the whole model in float32 before
the first layer is quantized (7.1 GB peak RSS for a 1.17 B Llama). Here the peak is about
the quantized model plus two full-precision copies of the largest tensor (see
docs/benchmarks.md, "Loading"). The result is the same model: every layer goes through the
same :meth:`Quantizer.quantize_one` from the same float32 weight, everything else ends in
the compute dtype through :func:`cast_unquantized`, as in ``quantize_model``.

Each tensor is read through its own ``safe_open``, closed at once: safetensors memory-maps
the file, and pages of a mapping that stays open count in the process's RSS until it is
closed (a shard-long ``safe_open`` would add the whole shard to the peak).
"""
import ctypes
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from qpeft.core.model import models, quant_cache
from qpeft.core.model.generation import contiguous_head_input
from qpeft.core.base.errors import ModelLoadError
from qpeft.core.kinds.quantizer import LayerStats, cast_unquantized, tensor_bytes

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def load_quantized(spec: str | None, quantizer, device: str | torch.device = "cpu",
                   keep_source: bool = False, progress: bool = False, measure: bool = False,
                   float32_activations: bool = False, cache: bool = True, say=None):
    """``(model, tokenizer, facts)``: the model of ``spec`` quantized by ``quantizer`` on
    ``device``, never held in full precision.

    ``spec`` is anything :func:`qpeft.core.model.models.resolve` takes (None/"embedded", a
    directory, a Hugging Face id, a .gguf file — converted and cached as safetensors
    once). ``keep_source`` keeps each quantized layer's float32 weight on CPU as
    ``layer.source_weight`` (LoftQ), as ``quantize_model`` does; ``progress`` shows a bar
    over the quantized layers. ``float32_activations`` keeps every tensor outside the
    quantized layers (embeddings, norms, head) in float32, so the activations between
    layers are float32 and only the quantized matmuls run in the compute dtype (see
    :attr:`qpeft.core.kinds.adapter.Adapter.needs_float32_activations`). ``facts`` holds
    ``model_mb_before`` (the model's size in its checkpoint dtypes, from tensor headers),
    ``quantize_seconds`` (reading and quantizing every tensor) and ``load_seconds`` (all
    of it, with building the module tree and the tokenizer); with ``measure``, also
    ``layer_stats``: one :class:`~qpeft.core.kinds.quantizer.LayerStats` per quantized layer.

    With ``cache`` (the default) the quantized layers are read from the quantized-base cache
    (:mod:`qpeft.core.model.quant_cache`) when this base and quantizer are there, verified,
    and written there after a fresh quantization; ``facts["base_cache"]`` says which
    (``read``, ``written``, ``off``, ``not cacheable``, ``not kept``). ``keep_source`` and
    ``measure`` then read each layer's float32 weight from the checkpoint. ``say`` gets the
    cache's one-line notices (default: stderr).
    """
    started = time.perf_counter()
    device = torch.device(device)
    say = say or _stderr
    directory = _local_dir(spec)
    checkpoint = Checkpoint(directory)
    use = cache and quant_cache.limit_bytes() > 0
    key = reader = None
    if use and not quantizer.cacheable:
        say(f"quantized-base cache: {quantizer.name} does not implement layer_from_cache; quantizing afresh")
    elif use:
        key, reader = quant_cache.lookup(spec, quantizer, device, say)
        if reader is not None and keep_source:
            say("quantized-base cache: the quantized layers come from the cache; the adapter's "
                "source weights (keep_source) are read from the model's checkpoint")
    # First: loading it peaks above what it keeps, and the tensors then reuse what it freed.
    tokenizer = models.load_tokenizer(spec)
    model = _empty_model(directory)
    model.config.qpeft_source = spec or models.DEFAULT_MODEL
    keys = checkpoint.keys_for(model)
    size_before = checkpoint.bytes_for(model, keys)
    filled = time.perf_counter()
    plain = torch.float32 if float32_activations else quantizer.compute_dtype
    stats, layers = _fill(model, checkpoint, keys, quantizer, plain, device, keep_source, measure,
                          progress, reader)
    now = time.perf_counter()
    state = "off" if not use else "not cacheable" if key is None else "read" if reader else "written"
    if state == "written" and quant_cache.store(key, layers, _summary(spec, quantizer), say) is None:
        state = "not kept"
    cast_unquantized(model, plain, device)  # the computed buffers (RoPE)
    facts = {"model_mb_before": round(size_before / 2**20, 2), "base_cache": state,
             "quantize_seconds": round(now - filled, 2),
             "load_seconds": round(time.perf_counter() - started, 2)}  # with writing the cache
    if measure:
        facts["layer_stats"] = stats
    return model, tokenizer, facts


class Checkpoint:
    """The safetensors files of a model directory: which file holds each tensor, its
    shape and dtype (read from the headers alone), and :meth:`read` for one tensor."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        if (directory / INDEX).is_file():
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise ModelLoadError(f"{directory} has no {SINGLE} or {INDEX}; streaming load reads "
                                 "safetensors only (re-save the model with save_pretrained)")
        self.file, self.shape, self.dtype = {}, {}, {}
        for name in files:
            with safe_open(directory / name, framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    self.file[key] = directory / name
                    self.shape[key], self.dtype[key] = piece.get_shape(), piece.get_dtype()

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as a view of its file's memory map (no copy; the map closes when
        the view is freed — copy what you keep, then drop it)."""
        from safetensors import safe_open

        with safe_open(self.file[key], framework="pt") as f:
            return f.get_tensor(key)

    def find(self, model: nn.Module, name: str) -> str | None:
        """The checkpoint key of model tensor ``name``: as named, or with the model's
        ``base_model_prefix`` (``model.``) added or removed, as a bare base model's
        checkpoint names its tensors; None when absent."""
        prefix = getattr(model, "base_model_prefix", "") or ""
        for key in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if key in self.file:
                return key
        return None

    def keys_for(self, model: nn.Module) -> dict[str, str]:
        """Model name → checkpoint key of every parameter and persistent buffer the checkpoint
        holds; tied names share the key of whichever of them is stored. A parameter with no
        key is an error (transformers would initialise it randomly, with a warning)."""
        groups: dict[int, tuple] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            groups.setdefault(id(t), (t, []))[1].append(name)
        keys = {}
        for t, names in groups.values():
            key = next((k for n in names if (k := self.find(model, n)) is not None), None)
            if key is None and t.is_meta:
                raise ModelLoadError(f"the checkpoint has no tensor for '{names[0]}'; is it a "
                                     f"checkpoint of this architecture ({type(model).__name__})?")
            if key is not None:
                keys.update(dict.fromkeys(names, key))
        return keys

    def bytes_for(self, model: nn.Module, keys: dict[str, str]) -> int:
        """The model's size in its checkpoint dtypes: the stored tensors it uses (each once),
        from the headers, plus the buffers it computed itself."""
        total = sum(_numel(self.shape[k]) * _DTYPES[self.dtype[k]].itemsize for k in set(keys.values()))
        return total + tensor_bytes(b for name, b in model.named_buffers() if name not in keys)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _local_dir(spec) -> Path:
    """The model's directory: ``models.resolve``'s answer, or a Hub snapshot of its files."""
    source = models.resolve(spec)
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=_HUB_FILES))
    except Exception as exc:  # offline, unknown id, auth: one line either way
        raise ModelLoadError(f"could not fetch model '{spec}' ({type(exc).__name__}); this machine "
                             "may be offline: pass a local directory or a .gguf file") from None


def _empty_model(directory: Path) -> nn.Module:
    """The model of ``directory/config.json`` with every parameter on the meta device.

    accelerate's ``init_empty_weights(include_buffers=False)`` leaves buffers real, so the
    modules compute their non-persistent buffers in ``__init__`` exactly as when loading
    normally. It re-creates each parameter on meta, which unties tied ones, so they are
    tied again here (``tie_weights``). float32, as ``models.load_model``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    model.eval()  # as from_pretrained; the quantized layers, made later, keep nn.Module's default
    contiguous_head_input(model)
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def _place(view: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A copy of ``view`` on ``device`` in ``dtype``. Off CPU the view goes over as stored
    and is cast there, so the host holds no more than the view's mapped pages."""
    if device.type != "cpu":
        view = view.to(device)
    return view.to(dtype=dtype, copy=view.device.type == "cpu")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _summary(spec, quantizer) -> dict:
    """What ``qpeft cache list`` shows of an entry: the model as named, the quantizer's spec
    (options that differ from their defaults), the compute dtype."""
    defaults = quantizer.Options()
    changed = [f"{f.name}={getattr(quantizer.options, f.name)}" for f in dataclasses.fields(quantizer.options)
               if f.name != "compute_dtype" and getattr(quantizer.options, f.name) != getattr(defaults, f.name)]
    return {"model": str(spec or models.DEFAULT_MODEL), "quantizer": ":".join([quantizer.name, *changed]),
            "compute_dtype": quantizer.options.compute_dtype}


def _from_cache(name, meta, checkpoint, keys, quantizer, device, reader, keep_source, measure):
    """Target ``name`` rebuilt from the cache's tensors, and its LayerStats; the float32 weight
    is read from the checkpoint only for ``keep_source`` or ``measure``."""
    linear = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device="meta")
    layer = quantizer.layer_from_cache(reader.tensors(name, device), linear)
    w, err = None, None
    if keep_source or measure:
        view = checkpoint.read(keys[f"{name}.weight"])
        w = view.to(torch.float32, copy=True)
        del view
    if measure:
        err = (torch.linalg.norm(w - layer.dequantize().cpu()) / torch.linalg.norm(w)).item()
    if keep_source:
        layer.source_weight = w
    before = 4 * meta.weight.numel() + (0 if meta.bias is None else 4 * meta.bias.numel())
    return layer, LayerStats(name, meta.weight.numel(), before, layer.storage_bytes(), err)


def _fill(model, checkpoint: Checkpoint, keys, quantizer, plain, device, keep_source, measure, progress,
          reader=None):
    """Load every tensor outside the target linears in ``plain`` (the dtype of the layers left
    unquantized), then quantize each target from its float32 weight (or, with a cache
    ``reader`` that holds it, rebuild it from the cache); returns the targets' LayerStats
    and the quantized layers by name.

    The plain tensors go first: the largest of them (embedding, lm_head) are then copied
    while little else is held, and the peak is reached at the end, with the quantized
    model plus one linear layer's transients.
    """
    from tqdm.auto import tqdm

    targets = quantizer.targets(model)
    _fill_plain(model, checkpoint, keys, plain, device, {id(t[3]) for t in targets})
    stats, layers = [], {}
    cached = reader is not None and all(t[0] in reader.layers for t in targets)
    for name, parent, attr, meta in tqdm(targets, unit="layer", disable=not progress,
                                         desc=f"loading {'from the cache' if cached else 'and quantizing'} ({quantizer.name})"):
        if cached:
            layer, layer_stats = _from_cache(name, meta, checkpoint, keys, quantizer, device, reader,
                                             keep_source, measure)
            setattr(parent, attr, layer)
            stats.append(layer_stats)
            layers[name] = layer
            continue
        linear = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None,
                           device="meta")
        for part in ("weight", "bias") if meta.bias is not None else ("weight",):
            view = checkpoint.read(keys[f"{name}.{part}"])
            setattr(linear, part, nn.Parameter(_place(view, device, torch.float32), requires_grad=False))
            del view
        layer, layer_stats = quantizer.quantize_one(name, linear, device, measure, keep_source)
        setattr(parent, attr, layer)
        stats.append(layer_stats)
        layers[name] = layer
        del linear, meta
        _trim_heap()
    return stats, layers


def _fill_plain(model, checkpoint: Checkpoint, keys, dtype, device, skip: set) -> None:
    """Every tensor on meta outside the modules in ``skip`` (ids), and every buffer the
    checkpoint holds: read once (floating ones in ``dtype``) on ``device``, and shared by
    tied names (one Parameter)."""
    loaded: dict[int, tuple] = {}  # id(old tensor) -> (old tensor, new); holding old keeps ids unique
    for module_name, module in model.named_modules():
        if id(module) in skip:
            continue
        for store in (module._parameters, module._buffers):
            for attr, t in store.items():
                full = f"{module_name}.{attr}".lstrip(".")
                if t is None or not (t.is_meta or (store is module._buffers and full in keys)):
                    continue
                if id(t) not in loaded:
                    view = checkpoint.read(keys[full])
                    new = _place(view, device, dtype if view.is_floating_point() else view.dtype)
                    if store is module._parameters:
                        new = nn.Parameter(new, requires_grad=False)
                    loaded[id(t)] = (t, new)
                    del view
                    _trim_heap()
                store[attr] = loaded[id(t)][1]


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to call
        return None


def _trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    glibc serves blocks under its dynamic mmap threshold (up to 32 MB) from the heap, and
    the small quantized buffers allocated between the freed full-precision weights keep
    those pages resident: on a 150 M-parameter Llama, RSS grew 22 MB per layer instead of
    the 6 MB the layer's codes hold, and trimming after each tensor removed the difference.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
