"""``perplexity``: exp of the mean token cross-entropy on the validation split.

Token-weighted over the whole split (not a mean of per-example perplexities), on the
response tokens only unless the run trains on prompts — the same tokens the loss uses.
"""
import dataclasses
import math

import torch

from qpeft import hookimpl
from qpeft.core.batching import collate
from qpeft.core.evaluator import Evaluator
from qpeft.core.loss import token_loss_sum
from qpeft.core.options import option


@dataclasses.dataclass
class PerplexityOptions:
    batch_size: int = option(8, "sequences per forward pass")


class Perplexity(Evaluator):
    name = "perplexity"
    description = "Perplexity on the validation split (token-weighted, response tokens)"
    Options = PerplexityOptions
    higher_is_better = {"perplexity": False, "eval_loss": False}

    def evaluate(self, ctx):
        items = [ctx.encode(e) for e in ctx.validation]
        items = [i for i in items if i is not None]
        if not items:
            return {}
        total, count = 0.0, 0
        pad = ctx.tokenizer.pad_token_id
        with torch.no_grad():
            for start in range(0, len(items), self.options.batch_size):
                batch = collate(items[start:start + self.options.batch_size], pad)
                batch = {k: v.to(ctx.device) for k, v in batch.items()}
                s, n = token_loss_sum(ctx.model, **batch)
                total, count = total + s.item(), count + n
        loss = total / max(count, 1)
        return {"eval_loss": round(loss, 5), "perplexity": round(math.exp(loss), 4),
                "eval_tokens": count}


@hookimpl
def register_evaluators(register):
    register(Perplexity)
