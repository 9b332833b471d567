"""Adapters from other tools: a plain Hugging Face PEFT adapter directory, as PEFT, Unsloth,
axolotl or LLaMA-Factory write it, read into a qpeft adapter spec and loaded over any quantizer.

    adapter_config.json ─────────▶ every field checked ─▶ each adapter plugin's from_peft_config
    adapter_model.safetensors ───▶ header only: which layers, ranks     ─▶ spec "lora:r=8:…+rslora"
        (both before the model loads: ``read``)
    … model loaded, quantized, ``compose(spec).attach(model)`` …
    Imported.load(model) ─▶ tensors under PEFT's names (or ``….lora_A.default.weight``),
                            every shape checked against the layer, copied in

No plugin is named here. A method (exactly one) and any modifiers claim a config through the
declared hook :meth:`qpeft.core.kinds.adapter.Adapter.from_peft_config`; every field the config
sets must be read by a claiming plugin, be harmless at its value (``bias: none``,
``init_lora_weights: true``…) or describe the file (``peft_version``…); anything else is
refused in one line naming the field and what to do. A directory that ``qpeft`` itself wrote
(with ``qpeft_adapter.json``) is read from that manifest instead, exactly.
The files themselves are checked in :mod:`qpeft.core.interop.peft_files`.
"""
import dataclasses
import json
import re
from pathlib import Path

from qpeft.core.interop import peft_files
from qpeft.core.base.errors import QpeftError
from qpeft.core.kinds.peft_format import CONFIG, MANIFEST, WEIGHTS

# Fields that describe the file, or matter only together with a field checked on its own.
DESCRIBE = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
            "revision", "inference_mode", "exclude_modules",  # folded into target_modules here
            "layers_pattern",                                  # only with layers_to_transform
            "loftq_config", "eva_config", "corda_config", "lora_ga_config",  # only with that init
            "megatron_core", "qalora_group_size",              # only with megatron_config, use_qalora
            "ensure_weight_tying", "init_ia3_weights"}
# Values that leave a loaded adapter unchanged (any field: None, False, "", [], {}).
HARMLESS = {"bias": ("none",),
            "init_lora_weights": (True, "gaussian", "orthogonal", "eva")}  # A and B are loaded over them
ADVICE = {  # field → what to do, for the fields users meet most
    "rank_pattern": "qpeft uses one r for every layer; retrain without rank_pattern",
    "alpha_pattern": "qpeft uses one lora_alpha for every layer; retrain without alpha_pattern",
    "modules_to_save": "those modules were trained whole, outside the adapter, and qpeft loads adapter "
                       "tensors only; retrain without modules_to_save, or merge the adapter with PEFT "
                       "(merge_and_unload) and pass the merged model with --model",
    "layers_to_transform": "qpeft selects layers by name; in adapter_config.json replace it by a "
                           "target_modules regex naming those layers (e.g. '.*\\.(0|1)\\.self_attn\\.q_proj')",
    "bias": "the adapter trained the base model's biases too; qpeft loads adapters with bias 'none' only",
    "fan_in_fan_out": "that is for GPT-2-style Conv1D layers; qpeft adapts nn.Linear layers only",
    "lora_bias": "qpeft's LoRA has no bias on lora_B; retrain with lora_bias=False",
    "init_lora_weights": "that initialisation rewrote the base model's weights, which qpeft cannot rebuild; "
                         "convert it to a plain LoRA with PEFT first (save_pretrained(..., "
                         "path_initial_model_for_weight_conversion=...))",
    "use_dora": "no installed adapter method reads DoRA adapters",
    "use_rslora": "no installed scaling modifier reads it",
}
SPEC_CHARS = set(":+=,")  # cannot appear inside a spec value


