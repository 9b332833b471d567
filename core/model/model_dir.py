"""Checking a local model directory before the heavy load, in under a second: config.json
parses and names a causal-LM type transformers knows, the weights are safetensors with intact
headers (one file or an index of shards), and tokenizer files are there. Pickle weights
(``pytorch_model.bin``) are refused: unpickling can run code. Each fault is one line.
"""
import json
from pathlib import Path

from qpeft.core.base.errors import ModelLoadError, closest, first_line

INSTEAD = "pass a directory with config.json, a .gguf file, or omit --model for the embedded default"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
        raise ModelLoadError(f"cannot read {file} ({first_line(exc)})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelLoadError(f"{file} is not valid JSON ({first_line(exc)}); "
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
            raise ModelLoadError(f"{file} is not a readable safetensors file ({first_line(exc)}); it may be "
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
