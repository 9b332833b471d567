"""Write a random Llama checkpoint of any size, tensor by tensor, never holding it whole.

    LlamaConfig ──LlamaForCausalLM on meta──▶ names and shapes (no memory)
                ──one seeded tensor at a time (norms 1, the rest N(0, 0.02²) in bf16)──▶
                shards of at most --shard-gb, model.safetensors.index.json, config.json,
                and the embedded model's tokenizer (``qpeft.core.model.models.resolve(None)``)

Peak memory is one shard in bf16 plus one tensor in float32. The defaults are TinyLlama's
shape (1.17 B parameters, untied), used by benchmarks/load_memory.py:

    python benchmarks/make_random_llama.py /tmp/llama-1b
"""
import argparse
import json
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def llama_config(hidden=2048, layers=22, intermediate=5632, vocab=49152, heads=32, kv_heads=4,
                 tie=False):
    """A bf16 ``LlamaConfig`` with the embedded tokenizer's special token ids."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, max_position_embeddings=2048,
                       tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                       dtype="bfloat16")


def shapes(config) -> dict[str, tuple]:
    """Checkpoint key → shape, from a model built on the meta device (tied weights once)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = tuple(t.shape)
    return out


def random_tensor(name: str, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """Norm weights 1; everything else N(0, 0.02²), drawn in float32, stored in bf16."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def write_random_llama(directory, shard_bytes: float = 1e9, seed: int = 0, tokenizer: bool = True,
                       **shape) -> dict:
    """Write the checkpoint to ``directory``; returns ``{"parameters", "largest"}`` (the
    element count of the model and of its largest tensor)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = llama_config(**shape)
    sizes = shapes(config)
    shards, current, used = [], [], 0
    for name, shape_ in sizes.items():
        nbytes = 2 * int(torch.Size(shape_).numel())
        if current and used + nbytes > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    shards.append(current)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else \
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: random_tensor(n, sizes[n], generator) for n in names}, directory / file,
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    if len(shards) > 1:
        total = sum(2 * torch.Size(s).numel() for s in sizes.values())
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(directory)
    if tokenizer:
        from qpeft.core.model.models import resolve

        source = Path(resolve(None))
        for file in TOKENIZER_FILES:
            if (source / file).is_file():
                shutil.copy(source / file, directory / file)
    numels = [torch.Size(s).numel() for s in sizes.values()]
    return {"parameters": sum(numels), "largest": max(numels)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--tie", action="store_true", help="tie the embedding and lm_head")
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    info = write_random_llama(a.out, a.shard_gb * 1e9, a.seed, hidden=a.hidden, layers=a.layers,
                              intermediate=a.intermediate, vocab=a.vocab, heads=a.heads,
                              kv_heads=a.kv_heads, tie=a.tie)
    print(f"{a.out}: {info['parameters'] / 1e9:.3f} B parameters, largest tensor "
          f"{info['largest'] / 1e6:.1f} M")


if __name__ == "__main__":
    main()
