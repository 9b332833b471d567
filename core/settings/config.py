"""The resolved configuration of a run: flags, an optional YAML/JSON file, defaults.

Plain settings (:class:`RunConfig`, :class:`TrainConfig`): no torch is imported here, so
``qpeft --version`` starts without it (tests/test_layering.py).

Keys in the file are named like the flags (``--batch-size`` → ``batch_size`` or
``batch-size``); flags given on the command line override the file. Every bad key or
value is reported at once, as torchtune does, naming the flag; ranges are in :data:`RANGES`,
so a bad number costs a second, not a model load.
"""
import dataclasses
import json
import math
import re
import typing
from pathlib import Path
from typing import Literal

from qpeft.core.base import options as opts
from qpeft.core.base import spec as specs
from qpeft.core.base.errors import OptionsError, QpeftError, unknown


# The only built-in plugin names the core holds: what runs when nothing is chosen.
DEFAULT_QUANT, DEFAULT_ADAPTER = "nf4", "lora"
DEFAULT_EVALUATORS = "perplexity;accuracy;prompts;footprint"
DEFAULT_GRID = {"quant": "none;nf4;hqq", "adapter": "lora;lora+rslora;dora"}   # qpeft compare
# Run settings a compare cell gets unless the flags or the --config file give them: no
# validation loss during training (the "after" perplexity measures the same split once; in a
# 40-step cell the five passes cost ~20 % of its time, docs/study.md).
GRID_RUN_DEFAULTS = {"eval_every": 0}
LIST_SETTINGS = ("evaluators",)     # a list of specs: "a;b", a repeated flag or a YAML list


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric setting takes: ``low``/``high`` bounds (None: unbounded),
    each inclusive unless ``*_open``, and an example value for the message."""

    example: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, value) -> str | None:
        """Why ``value`` is out of range (``"must be > 0"``), or None."""
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not (too_low or too_high):
            return None
        words = [f"{'>' if self.low_open else '≥'} {_num(self.low)}"] if self.low is not None else []
        words += [f"{'<' if self.high_open else '≤'} {_num(self.high)}"] if self.high is not None else []
        return "must be " + " and ".join(words)


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def setting(default, help: str, shown: str | None = None, path: str | None = None, flag: bool = True,
            range: Range | None = None, **field):
    """A run setting declared once: its default, the help its ``qpeft run`` flag shows
    (``[default: …]`` added from ``default``, or ``shown``), ``path`` ("dir"/"file") for a
    path flag, ``flag=False`` for a setting only a config file sets, and its :class:`Range`.
    The flags (:mod:`qpeft.core.settings.flags`), the config-file keys and :data:`RANGES`
    are generated from these declarations."""
    meta = {"help": help, "shown": shown, "path": path, "flag": flag, "range": range}
    if field.get("default_factory"):
        return dataclasses.field(metadata=meta, **field)
    return dataclasses.field(default=default, metadata=meta, **field)


@dataclasses.dataclass
class TrainConfig:
    """Training settings; defaults follow the thesis (AdamW, constant LR)."""

    steps: int = setting(100, "optimizer steps; 0 to train for --epochs", range=Range("100", low=0))
    epochs: float = setting(1.0, "epochs when --steps is 0", shown="1",
                            range=Range("1", low=0, low_open=True))          # checked only when --steps is 0
    batch_size: int = setting(8, "examples per optimizer step, across processes", range=Range("8", low=1))
    grad_accum: int = setting(1, "micro-batches per step", range=Range("1", low=1))
    lr: float = setting(3e-4, "peak learning rate", shown="3e-4", range=Range("3e-4", low=0, low_open=True))
    schedule: Literal["constant", "cosine", "linear"] = setting("constant", "LR schedule after warmup")
    warmup_steps: int = setting(0, "linear warmup steps", range=Range("10", low=0))
    weight_decay: float = setting(0.0, "AdamW weight decay", shown="0", range=Range("0.01", low=0))
    max_grad_norm: float = setting(1.0, "gradient clipping, 0 to disable", range=Range("1.0", low=0))
    optimizer: Literal["adamw", "paged_adamw_32bit", "paged_adamw_8bit"] = setting(
        "adamw", "optimizer; paged ones need CUDA")
    seed: int = setting(42, "seed for data order, split, init and dropout",   # what every seeded RNG takes
                        range=Range("42", low=0, high=2**32 - 1))
    log_every: int = setting(5, "log every N steps", range=Range("5", low=1))
    eval_every: int = setting(-1, "validation loss every N steps (in metrics.jsonl and loss.png), 0 never",
                              shown="-1, five times per run", range=Range("20", low=-1))
    save_every: int = setting(50, "checkpoint every N steps", range=Range("50", low=0))
    gradient_checkpointing: bool = setting(False, "recompute activations in backward to save memory")
    task_sampling: Literal["mixed", "per-task"] = setting(
        "mixed", "mixed: batches of any tasks; per-task: each step one mini-batch per task, loss Σ w_t·L_t "
        "(MTLoRA's Algorithm 2; needs examples with a task)")
    task_weights: str = setting("", "per-task loss weights w_t with --task-sampling per-task, e.g. alert=2,decimal=0.5",
                                shown="1 for every task")
    progress: bool = setting(True, "progress bars", flag=False)


@dataclasses.dataclass
class RunConfig:
    """Everything ``qpeft run`` needs; the flags of ``qpeft run --help`` are generated from
    these fields and :class:`TrainConfig`'s (:mod:`qpeft.core.settings.flags`)."""

    model: str | None = setting(None, "Hugging Face id or directory, a .gguf file, or tiny (a random 2-layer test "
                                "model)", shown="embedded SmolLM2-135M-Instruct")
    quant: str = setting(DEFAULT_QUANT, "quantizer spec, e.g. hqq:nbits=2")
    adapter: str = setting(DEFAULT_ADAPTER, "adapter spec, e.g. lora:r=8:targets=q_proj,v_proj+rslora")
    init_adapter: str | None = setting(None, "start from this adapter directory's weights: PEFT's format "
                                       "(adapter_config.json + adapter_model.safetensors) from PEFT, Unsloth, axolotl, "
                                       "LLaMA-Factory or qpeft; the adapter spec comes from it", path="dir")
    data: str | None = setting(None, "training data: Alpaca, chat or text JSON/JSONL", path="file",
                               shown="bundled edge tasks")
    validation_data: str | None = setting(None, "explicit validation file", path="file",
                                          shown="seeded 80/20 split")
    data_format: Literal["auto", "alpaca", "chat", "text"] = setting("auto", "format of --data")
    template: Literal["auto", "chat", "alpaca"] = setting("auto", "prompt template",
                                                          shown="the model's chat template")
    max_length: int = setting(256, "maximum tokens per example", range=Range("256", low=8))
    evaluators: str = setting(DEFAULT_EVALUATORS, "evaluator specs separated by ';', or the flag repeated")
    eval_limit: int = setting(0, "evaluate on at most N examples per split, 0 for all", range=Range("100", low=0))
    name: str | None = setting(None, "run name", shown="QUANT-ADAPTER")
    output_dir: str = setting("runs", "where run directories go", path="dir")
    device: str = setting("auto", "cpu, cuda, cuda:1 or auto")
    resume: bool = setting(False, "continue RUN_DIR from its newest complete checkpoint")
    overwrite: bool = setting(False, "replace an existing run directory")
    skip_bad_lines: bool = setting(False, "skip malformed data lines instead of refusing them")
    train_on_prompt: bool = setting(False, "take the loss on prompt tokens too")
    packing: bool = setting(False, "pack short examples into --max-length sequences")
    no_cache: bool = setting(False, "quantize the base and measure its 'before' numbers even when a run of the same "
                             "model, quantizer and data has ($QPEFT_CACHE/quantized, $QPEFT_CACHE/baselines)")
    validation_split: float = setting(0.2, "share of --data held out for validation", flag=False,
                                      range=Range("0.2", low=0, high=1, low_open=True, high_open=True))
    train: TrainConfig = setting(None, "", flag=False, default_factory=TrainConfig)

    @property
    def run_name(self) -> str:
        adapter = f"init-{Path(self.init_adapter).resolve().name}" if self.init_adapter else self.adapter
        return self.name or f"{self.quant}-{adapter}".replace(":", "_").replace("=", "")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RANGES = {f.name: f.metadata["range"] for cls in (RunConfig, TrainConfig)   # every numeric setting → its range
          for f in dataclasses.fields(cls) if f.metadata.get("range")}
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _fields(cls) -> dict:
    return {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}