@dataclasses.dataclass
class Imported:
    """An adapter directory, read and checked; ``load`` fills an attached model with it."""

    directory: Path
    spec: str                 # the qpeft adapter spec it amounts to
    composition: object       # compose(spec): attach it, then load
    base_model: str | None    # adapter_config.json's base_model_name_or_path
    written_by_qpeft: bool
    names: dict = dataclasses.field(default_factory=dict)    # file key → (module path, our key)
    config: dict = dataclasses.field(default_factory=dict)   # adapter_config.json

    def load(self, model) -> None:
        """Copy the tensors into ``model``'s adapter layers (attached with ``composition``),
        or fail with one line naming the module: a missing tensor, a shape that differs
        (an adapter made for another base model), tensors for a layer the model lacks."""
        from qpeft.core.kinds import peft_format

        if self.written_by_qpeft:
            states = peft_format.read_calibration(self.directory)   # EVA's ranks, CorDA's init…
            if states:
                self.composition.method.restore_calibration(model, states)
            peft_format.load_tensors(model, self.directory)
            return
        from qpeft.core.kinds.adapter_layers import TensorShapeError, adapter_layers

        saved: dict = {}
        for key, tensor in peft_format.read_tensors(self.directory / WEIGHTS).items():
            path, ours = self.names[key]
            saved.setdefault(path, {})[ours] = tensor
        layers = adapter_layers(model)
        for path, layer in layers.items():
            got = saved.pop(path, {})
            for key, own in layer.adapter_tensors().items():
                if key not in got:
                    raise QpeftError(f"{self.directory / WEIGHTS} has no {key} for {path} (this model's layer "
                                     f"needs {list(own.shape)}); the file is incomplete, or the adapter "
                                     f"was made for another base model")
            extra = sorted(set(got) - set(layer.adapter_tensors()))
            if extra:
                raise QpeftError(f"{self.directory / WEIGHTS} has {extra[0]} for {path}, which the adapter "
                                 f"'{self.composition.method.name}' does not hold; check use_dora in {CONFIG}")
            try:   # the layer checks the shapes (AdaLoRA takes a pruned rank, QDyLoRA any rank ≤ its own)
                layer.load_adapter_tensors(got)
            except TensorShapeError as exc:
                raise QpeftError(f"{path}: the adapter's {exc}{self._other_model()}") from None
        if saved:
            self._unused(model, sorted(saved)[0])
        self._check_complete(model, layers)

    def _unused(self, model, path: str) -> None:
        where = f"{self.directory / WEIGHTS} has tensors for {path}, which"
        if path in dict(model.named_modules()):
            raise QpeftError(f"{where} is not a quantized linear layer of this model, so qpeft cannot adapt it "
                             f"(an output head the quantizer leaves in full precision?)")
        raise QpeftError(f"{where} this model does not have{self._other_model()}")

    def _check_complete(self, model, layers: dict) -> None:
        """Every layer the config's target_modules selects has tensors (PEFT saves all)."""
        rule = _selector(self.config)
        if rule is None:
            return
        from qpeft.core.kinds.quantizer import QuantizedLinear

        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for name, module in model.named_modules():
            if isinstance(module, QuantizedLinear) and module is not head and name not in layers \
                    and not any(name.startswith(p + ".") for p in layers) and rule(name):
                raise QpeftError(f"{self.directory / CONFIG}'s target_modules selects {name}, but {WEIGHTS} "
                                 f"has no tensors for it; the file is incomplete, or made for another base model")

    def _other_model(self) -> str:
        named = f" ('{self.base_model}'): pass that one with --model" if self.base_model else ""
        return f"; the adapter was made for another base model{named}"


def read(directory, registry=None, given: str = "") -> Imported:
    """Read and check an adapter directory before any model loads; one line on any problem.

    ``given`` is an adapter spec the user typed beside it (``--adapter``): refused unless it
    amounts to the same adapter.
    """
    from qpeft.core.plugin import registry as registries

    registry = registry or registries.default()
    directory = Path(directory)
    peft_files.check_directory(directory)
    imported = (_read_qpeft if (directory / MANIFEST).is_file() else _read_peft)(directory, registry)
    if given:
        _check_given(given, imported, registry)
    return imported


