"""``Σ log p(continuation | context)`` for many pairs, scored as lm-evaluation-harness scores
them, with the prefix that many inputs share (a subject's k shots) computed once.

The harness (``HFLM._loglikelihood_tokens``) runs every input in full. A causal model's
states over a prefix do not depend on what follows it, so the prefix's keys and values can
be computed once and every input continued from them: the same numbers up to float
rounding (the matmuls run on other shapes), at a fraction of the cost when the prefix is
long — for 5-shot MMLU the shots are ~90 % of each prompt.
"""
import copy
import inspect
from collections import defaultdict

MIN_SHARED = 32   # tokens two inputs must share at the start to be continued from one prefix


def continuation_logprobs(model, pairs: list, batch_size: int = 8, device="cpu",
                          max_length: int = 2048, share_prefix: bool = True) -> list[float]:
    """``Σ log p(continuation | context)`` for each ``(context ids, continuation ids)`` pair.

    As lm-evaluation-harness: the model reads ``(context + continuation)[-(max_length+1):-1]``
    and the continuation's tokens are scored at the last positions. Pairs whose inputs are
    equal (the four one-token answers of a question) share one forward pass; with
    ``share_prefix``, inputs that start alike share their common prefix (:func:`prefix_groups`).
    """
    import torch
    from tqdm import tqdm

    inputs, jobs = {}, defaultdict(list)
    for index, (ctx, cont) in enumerate(pairs):
        inp = tuple((list(ctx) + list(cont))[-(max_length + 1):-1])
        jobs[inputs.setdefault(inp, len(inputs))].append((index, list(cont)))
    scored = {inp: max(len(cont) for _, cont in jobs[i]) for inp, i in inputs.items()}
    groups = prefix_groups(scored) if share_prefix else [((), list(inputs))]
    out = [0.0] * len(pairs)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    with torch.no_grad(), tqdm(total=len(inputs), desc="mmlu", leave=False, disable=None) as bar:
        for prefix, members in groups:
            cache = None
            if prefix:
                done = decoder(input_ids=torch.tensor([prefix], device=device), use_cache=True)
                cache = getattr(done, "cache", None) or done.past_key_values   # transformers ≥ 5.2 / before
            order = sorted(members, key=len, reverse=True)
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                hidden = _forward(decoder, [inp[len(prefix):] for inp in chunk], cache, len(prefix), device)
                for row, inp in enumerate(chunk):
                    mine, k, end = jobs[inputs[inp]], scored[inp], len(inp) - len(prefix)
                    logp = torch.log_softmax(head(hidden[row, end - k:end]).float(), dim=-1)
                    for index, cont in mine:
                        rows = logp[k - len(cont):]
                        out[index] = rows.gather(1, torch.tensor(cont, device=rows.device)[:, None]).sum().item()
                bar.update(len(chunk))
    return out


def _forward(decoder, rows: list, cache, past: int, device):
    """The decoder's last hidden states over right-padded ``rows``, continuing ``cache`` (the
    keys and values of ``past`` prefix tokens, copied for each row) when it is given."""
    import torch

    from qpeft import padded

    ids, mask = padded(rows, 0)
    if cache is None:
        return decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
    rows_cache = copy.deepcopy(cache)          # the forward appends to it
    rows_cache.batch_repeat_interleave(len(rows))
    mask = torch.cat([torch.ones(len(rows), past, dtype=mask.dtype), mask], dim=1)
    name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    return decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                   **{name: rows_cache}).last_hidden_state


def prefix_groups(scored: dict) -> list[tuple[tuple, list]]:
    """``[(prefix, inputs)]``: inputs (``{input: tokens scored at its end}``) that agree on their
    first :data:`MIN_SHARED` tokens, with the longest prefix they all share that ends before
    any scored position; inputs sharing none with another are grouped under ``()``."""
    by_start = defaultdict(list)
    for inp in scored:
        by_start[inp[:MIN_SHARED] if len(inp) > MIN_SHARED else None].append(inp)
    groups, alone = [], []
    for start, members in by_start.items():
        shared = _common_prefix(members, min(len(inp) - scored[inp] for inp in members))
        if start is None or len(members) < 2 or shared < MIN_SHARED:
            alone += members
        else:
            groups.append((members[0][:shared], members))
    return groups + ([((), alone)] if alone else [])


def _common_prefix(rows: list, cap: int) -> int:
    """How many leading tokens every row shares, at most ``cap``."""
    first, n = rows[0], cap
    for row in rows[1:]:
        n = next((i for i, (a, b) in enumerate(zip(first[:n], row[:n])) if a != b), min(n, len(row)))
    return max(n, 0)