def build(file: str | None, flags: dict, base: dict | None = None) -> RunConfig:
    """A RunConfig from ``base`` settings, then a config file, then explicitly given flags.

    Every unknown key, wrong type and out-of-range value is reported in one error. The
    device is checked against this machine unless it comes from ``base`` alone (a saved
    run, which ``qpeft eval``/``export`` rebuild on a device of their own)."""
    values = dict(base or {})
    given = {**(read_file(file) if file else {}), **{k: v for k, v in flags.items() if v is not None}}
    values.update(given)
    top, train = _fields(RunConfig), _fields(TrainConfig)
    top.pop("train")
    errors, kwargs, train_kwargs = [], {}, {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        target, types = (kwargs, top) if key in top else (train_kwargs, train) if key in train else (None, None)
        if target is None:
            errors.append(unknown("setting", str(raw_key), [k.replace("_", "-") for k in [*top, *train]]))
            continue
        try:
            target[key] = opts.coerce(spec_setting(key, value), types[key], _flag(key))
        except OptionsError as exc:
            errors.append(str(exc))
        except OverflowError:           # int(float('inf'))
            errors.append(f"{_flag(key)} expects {types[key].__name__}, got {value!r}")
    try:
        cfg = RunConfig(train=TrainConfig(**train_kwargs), **kwargs)
    except (TypeError, ValueError) as exc:
        raise OptionsError("; ".join([*errors, str(exc)])) from None
    if cfg.init_adapter and "adapter" not in values:
        cfg.adapter = ""            # not given: pipeline.plan takes it from --init-adapter
    errors += range_errors(cfg)
    device_given = any(str(k).replace("-", "_") == "device" for k in given)
    errors += filter(None, [device_problem(cfg.device, available=device_given)])
    if errors:
        raise OptionsError("; ".join(errors))
    return cfg


def spec_setting(key: str, value):
    """A list of specs (:data:`LIST_SETTINGS`) checked and joined by ';'; a single spec
    given as a list is refused. Other settings pass through."""
    if key in LIST_SETTINGS:
        try:
            return specs.join_list(value)
        except OptionsError as exc:
            raise OptionsError(f"{_flag(key)}: {exc}") from None
    if key in ("quant", "adapter") and isinstance(value, (list, tuple)):
        raise OptionsError(f"{_flag(key)} takes one spec, got a list; to try several, use "
                           f"'qpeft compare {_flag(key)} \"{';'.join(map(str, value))}\"'")
    return value


def range_errors(cfg: RunConfig) -> list[str]:
    """One message per numeric setting outside its :data:`RANGES`, plus the cross-checks."""
    t = cfg.train
    out = []
    for key, allowed in RANGES.items():
        value = getattr(t if hasattr(t, key) else cfg, key)
        if key == "epochs" and t.steps != 0 and math.isfinite(value):
            continue                    # --epochs is not used
        problem = allowed.problem(value)
        if problem:
            when = " when --steps is 0" if key == "epochs" and math.isfinite(value) else ""
            out.append(f"{_flag(key)} {problem}{when}, got {value}; e.g. {_flag(key)} {allowed.example}")
    try:
        task_weight_values(t.task_weights)
    except OptionsError as exc:
        out.append(str(exc))
    if t.task_weights and t.task_sampling != "per-task":
        out.append("--task-weights weighs the per-task losses of --task-sampling per-task; add it, or drop --task-weights")
    if t.batch_size >= 1 and t.grad_accum >= 1 and t.batch_size % t.grad_accum:
        out.append(f"--batch-size {t.batch_size} must be divisible by --grad-accum {t.grad_accum}; "
                   f"e.g. --batch-size {t.batch_size - t.batch_size % t.grad_accum or t.grad_accum} "
                   f"--grad-accum {t.grad_accum}")
    return out


def task_weight_values(text: str) -> dict[str, float]:
    """``{"alert": 2.0, "decimal": 0.5}`` from ``"alert=2,decimal=0.5"`` ("" → {}); each weight a
    finite number ≥ 0, each task named once."""
    out = {}
    for part in filter(None, (p.strip() for p in str(text or "").split(","))):
        name, eq, value = part.partition("=")
        try:
            weight = float(value) if eq and name.strip() else None
        except ValueError:
            weight = None
        if weight is None or not math.isfinite(weight) or weight < 0 or name.strip() in out:
            raise OptionsError(f"--task-weights: '{part}' is not TASK=WEIGHT (a number ≥ 0, each task once); "
                               "e.g. --task-weights alert=2,decimal=0.5")
        out[name.strip()] = weight
    return out


def device_problem(device: str, available: bool = True) -> str | None:
    """Why ``--device`` cannot be used: not a device name, or (``available``) not on this machine."""
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        return f"--device must be auto, cpu, cuda, cuda:N or mps, got '{device}'; e.g. --device cpu"
    if not available or device in ("auto", "cpu"):
        return None
    import torch  # only here: the other checks need no torch

    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        return None if mps is not None and mps.is_available() else \
            "--device mps: no Apple MPS device is visible; use --device cpu"
    if not torch.cuda.is_available():
        return f"--device {device}: no CUDA device is visible; use --device cpu"
    index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        return (f"--device {device}: only {count} CUDA device{'s are' if count > 1 else ' is'} visible; "
                f"use --device cuda:{count - 1} or lower")
    return None


# -- config files ------------------------------------------------------------------------
def read_file(path: str) -> dict:
    """A YAML or JSON mapping of settings; a ``train:`` section is flattened into it."""
    p = Path(path)
    if not p.is_file():
        raise QpeftError(f"no such config file: {path}")
    kind = "JSON" if p.suffix == ".json" else "YAML"
    text = text_of(p)
    try:
        if kind == "JSON":
            data = json.loads(text)
        else:
            data = _yaml(text)
    except Exception as exc:
        raise QpeftError(f"{path} is not valid {kind}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise QpeftError(f"{path} must hold a mapping of settings, such as 'adapter: dora'; "
                         f"it holds a {_kind(data)}")
    section = data.get("train")
    if section is not None and not isinstance(section, dict):
        raise QpeftError(f"{path}: 'train' must be a mapping of training settings, such as "
                         f"'train: {{lr: 3.0e-4, steps: 100}}'; it holds a {_kind(section)}")
    bad = next((k for k in [*data, *(section or {})] if not isinstance(k, str)), None)
    if bad is not None:
        raise QpeftError(f"{path}: setting names must be text, got {bad!r}; write e.g. 'steps: 100'")
    return (section or {}) | {k: v for k, v in data.items() if k != "train"}


def _yaml(text: str):
    """``yaml.safe_load`` without aliases (``*name``): a few lines of them expand to gigabytes
    (a "billion laughs"), and no setting needs one."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                line = self.peek_event().start_mark.line + 1
                raise yaml.YAMLError(f"line {line}: an alias (*name) refers to an anchor; qpeft does not "
                                     "expand aliases in config files: write the value out")
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliases)   # noqa: S506 (a SafeLoader)


def text_of(path: Path, fix: str = "save it as UTF-8") -> str:
    """The UTF-8 text of ``path``, or a one-line error naming it and ending in ``fix``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise QpeftError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QpeftError(f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                         f"{fix}") from None


def _kind(value) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "nothing"}.get(type(value), type(value).__name__)
