"""A merged model as one GGUF file that llama.cpp and Ollama load (``qpeft export --format gguf``).

    merged LlamaForCausalLM ─▶ llama.* metadata from its config
                            ─▶ tokenizer.ggml.* from the run's tokenizer (vocabulary, merges,
                               token types, special ids, add_bos, chat template)
                            ─▶ tensors under GGUF's names (gguf's own name map), q/k rows
                               permuted to llama.cpp's rotary layout, quantized with gguf.quants
                            ─▶ gguf.GGUFWriter ─▶ FILE.gguf (built beside --out, renamed over it)

Facts taken from llama.cpp's ``convert_hf_to_gguf.py`` and ``llama-quantize`` (no code):
Hugging Face stores a rotary head's q/k rows as two halves, llama.cpp as interleaved pairs,
so q (``n_head`` heads) and k (``n_head_kv`` heads) are permuted (transformers' GGUF loader
reverses it); 1-D tensors (norms) stay F32; a tensor whose rows do not split into the type's
blocks of 32 falls back to F16; with tied embeddings there is no ``output`` tensor, and the
output head (``output``, or ``token_embd`` when tied) is kept at Q8_0 under the 4- and 5-bit
types, as llama-quantize does where its Q6_K does not fit (the gguf package cannot write Q6_K).
"""
import json
import os
from collections import Counter
from pathlib import Path

from qpeft.core.base import progress
from qpeft.core.base.errors import QpeftError
from qpeft.core.base.rundir import Staged, disk_error

