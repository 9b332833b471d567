"""The files of a PEFT adapter directory, checked before any model loads: the directory holds
``adapter_config.json`` and ``adapter_model.safetensors`` (never pickle), the config is a JSON
mapping, the safetensors header names LoRA/DoRA/IA3 tensors of one adapter under PEFT's
prefix, and lora_A's rows agree with the config's ``r``. No tensor is read here.
Used by :mod:`qpeft.core.interop.peft_import`, which interprets the config.
"""
import json
from pathlib import Path

from qpeft.core.base.errors import QpeftError
from qpeft.core.kinds.peft_format import CONFIG, PREFIX, WEIGHTS

TENSORS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight",  # PEFT name → key in our layers
           "lora_magnitude_vector": "lora_magnitude_vector", "ia3_l": "ia3_l", "lora_E": "lora_E"}
BARE = {"lora_A": "lora_A", "lora_B": "lora_B"}   # AdaLoRA's P and Q: parameters, saved without ".weight"


def check_directory(directory: Path) -> None:
    """The directory exists and holds the config and the safetensors weights (not pickle)."""
    if not directory.is_dir():
        raise QpeftError(f"no adapter directory at {directory}; pass a directory holding {CONFIG} and {WEIGHTS}")
    if not (directory / CONFIG).is_file():
        hint = (f"; for a qpeft run directory pass {directory / 'adapter'}"
                if (directory / "adapter" / CONFIG).is_file() else
                f"; pass a PEFT adapter directory ({CONFIG} + {WEIGHTS})")
        raise QpeftError(f"{directory} has no {CONFIG}{hint}")
    if not (directory / WEIGHTS).is_file():
        if (directory / "adapter_model.bin").is_file():
            raise QpeftError(f"{directory} holds adapter_model.bin (pickle), which qpeft does not load because "
                             f"unpickling runs code; save it again with PEFT as {WEIGHTS} "
                             f"(save_pretrained(..., safe_serialization=True))")
        raise QpeftError(f"{directory} has no {WEIGHTS}; pass a complete adapter directory")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise QpeftError(f"{path} is not readable JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise QpeftError(f"{path} must hold a mapping of adapter settings; it holds a {type(data).__name__}")
    return data


def header(path: Path, fix: str = "save or download the adapter again") -> dict[str, tuple]:
    """Tensor names and shapes from a safetensors header (no tensor is read); the header must
    cover the whole file, so a truncated file is refused here, with ``fix`` as what to do."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise QpeftError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}); "
                         f"it may be truncated: {fix}") from None


def check_fits(directory: Path, model_spec, base_model) -> None:
    """Before the model loads: each adapter tensor's shape against the base model's linear
    layers, read from its config (:func:`qpeft.core.model.models.linear_shapes`); an adapter made
    for another model is one line naming the tensor, both shapes and the adapter's base."""
    from qpeft.core.model import models

    layers = models.linear_shapes(model_spec)
    if layers is None:
        return
    shapes = header(directory / WEIGHTS)
    names, _ = tensor_names(directory / WEIGHTS, shapes)
    model = model_spec or models.EMBEDDED
    other = (f"; the adapter was made for '{base_model}' (its metadata): pass that one with --model"
             if base_model else "; the adapter was made for another base model: pass that one with --model")
    for key, (module, ours) in names.items():
        if module not in layers:
            raise QpeftError(f"{directory / WEIGHTS} holds {ours} for {module}, a layer {model} does not have{other}")
        if layers[module] is None:   # not a linear layer: the load says why it cannot be adapted
            continue
        fan_in, fan_out = layers[module]
        shape, need = shapes[key], _expected(ours, shapes[key], fan_in, fan_out)
        if need is not None and tuple(shape) != need:
            raise QpeftError(f"{directory / WEIGHTS}: {module}.{ours} is {list(shape)}, but {model}'s {module} "
                             f"needs {list(need)} (in {fan_in}, out {fan_out}){other}")


def _expected(ours: str, shape: tuple, fan_in: int, fan_out: int) -> tuple | None:
    """The shape a tensor of this kind must have on a layer of that size (its rank as saved)."""
    if ours == "lora_A.weight" and len(shape) == 2:
        return shape[0], fan_in
    if ours == "lora_B.weight" and len(shape) == 2:
        return fan_out, shape[1]
    if ours == "lora_magnitude_vector" and len(shape) == 1:
        return (fan_out,)
    if ours == "ia3_l" and len(shape) == 2:   # [out, 1]; [1, in] on a feed-forward layer
        return (1, fan_in) if shape[0] == 1 and shape[1] != 1 else (fan_out, 1)
    return None


def tensor_names(path: Path, shapes: dict) -> tuple[dict, list[str]]:
    """``({file key: (module path, our key)}, [problems])``: PEFT's ``….lora_A.weight``, and
    the ``….lora_A.default.weight`` form some tools save with the adapter's name."""
    out, adapters, problems = {}, set(), []
    for key in shapes:
        parts = key[len(PREFIX):].split(".") if key.startswith(PREFIX) else []
        at = next((i for i, p in enumerate(parts) if p in TENSORS or p.startswith("lora_embedding_")), None)
        module, name, rest = ".".join(parts[:at or 0]), parts[at] if at is not None else "", parts[(at or 0) + 1:]
        rest = rest[:-1] if rest[-1:] == ["weight"] else rest
        if not key.startswith(PREFIX):
            problems.append(f"{path} holds '{key}', not under PEFT's '{PREFIX}'; is it a PEFT adapter?")
        elif at is None:
            problems.append(f"{path} holds '{key}', which is no LoRA/DoRA/IA3 tensor (a whole module from "
                            f"modules_to_save, or a bias?); qpeft loads adapter tensors only")
        elif name.startswith("lora_embedding_"):   # the root cause of any stray embedding tensor: first
            problems.insert(0, f"{path} holds a LoRA on the embedding {module}; qpeft adapts linear layers "
                            f"only: retrain without it in target_modules")
        elif len(rest) > 1 or name in BARE and rest and not key.endswith(".weight"):
            problems.append(f"{path} holds '{key}', a tensor name qpeft does not know (a LoRA bias?)")
        elif (module, ours := BARE[name] if name in BARE and not key.endswith(".weight")
               else TENSORS[name]) in out.values():
            problems.append(f"{path} holds {ours} for {module} twice (e.g. '{key}')")
        else:
            adapters.update(rest)
            out[key] = (module, ours)
    if len(adapters) > 1:
        problems.append(f"{path} holds several adapters ({', '.join(sorted(adapters))}); save one of them")
    if not shapes:
        problems.append(f"{path} holds no tensors")
    return out, problems


def check_ranks(config: dict, names: dict, shapes: dict, where: Path) -> None:
    """lora_A's rows are the rank: each must be the config's r (else: rank_pattern, or a mix-up)."""
    r = config.get("r")
    if config.get("peft_type") != "LORA" or not isinstance(r, int) or config.get("rank_pattern"):
        return
    for key, (module, ours) in names.items():
        if ours == "lora_A.weight" and shapes[key][0] != r:
            raise QpeftError(f"{module}: lora_A.weight has rank {shapes[key][0]}, but {where} says r={r}; "
                             f"the config does not belong to these tensors")
