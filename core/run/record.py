"""The run record: what a run was started with, as ``RUN_DIR/config.json`` holds it.

    qpeft run      ─▶ RunRecord.started(cfg, plan) ─▶ .write(run_dir)     (the only writer)
    RUN_DIR/config.json ─▶ RunRecord.read(run_dir) (every key checked, settings must build)
        ─▶ .settings(run_dir)           RunConfig: --resume, qpeft eval, requant
        ─▶ .build_quantizer(registry)   the recorded quantizer with its recorded options
        ─▶ .composition(registry)       the recorded adapter parts with their options
        ─▶ .adapter_meta()              what an adapter directory records (export, save)
    qpeft run --resume ─▶ resumed(run_dir, new)  refuses what the checkpoints cannot serve
                                                 (RESUME_FIXED), before anything is written

This module is the one place that knows the file's keys. The plugins are rebuilt from
their recorded option values, not from the spec typed, so a default that changed between
versions does not silently change a rebuilt model. The file's shape is unchanged from the
first release: runs written by earlier versions read.
"""
import dataclasses
import json
import re
from pathlib import Path

from qpeft.core.settings import config as run_config
from qpeft.core.base import spec as specs
from qpeft.core.base.errors import QpeftError

FILE = "config.json"
MANIFESTS_SINCE = (0, 1, 0)     # the first qpeft version whose checkpoints carry manifest.json
# What a run's checkpoints hold state for: a resume that changes one of these is refused
# (flag → what it is). Everything else may change on --resume: --steps/--epochs to extend,
# --lr, --weight-decay, --schedule, --warmup-steps (applied from the next step), evaluators,
# logging, checkpointing, device, data.
RESUME_FIXED = {"--model": "the base model", "--quant": "the quantizer", "--adapter": "the adapter",
                "--optimizer": "the optimizer"}