def load_adapter(model, directory, registry=None):
    """Attach the adapter saved in ``directory`` — written by qpeft, or a plain PEFT adapter
    from PEFT, Unsloth, axolotl or LLaMA-Factory — to the quantized ``model`` and load its
    tensors (checked first, one line on any problem); returns its Composition
    (``.method.save(model, dir)``, ``.method.merge(model)``). Public as ``qpeft.load_adapter``."""
    imported = read(directory, registry)
    imported.composition.attach(model)
    imported.load(model)
    return imported.composition


# -- qpeft's own adapters ----------------------------------------------------------------
def _read_qpeft(directory: Path, registry) -> Imported:
    from qpeft.core.kinds.adapter import assemble
    from qpeft.core.kinds.peft_format import read_manifest

    record = read_manifest(directory)
    peft_files.header(directory / WEIGHTS)   # a truncated file is refused before any model loads
    try:
        parts = [(p["name"], p["options"]) for p in record["parts"]]
        spec = record["spec"]
    except (KeyError, TypeError):
        raise QpeftError(f"{directory / MANIFEST} is damaged (no 'parts' with names and options); "
                         f"delete it to read the directory as a plain PEFT adapter") from None
    composition = assemble(parts, registry, spec)
    return Imported(directory, spec, composition, record.get("base_model"), True)


# -- PEFT's adapters ---------------------------------------------------------------------
def _read_peft(directory: Path, registry) -> Imported:
    from qpeft.core.kinds.adapter import compose
    from qpeft.core.base.spec import format_spec

    where = directory / CONFIG
    config = peft_files.read_json(where)
    shapes = peft_files.header(directory / WEIGHTS)
    names, problems = peft_files.tensor_names(directory / WEIGHTS, shapes)
    paths = sorted({path for path, _ in names.values()})
    resolved = _resolve_targets(config, paths, where)
    method, modifiers, read_fields = _claims(resolved, registry, where)
    _refuse_unread(config, read_fields, where)      # a field first: it says why a tensor is odd
    if problems:
        raise QpeftError(problems[0])
    peft_files.check_ranks(config, names, shapes, where)
    parts = [(cls.name, values) for cls, values in [method, *modifiers]]
    spec = format_spec([(name, {k: _text(v, where) for k, v in values.items()}) for name, values in parts])
    try:
        composition = compose(spec, registry)
    except QpeftError as exc:
        raise QpeftError(f"{where}: {exc}") from None
    return Imported(directory, spec, composition, config.get("base_model_name_or_path"), False,
                    names, config)


def _resolve_targets(config: dict, paths: list[str], where: Path) -> dict:
    """The config with ``target_modules`` (and IA3's ``feedforward_modules``) as lists the
    ``targets`` option takes: PEFT's list of names as it is, ``"all-linear"`` as ours;
    a regex, or any ``exclude_modules``, as the full paths of the layers the file holds."""
    targets, exclude = config.get("target_modules"), config.get("exclude_modules")
    feedforward = config.get("feedforward_modules")
    out = dict(config)
    if (isinstance(targets, list) or targets == "all-linear") and not exclude and not isinstance(feedforward, str):
        out["target_modules"] = sorted(targets) if isinstance(targets, list) else ["all-linear"]
        if isinstance(feedforward, list):
            out["feedforward_modules"] = sorted(feedforward)
    else:
        out["target_modules"] = paths
        if feedforward:
            out["feedforward_modules"] = [p for p in paths if _feedforward(p, feedforward)]
    for name in [*out["target_modules"], *(out.get("feedforward_modules") or [])]:
        if not isinstance(name, str) or SPEC_CHARS & set(name) or not name:
            raise QpeftError(f"{where}: target_modules names '{name}', which qpeft cannot take as a layer "
                             f"name (it holds one of {' '.join(sorted(SPEC_CHARS))})")
    return out