# --gguf-type → (tensor type name, general.file_type name): every type the gguf package writes
# for a dense model.
TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"), "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
         "q4_1": ("Q4_1", "MOSTLY_Q4_1"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
ARCHITECTURES = ("llama",)
_HEAD_TYPE = "Q8_0"                     # the output head under the 4- and 5-bit types
_LOW_BIT = {"q5_1", "q5_0", "q4_1", "q4_0"}
_SUPPORTED = "Llama-architecture models (model_type 'llama': SmolLM2, TinyLlama, Llama 2/3 ...)"


def check_out(out) -> Path:
    """``--out`` of a GGUF export: a file path ending in .gguf that is not a directory."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise QpeftError(f"--format gguf writes one file; --out must end in .gguf, e.g. --out {out.name}.gguf")
    if out.is_dir():
        raise QpeftError(f"--out {out} is a directory; name the .gguf file to write")
    return out


def check_source(spec) -> None:
    """Refuse, before loading, a local model directory whose architecture GGUF export does not
    write (a .gguf base is checked once its cached conversion has loaded: reading its metadata
    here would cost as much)."""
    from qpeft.core.model import models

    where = models.locate(spec)
    if isinstance(where, Path) and where.is_dir():
        try:
            model_type = json.loads((where / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            return          # models.load_model reports a damaged config with its own line
        _refuse_unless_llama(model_type)


def _refuse_unless_llama(model_type) -> None:
    if model_type not in ARCHITECTURES:
        raise QpeftError(f"GGUF export writes {_SUPPORTED}; this run's model is '{model_type}': "
                         "export it with --merge (a transformers directory) and convert it with llama.cpp")


def check_model(model) -> None:
    """What the writer needs of a loaded model: Llama, no biases, no rope scaling."""
    config = model.config
    _refuse_unless_llama(config.model_type)
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise QpeftError("GGUF export writes Llama models without biases; this one has attention_bias "
                         "or mlp_bias: export it with --merge and convert it with llama.cpp")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise QpeftError(f"GGUF export writes default rotary embeddings; this model uses rope type "
                         f"'{rope.get('rope_type', rope.get('type'))}': export it with --merge instead")


# -- tensors ---------------------------------------------------------------------------------
def rotary_permute(weight, n_head: int):
    """Rows of a q or k projection from Hugging Face's half-split rotary layout to llama.cpp's
    interleaved pairs (per head: rows [0..d/2) and [d/2..d) become even and odd rows)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tensor_plan(model, type_name: str) -> list[tuple[str, str, object]]:
    """``(state-dict name, GGUF name, GGMLQuantizationType)`` of every tensor written."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head = "token_embd.weight" if tied else "output.weight"
    plan = []
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        module, _, suffix = key.rpartition(".")
        mapped = names.get_name(module)
        if mapped is None:
            raise QpeftError(f"GGUF export cannot name tensor '{key}' (not a Llama tensor); "
                             "export with --merge instead")
        name = f"{mapped}.{suffix}"
        plan.append((key, name, _type_of(name, tuple(tensor.shape), type_name, name == head)))
    return plan


def _type_of(name: str, shape: tuple, type_name: str, is_head: bool):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if len(shape) == 1:
        return Q.F32
    kind = Q[_HEAD_TYPE if is_head and type_name in _LOW_BIT else TYPES[type_name][0]]
    block = GGML_QUANT_SIZES[kind][0]
    return kind if shape[-1] % block == 0 else Q.F16


def _arrays(model, plan):
    """``(GGUF name, float32 array in GGUF's layout, type)`` one tensor at a time."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    state = model.state_dict()
    for key, name, kind in plan:
        array = state[key].detach().float().cpu().numpy()
        if ".attn_q." in name:
            array = rotary_permute(array, heads)
        elif ".attn_k." in name:
            array = rotary_permute(array, kv_heads)
        yield name, array, kind


# -- metadata --------------------------------------------------------------------------------
def add_architecture(writer, config) -> None:
    """llama.* keys: the ones llama.cpp reads and transformers maps back onto a LlamaConfig."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.*: a byte-level BPE vocabulary as llama.cpp's "gpt2" tokenizer model."""
    from gguf import TokenType

    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    model = backend.get("model") or {}
    if model.get("type") != "BPE" or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise QpeftError("GGUF export writes byte-level BPE tokenizers (GPT-2 style, as SmolLM2's); this "
                         "tokenizer is not one: export with --merge and convert it with llama.cpp")
    if len(tokenizer) > vocab_size:
        raise QpeftError(f"the tokenizer has {len(tokenizer)} tokens but the model embeds {vocab_size}")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:                                   # embedding rows no token uses
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(backend.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    plain, special = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    writer.add_add_bos_token(special[:1] != plain[:1] and special[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(special[-1:] != plain[-1:] and special[-1:] == [tokenizer.eos_token_id])
    writer.add_add_space_prefix(False)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's name for the way this tokenizer splits text before BPE."""
    parts = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre or {}]
    shape = [(p.get("type"), p.get("individual_digits"), p.get("use_regex"), p.get("add_prefix_space"))
             for p in parts]
    byte_level = ("ByteLevel", None, True, False)
    if shape == [byte_level]:
        return "gpt-2"          # GPT-2's split regex, no prefix space
    if shape == [("Digits", True, None, None), byte_level]:
        return "smollm"         # digits one by one, then GPT-2's regex
    raise QpeftError(f"GGUF export knows the pre-tokenizers of GPT-2 and SmolLM2; this tokenizer's is "
                     f"{[p[0] for p in shape]}: export with --merge and convert it with llama.cpp")


# -- the file --------------------------------------------------------------------------------
def write(model, tokenizer, path, type_name: str, name: str) -> dict:
    """Write ``model`` (merged: plain linear layers) as GGUF to ``path``; a summary dict."""
    import gguf
    from gguf.quants import quantize

    check_model(model)
    plan = tensor_plan(model, type_name)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    add_architecture(writer, model.config)
    writer.add_file_type(gguf.LlamaFileType[TYPES[type_name][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, model.config.vocab_size)
    counts, fallback = Counter(), []
    with progress.evaluating(f"GGUF {type_name}"), progress.bar(len(plan), "tensor") as done:
        for tensor_name, array, kind in _arrays(model, plan):      # quantizing is the long part
            writer.add_tensor(tensor_name, quantize(array, kind), raw_dtype=kind)
            counts[kind.name.lower()] += 1
            if kind.name == "F16" and type_name != "f16" and array.ndim == 2:
                fallback.append(tensor_name)
            done.update(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"type": type_name, "tensors": dict(counts), "f16_fallback": fallback,
            "bytes": Path(path).stat().st_size}


class StagedFile(Staged):
    """One file built in a directory beside ``target`` and renamed over it by :meth:`commit`
    (a single rename: the old file stays whole until the new one is complete)."""

    @property
    def file(self) -> Path:
        return self.path / self.target.name

    def commit(self) -> Path:
        try:
            os.replace(self.file, self.target)
        except OSError as exc:
            raise disk_error(exc, str(self.target)) from None
        self.discard()
        return self.target
