"""The resolved configuration of a run: flags, an optional YAML/JSON file, defaults.

Keys in the file are named like the flags (``--batch-size`` → ``batch_size`` or
``batch-size``); flags given on the command line override the file. Every bad key or
value is reported at once, as torchtune does, naming the flag.
"""
import dataclasses
import json
import typing
from pathlib import Path

from qpeft.core import options as opts
from qpeft.core.errors import OptionsError, QpeftError, unknown
from qpeft.core.trainer import TrainConfig


@dataclasses.dataclass
class RunConfig:
    """Everything ``qpeft run`` needs; the flags of ``qpeft run --help`` map 1:1 to fields."""

    model: str | None = None           # None: the embedded SmolLM2-135M-Instruct
    data: str | None = None            # None: the bundled edge-tasks dataset
    validation_data: str | None = None
    data_format: str = "auto"
    template: str = "auto"
    max_length: int = 256
    train_on_prompt: bool = False
    skip_bad_lines: bool = False
    validation_split: float = 0.2
    packing: bool = False
    quant: str = "nf4"
    adapter: str = "lora"
    evaluators: str = "perplexity,accuracy,prompts,footprint"
    eval_limit: int = 0                # 0: every example
    name: str | None = None
    output_dir: str = "runs"
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    @property
    def run_name(self) -> str:
        return self.name or f"{self.quant}-{self.adapter}".replace(":", "_").replace("=", "")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fields(cls) -> dict:
    return {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}


def build(file: str | None, flags: dict, base: dict | None = None) -> RunConfig:
    """A RunConfig from ``base`` settings, then a config file, then explicitly given flags."""
    values = dict(base or {})
    values.update(read_file(file) if file else {})
    values.update({k: v for k, v in flags.items() if v is not None})
    top, train = _fields(RunConfig), _fields(TrainConfig)
    top.pop("train")
    errors, kwargs, train_kwargs = [], {}, {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        target, types = (kwargs, top) if key in top else (train_kwargs, train) if key in train else (None, None)
        if target is None:
            errors.append(unknown("setting", raw_key, [k.replace("_", "-") for k in [*top, *train]]))
            continue
        try:
            target[key] = opts.coerce(value, types[key], f"--{key.replace('_', '-')}")
        except OptionsError as exc:
            errors.append(str(exc))
    if errors:
        raise OptionsError("; ".join(errors))
    return RunConfig(train=TrainConfig(**train_kwargs), **kwargs)


def read_run(run_dir) -> dict:
    """The resolved ``config.json`` a run directory was started with, or a one-line error."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise QpeftError(f"{run_dir} has no config.json; pass a directory written by 'qpeft run'")
    return json.loads(path.read_text())


def saved_settings(resolved: dict, run_dir) -> dict:
    """A run's settings as flat flag values (resume/overwrite cleared), to build on."""
    flat = dict(resolved["config"])
    flat.update(flat.pop("train", {}))
    flat.update(resume=False, overwrite=False, name=Path(run_dir).name,
                output_dir=str(Path(run_dir).parent))
    return flat


def read_file(path: str) -> dict:
    """A YAML or JSON mapping of settings."""
    p = Path(path)
    if not p.is_file():
        raise QpeftError(f"no such config file: {path}")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise QpeftError(f"{path} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                         f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise QpeftError(f"{path} must hold a mapping of settings, such as 'adapter: dora'")
    return data.get("train", {}) | {k: v for k, v in data.items() if k != "train"}