def _feedforward(path: str, feedforward) -> bool:
    """PEFT's IA3 rule: a regex matches the whole path, a name its end."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, path) is not None
    return any(path.endswith(name) for name in feedforward)


def _selector(config: dict):
    """PEFT's target rule as a predicate on layer names, for a regex or an exclusion (the
    cases where the layers are taken from the file); None when the targets were a list."""
    targets, exclude = config.get("target_modules"), config.get("exclude_modules")
    if not (isinstance(targets, str) or exclude) or targets is None:
        return None

    def named(name: str, rule) -> bool:
        if isinstance(rule, str):
            return rule == "all-linear" or re.fullmatch(rule, name) is not None
        return any(name == t or name.endswith("." + t) for t in rule or [])

    return lambda name: named(name, targets) and not (exclude and named(name, exclude))


class _Reading(dict):
    """A config that records which fields a plugin looked at."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.read: set = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def _claims(config: dict, registry, where: Path):
    """``(method, [modifiers], fields read)``: the plugins whose own from_peft_config
    returns option values for this config."""
    claims, read = [], set()
    for name in registry.names("adapter"):
        cls = registry.get("adapter", name)
        if "from_peft_config" not in vars(cls):
            continue
        view = _Reading(config)
        values = cls.from_peft_config(view)
        if values is not None:
            claims.append((cls, dict(values)))
            read |= view.read
    methods = [c for c in claims if c[0].role == "method"]
    if len(methods) != 1:
        peft_type = config.get("peft_type")
        if methods:
            raise QpeftError(f"{where}: both {' and '.join(repr(c.name) for c, _ in methods)} read this "
                             f"{peft_type} adapter; uninstall one of them")
        known = sorted({getattr(registry.get("adapter", n), "peft_type", "") for n in registry.names("adapter")
                        if "from_peft_config" in vars(registry.get("adapter", n))} - {""})
        if peft_type in known and config.get("use_dora"):
            raise QpeftError(f"{where}: use_dora=true: {ADVICE['use_dora']}")
        raise QpeftError(f"{where}: peft_type '{peft_type}' is not supported; qpeft loads {', '.join(known)} "
                         f"adapters: retrain as one of them")
    return methods[0], [c for c in claims if c[0].role == "modifier"], read


def _refuse_unread(config: dict, read: set, where: Path) -> None:
    """A field set in the config that no claiming plugin read, and that is not harmless at
    its value, is refused (so nothing the adapter depends on is silently dropped)."""
    for field, value in config.items():
        harmless = any(type(value) is type(a) and value == a for a in HARMLESS.get(field, ()))
        if field in DESCRIBE or field in read or value in (None, False, "", [], {}) or harmless:
            continue
        advice = ADVICE.get(field, "qpeft does not support it; retrain without it, or remove it from "
                                   f"{CONFIG} if it does not change the adapter")
        raise QpeftError(f"{where}: {field}={json.dumps(value)[:80]} is not supported: {advice}")


def _text(value, where: Path) -> str:
    """An option value as a spec writes it."""
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v, where) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if SPEC_CHARS & set(text):
        raise QpeftError(f"{where}: the value '{text}' cannot be written into an adapter spec")
    return text


def _check_given(given: str, imported: Imported, registry) -> None:
    """A typed ``--adapter`` must amount to the adapter read from the directory."""
    from qpeft.core.kinds.adapter import compose

    mine = compose(given, registry)
    if _parts(mine) != _parts(imported.composition):
        spec = imported.spec if len(imported.spec) <= 120 else imported.spec[:117] + "..."
        raise QpeftError(f"--adapter '{given}' conflicts with the adapter in {imported.directory} ('{spec}'); "
                         f"drop --adapter: with --init-adapter the spec comes from the adapter directory")


def _parts(composition) -> list:
    """Each part's name and options; the order of names in a list option does not count."""
    return sorted((p.name, {k: sorted(v) if isinstance(v, list) else v
                            for k, v in dataclasses.asdict(p.options).items()}) for p in composition.parts)