@dataclasses.dataclass(frozen=True)
class PluginRecord:
    """One plugin of a run: its name, option values, and the distribution it came from."""

    name: str
    options: dict
    origin: str | None = None       # distribution name; None for a plugin registered in-process
    version: str | None = None

    @classmethod
    def of(cls, plugin) -> "PluginRecord":
        origin = plugin.origin
        return cls(plugin.name, dataclasses.asdict(plugin.options),
                   origin.distribution if origin else None, origin.version if origin else None)

    @classmethod
    def from_dict(cls, data) -> "PluginRecord":
        return cls(data["name"], dict(data.get("options") or {}), data.get("origin"), data.get("version"))

    def to_dict(self) -> dict:
        return {"name": self.name, "origin": self.origin, "version": self.version, "options": self.options}

    def build(self, kind: str, registry):
        """The plugin again, from the registry and the recorded option values."""
        return registry.get(kind, self.name).from_values(self.options)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A run's resolved settings and plugins (``config.json``)."""

    run: str | None                 # the run's name; None for an adapter directory from another tool
    qpeft_version: str
    config: dict                    # RunConfig.to_dict(): every setting, resolved
    quantizer: PluginRecord
    adapter_spec: str
    adapter_parts: tuple[PluginRecord, ...]
    evaluators: tuple[PluginRecord, ...] = ()

    # -- writing ---------------------------------------------------------------------
    @classmethod
    def started(cls, cfg, plan, run: str | None = None) -> "RunRecord":
        """The record of a run about to start with ``cfg`` and its resolved ``plan``."""
        from qpeft.core.base.version import __version__

        return cls(run, __version__, cfg.to_dict(), PluginRecord.of(plan.quantizer), cfg.adapter,
                   tuple(PluginRecord.of(p) for p in plan.adapter.parts),
                   tuple(PluginRecord.of(e) for e in plan.evaluators))

    def to_dict(self) -> dict:
        return {"run": self.run, "qpeft_version": self.qpeft_version, "config": self.config,
                "quantizer": self.quantizer.to_dict(),
                "adapter": {"spec": self.adapter_spec, "parts": [p.to_dict() for p in self.adapter_parts]},
                "evaluators": [e.to_dict() for e in self.evaluators]}

    def text(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    # -- reading ---------------------------------------------------------------------
    @classmethod
    def read(cls, run_dir) -> "RunRecord":
        """The record ``run_dir`` was started with, every key later code reads checked (its
        settings must build, too), or a one-line error saying how to recover."""
        path = Path(run_dir) / FILE
        if not path.is_file():
            raise QpeftError(f"{run_dir} has no {FILE}; pass a directory written by 'qpeft run'")
        fix = f"restore it, or start the run again with 'qpeft run ... --name {Path(run_dir).name} --overwrite'"
        try:
            data = json.loads(run_config.text_of(path, fix))
        except ValueError as exc:
            raise QpeftError(f"{path} is not valid JSON ({str(exc).splitlines()[0]}); {fix}") from None
        problem = shape_problem(data)
        if problem:
            raise QpeftError(f"{path} is damaged: {problem}; {fix}")
        record = cls(data["run"], data["qpeft_version"], data["config"], PluginRecord.from_dict(data["quantizer"]),
                     data["adapter"]["spec"], tuple(map(PluginRecord.from_dict, data["adapter"]["parts"])),
                     tuple(PluginRecord.from_dict(e) for e in data.get("evaluators") or ()
                           if isinstance(e, dict) and isinstance(e.get("name"), str)))
        try:
            record.settings(run_dir)
        except QpeftError as exc:
            raise QpeftError(f"{path} holds settings this qpeft cannot use: {exc}; {fix}") from None
        return record

    def flags(self, run_dir) -> dict:
        """The run's settings as flat flag values (resume/overwrite cleared), to build on:
        ``qpeft run --resume`` lays the flags given on top of these."""
        flat = dict(self.config)
        flat.update(flat.pop("train", None) or {})
        if isinstance(flat.get("evaluators"), str):
            flat["evaluators"] = _recorded_evaluators(flat["evaluators"], [e.name for e in self.evaluators])
        flat.update(resume=False, overwrite=False, name=Path(run_dir).name, output_dir=str(Path(run_dir).parent))
        return flat

    def settings(self, run_dir):
        """The :class:`RunConfig` the run was started with (resume/overwrite cleared)."""
        return run_config.build(None, {}, self.flags(run_dir))

    @property
    def model(self) -> str | None:
        """The base model as given (None: the embedded default)."""
        return self.config.get("model")

    @property
    def base_model(self) -> str:
        from qpeft.core.model import models

        return self.model or models.EMBEDDED

    def build_quantizer(self, registry):
        return self.quantizer.build("quantizer", registry)

    def composition(self, registry):
        """The recorded adapter parts, assembled and checked as a spec's would be."""
        from qpeft.core.kinds.adapter import assemble

        return assemble([(p.name, p.options) for p in self.adapter_parts], registry, self.adapter_spec)

    def adapter_meta(self) -> dict:
        """What an adapter directory records beside PEFT's files."""
        return {"quantizer": self.quantizer.to_dict(), "adapter_spec": self.adapter_spec,
                "base_model": self.base_model, "qpeft_version": self.qpeft_version}


def resumed(run_dir, new: RunRecord) -> RunRecord:
    """The record to write when ``run_dir`` is resumed with the settings of ``new``: a
    change the checkpoints cannot serve (:data:`RESUME_FIXED`) is refused in one line
    naming the setting and both values, before anything is written. The record keeps the
    run's name and the version that started it (which says whether its checkpoints have
    manifests)."""
    old = RunRecord.read(run_dir)
    changed = resume_changes(old, new)
    if changed:
        raise QpeftError(f"cannot resume {run_dir} with other settings than it was trained with: "
                         f"{'; '.join(changed)}; its checkpoints hold state for what it was trained with. "
                         f"Resume it as it was with 'qpeft run --resume {run_dir}' (drop those flags), "
                         f"or start a new run with --name {Path(run_dir).name}-2")
    return dataclasses.replace(new, run=old.run, qpeft_version=old.qpeft_version)


def resume_changes(old: RunRecord, new: RunRecord) -> list[str]:
    """Each setting of :data:`RESUME_FIXED` that differs, as ``FLAG was X, now Y``. Plugin
    options are compared where both records have them (an option added since is new)."""
    out = []
    if not _same_model(old.model, new.model):
        out.append(f"--model was {old.model or 'the embedded default'}, now {new.model or 'the embedded default'}")
    out += _plugin_changes("--quant", [old.quantizer], [new.quantizer])
    out += _plugin_changes("--adapter", old.adapter_parts, new.adapter_parts)
    old_opt, new_opt = (r.config.get("train", {}).get("optimizer", "adamw") for r in (old, new))
    if old_opt != new_opt:
        out.append(f"--optimizer was {old_opt}, now {new_opt}")
    return out


def _same_model(a: str | None, b: str | None) -> bool:
    if a == b:
        return True
    if a is None or b is None:
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _plugin_changes(flag: str, old: tuple, new: tuple) -> list[str]:
    names = ["+".join(p.name for p in parts) for parts in (old, new)]
    if names[0] != names[1]:
        return [f"{flag} was {names[0]}, now {names[1]}"]
    out = []
    for a, b in zip(old, new):
        va, vb = (json.loads(json.dumps(p.options, default=str)) for p in (a, b))
        out += [f"{flag}: {a.name}'s {key} was {_value(va[key])}, now {_value(vb[key])}"
                for key in va if key in vb and va[key] != vb[key]]
    return out


def _value(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def predates_manifests(version: str) -> bool:
    """Whether a run started by qpeft ``version`` wrote checkpoints without manifest.json
    (so one without a manifest is expected there). A version that does not parse, or a
    source tree's ``+unknown``, is taken as current."""
    found = re.match(r"(\d+(?:\.\d+)*)", str(version))
    if not found or str(version).endswith("+unknown"):
        return False
    parts = tuple(int(x) for x in found.group(1).split("."))
    return parts + (0,) * (3 - len(parts)) < MANIFESTS_SINCE


def write(run_dir: Path, record: RunRecord) -> None:
    """``run_dir/config.json``; a full disk is a one-line error."""
    from qpeft.core.base import rundir

    path = Path(run_dir) / FILE
    try:
        path.write_text(record.text())
    except OSError as exc:
        raise rundir.disk_error(exc, str(path)) from None


SHAPE = {  # key of config.json → (type it must have, keys that mapping must have)
    "run": (str, ()), "qpeft_version": (str, ()), "config": (dict, ("model",)),
    "quantizer": (dict, ("name", "options")), "adapter": (dict, ("spec", "parts")),
}


def shape_problem(data) -> str | None:
    """What is wrong with the parsed ``config.json`` (a phrase), or None."""
    if not isinstance(data, dict):
        return f"it holds a {type(data).__name__}, not the mapping 'qpeft run' writes"
    for key, (typ, inner) in SHAPE.items():
        if not isinstance(data.get(key), typ):
            return f"'{key}' is missing or not a {'mapping' if typ is dict else 'string'}"
        missing = [k for k in inner if k not in data[key]]
        if missing:
            return f"'{key}' lacks '{missing[0]}'"
    if not isinstance(data["config"].get("train", {}), dict):
        return "'config.train' is not a mapping"
    q, a = data["quantizer"], data["adapter"]
    if not isinstance(q["name"], str) or not isinstance(q["options"], dict):
        return "'quantizer' needs a string 'name' and a mapping 'options'"
    if not isinstance(a["spec"], str) or not isinstance(a["parts"], list) or not a["parts"] or not all(
            isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("options"), dict)
            for p in a["parts"]):
        return "'adapter' needs a string 'spec' and 'parts', each with a 'name' and 'options'"
    return None


def _recorded_evaluators(text: str, names: list) -> str:
    """The evaluators setting of a record in today's grammar. Records written before
    ';' separated specs hold a comma-separated list; the evaluator names recorded beside
    it tell which grammar wrote the text, so nothing is guessed."""
    if ";" in text or "," not in text or (names and len(names) == 1):
        return text
    legacy = [s.strip() for s in text.split(",") if s.strip()]
    if not names or [s.split(":")[0].split("+")[0] for s in legacy] == names:
        return specs.SEPARATOR.join(legacy)
    return text
