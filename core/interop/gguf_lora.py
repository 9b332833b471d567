"""A run's adapter as a llama.cpp LoRA adapter (``qpeft export --format gguf-lora``), and the
unmerged base it applies to (``--format gguf --no-merge``).

    adapted model ─▶ each LoRA layer's (A, B, s) = layer.low_rank()
                  ─▶ GGUF tensors ``blk.N.attn_q.weight.lora_a`` (r×in) and ``….lora_b`` (out×r),
                     named from gguf's tensor-name map; q/k's B rows permuted to llama.cpp's
                     rotary layout as the base's q/k rows are
                  ─▶ general.type = adapter, adapter.type = lora, adapter.lora.alpha

Facts from llama.cpp (no code taken): ``convert_lora_to_gguf.py`` names each pair after its
base tensor plus ``.lora_a``/``.lora_b``, keeps PEFT's A (r×in) and B (out×r), permutes q/k as
the base converter does (which moves only B's rows), writes ``adapter.lora.alpha`` as a float32
and no architecture hyper-parameters; ``llama-adapter.h`` applies
``W·x + scale·B·(A·x)`` with ``scale = adapter_scale·alpha/rank``, rank = B's ne[0] (its r
columns), or ``adapter_scale`` alone when alpha is 0. One alpha serves every layer, so a layer
whose s·r differs from it (rsLoRA's α/√r keeps one s·r; a rank pattern may not) has the ratio
folded into its B.

A plain low-rank update only: DoRA (which rescales the merged weight's columns) and IA³ (which
scales activations) have no such form — ship them merged (``--format gguf``).
"""
import numpy as np

from qpeft.core.base.errors import QpeftError

TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}   # as convert_lora_to_gguf --outtype
SUFFIXES = (".lora_a", ".lora_b")


def check_method(method) -> None:
    """Refuse, before the model loads, a method whose layers are not ``base + s·B·A``."""
    from qpeft.core.kinds.lowrank import LoRALinear, LowRankMethod

    layer = getattr(method, "layer_cls", None)
    plain = (isinstance(method, LowRankMethod) and isinstance(layer, type) and issubclass(layer, LoRALinear)
             and layer.forward is LoRALinear.forward and layer.merged_weight is LoRALinear.merged_weight)
    if not plain:
        raise QpeftError(f"--format gguf-lora writes a low-rank update s·B·A that llama.cpp adds to the base; "
                         f"'{method.name}' is not one: ship it merged with --format gguf (or --merge)")


def _name_map(model):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)


def pairs(model) -> tuple[float, list[tuple[str, np.ndarray, np.ndarray]]]:
    """``(alpha, [(base GGUF name, A, B)])`` of an adapted model, A (r×in) and B (out×r) float32
    in GGUF's layout, so that llama.cpp's ``alpha/r·B·A`` is each layer's ``s·B·A``."""
    from qpeft.core.interop.gguf_export import rotary_permute
    from qpeft.core.kinds.lowrank import LoRALinear

    config, names = model.config, _name_map(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    alpha, out = None, []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        a, b, s = layer.low_rank()
        r = a.shape[0]
        if r == 0 or s == 0:
            continue                             # a pruned layer: no update
        mapped = names.get_name(name)
        if mapped is None or (tied and mapped == "output"):
            raise QpeftError(f"--format gguf-lora cannot name the adapted layer '{name}' in llama.cpp's base "
                             "(an output head tied to the embeddings, or not a Llama layer): ship it merged with "
                             "--format gguf")
        alpha = s * r if alpha is None else alpha
        a = a.detach().float().cpu().numpy()
        b = b.detach().float().cpu().numpy() * np.float32(s / (alpha / r))
        if ".attn_q" in f".{mapped}":
            b = rotary_permute(b, heads)
        elif ".attn_k" in f".{mapped}":
            b = rotary_permute(b, kv_heads)
        out.append((f"{mapped}.weight", np.ascontiguousarray(a), np.ascontiguousarray(b)))
    if not out:
        raise QpeftError("this run's adapter has no low-rank layer with an update to write; nothing to export")
    return float(alpha), out


def write(model, path, type_name: str, name: str) -> dict:
    """The adapter of ``model`` as a llama.cpp LoRA GGUF at ``path``; a summary dict."""
    import gguf
    from gguf.quants import quantize

    from qpeft.core.interop.gguf_export import check_model

    check_model(model)
    alpha, found = pairs(model)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    kinds = {}
    for base, a, b in found:
        for suffix, array in zip(SUFFIXES, (a, b)):
            kind = _type_of(array, type_name)
            writer.add_tensor(base + suffix, quantize(array, kind), raw_dtype=kind)
            kinds[kind.name.lower()] = kinds.get(kind.name.lower(), 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from pathlib import Path

    return {"alpha": alpha, "layers": len(found), "rank": int(found[0][1].shape[0]), "tensors": kinds,
            "bytes": Path(path).stat().st_size}


def _type_of(array, type_name: str):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    kind = Q[TYPES[type_name]]
    return kind if array.shape[-1] % GGML_QUANT_SIZES[kind][0] == 0 else Q.F16


def read(path) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``(alpha, {base GGUF name: (A, B)})`` of a LoRA adapter GGUF, float32 (gguf's reader)."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    if reader.fields.get("general.type") is None or reader.fields["general.type"].contents() != "adapter":
        raise QpeftError(f"{path} is not a GGUF adapter (general.type is not 'adapter')")
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    halves: dict[str, dict] = {}
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        shape = tuple(int(n) for n in reversed(t.shape))          # ne → numpy's order
        halves.setdefault(base, {})[suffix] = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
    return alpha, {k: (v["lora_a"], v["lora_b"]) for k, v in halves.items()}


def apply(weight: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float, scale: float = 1.0) -> np.ndarray:
    """llama.cpp's update of one base tensor (GGUF layout): ``W + scale·alpha/r·B·A``."""
    r = b.shape[1]
    factor = scale * alpha / r if alpha else scale
    return weight + np.float32(factor) * (b @ a)


def unmerged(model):
    """The adapted ``model``'s base the adapter was trained on — each adapter layer's frozen
    base, dequantized (a base that LoftQ, PiSSA or OLoRA rewrote, as rewritten) — as a plain
    float32 model, adapter left out (in place)."""
    from qpeft.core.kinds.adapter_layers import AdapterLayer, merge_model

    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, AdapterLayer):
                setattr(parent, attr, child.base)
    import torch

    return merge_model(model, torch.float32)
