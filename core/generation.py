"""Batched greedy generation from prompt token ids (left padding, KV cache)."""
import torch


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 16,
             batch_size: int = 16, device="cpu") -> list[str]:
    """The greedy continuation of each prompt (a list of token ids), special tokens removed."""
    pad = tokenizer.pad_token_id
    outputs = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, p in enumerate(chunk):
                ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[row, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return outputs
