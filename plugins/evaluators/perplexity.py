"""``perplexity``: exp of the mean token cross-entropy on the validation split.

Token-weighted over the whole split (not a mean of per-example perplexities), on the
response tokens only unless the run trains on prompts — the same tokens the loss uses.
"""
import dataclasses
import math

from qpeft import Evaluator, hookimpl, mean_loss, option


@dataclasses.dataclass
class PerplexityOptions:
    batch_size: int = option(8, "sequences per forward pass")


class Perplexity(Evaluator):
    name = "perplexity"
    reproducible = True   # a function of the weights, the data and its options: its baseline is computed once
    description = "Perplexity on the validation split (token-weighted, response tokens)"
    Options = PerplexityOptions
    higher_is_better = {"perplexity": False, "eval_loss": False}
    primary_metric = "perplexity"

    def evaluate(self, ctx):
        items = [ctx.encode(e) for e in ctx.validation]
        items = [i for i in items if i is not None]
        if not items:
            return {}
        loss, count = mean_loss(ctx.model, items, ctx.tokenizer.pad_token_id,
                                self.options.batch_size, ctx.device)
        return {"eval_loss": round(loss, 5), "perplexity": round(math.exp(loss), 4),
                "eval_tokens": count, "perplexity_n": count}   # _n: the sample size, read by reports


@hookimpl
def register_evaluators(register):
    register(Perplexity)
