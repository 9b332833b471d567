"""The masked batches the calibrating inits are checked on (tests/test_eva.py, test_corda.py,
test_lora_ga.py, test_peft_conversion.py), and logits without gradient."""
import torch


def masked_batches(n: int, pad_row0: bool = False) -> list[dict]:
    """``n`` batches of 4×24 token ids (vocabulary 1000, seed 3), the prompt (first 6) masked in
    the labels; ``pad_row0``: row 0's last 4 positions are padding (mask 0, labels -100)."""
    g, out = torch.Generator().manual_seed(3), []
    for _ in range(n):
        ids = torch.randint(0, 1000, (4, 24), generator=g)
        labels, mask = ids.clone(), torch.ones_like(ids)
        labels[:, :6] = -100
        if pad_row0:
            mask[0, 20:], labels[0, 20:] = 0, -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits
