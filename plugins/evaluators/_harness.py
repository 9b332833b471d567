"""The parts of the ``lm-eval`` evaluator that import ``lm_eval``: the model and the tasks.

Imported only when the evaluator runs; the registry skips modules whose name starts with
``_``. :class:`QpeftLM` is lm-evaluation-harness's model API over a qpeft model — every
request type of lm-eval 0.4::

    loglikelihood(context, continuation)   ─▶ Σ log p(continuation tokens | context), is greedy
    loglikelihood_rolling(text)            ─▶ Σ log p(text), in windows of max_length tokens
    generate_until(context, gen_kwargs)    ─▶ greedy text, cut at the first stop string

is computed as lm-eval's own ``HFLM`` computes it (the context/continuation split, the
left truncation to ``max_length``, the rolling windows, the stop strings), batched, on
the model's device and in its compute dtype (the quantized layers compute in the
quantizer's ``compute_dtype``; log-softmax is taken in float32).

:func:`task_manager` is lm-eval's ``TaskManager`` whose task YAMLs may name their data
relative to themselves: a relative ``data_files``, ``data_dir`` or ``dataset_path`` is
taken beside the YAML when something is there (lm-eval itself takes it from the working
directory). Tasks whose data would come from the Hub are noted, for a one-line error.
"""
import glob
import json
from collections import defaultdict
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._factory import TaskFactory
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from qpeft import padded


class QpeftLM(TemplateLM):
    """``model`` and ``tokenizer`` as an lm-eval LM. ``max_length``: tokens the model reads;
    ``max_gen_toks``: generated tokens when a task does not say."""

    def __init__(self, model, tokenizer, device="cpu", batch_size: int = 8,
                 max_length: int = 2048, max_gen_toks: int = 256):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self._device = torch.device(device)
        self.batch_size, self.max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks

    # -- what TemplateLM needs ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Conditions an empty context: BOS, else EOS (as ``HFLM``)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "qpeft")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        """The tokenizer's ids; its own special-token default unless told (as ``HFLM``)."""
        flags = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **flags)

    def apply_chat_template(self, chat_history: list, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # -- log-likelihood -------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple]:
        """``(Σ log p(continuation | context), greedy?)`` for ``(key, context ids, continuation ids)``.

        The model reads ``(context + continuation)[-(max_length+1):-1]``; the continuation is
        scored at the last positions. Requests with the same input (the one-token choices
        of a question) share a row, and only the scored positions go through the LM head.
        """
        rows, jobs = {}, defaultdict(list)
        for index, (_, ctx, cont) in enumerate(requests):
            inp = tuple((list(ctx) + list(cont))[-(self.max_length + 1):-1])
            jobs[rows.setdefault(inp, len(rows))].append((index, list(cont)))
        order = sorted(rows, key=len, reverse=True)
        out = [None] * len(requests)
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        with torch.no_grad():
            for start in tqdm(range(0, len(order), self.batch_size), desc="lm-eval loglikelihood",
                              leave=False, disable=disable_tqdm or None):
                chunk = order[start:start + self.batch_size]
                ids, mask = padded(chunk, self.tokenizer.pad_token_id or 0)
                hidden = decoder(input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                                 use_cache=False).last_hidden_state
                for row, inp in enumerate(chunk):
                    mine = jobs[rows[inp]]
                    k = max(len(cont) for _, cont in mine)
                    logp = torch.log_softmax(head(hidden[row, len(inp) - k:len(inp)]).float(), dim=-1)
                    for index, cont in mine:
                        scored, target = logp[k - len(cont):], torch.tensor(cont, device=logp.device)
                        out[index] = (scored.gather(1, target[:, None]).sum().item(),
                                      bool((scored.argmax(-1) == target).all()))
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """``log p(text)`` of each whole text, every token predicted once, in disjoint
        windows of at most ``max_length`` tokens (the first conditioned on the prefix token)."""
        windows, owner = [], []
        for index, (text,) in enumerate(r.args for r in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[index] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    # -- generation -----------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, batched per distinct ``gen_kwargs``; each is cut at the
        first of the task's ``until`` strings (and the EOS text). Sampling options of a task
        are ignored: qpeft's evaluations are greedy and reproducible."""
        groups = defaultdict(list)
        for index, (context, gen_kwargs) in enumerate(r.args for r in requests):
            groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append((index, context))
        out = [""] * len(requests)
        for key, items in groups.items():
            gen_kwargs = json.loads(key)
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            eos = self.tokenizer.decode([self.eot_token_id])
            until += [eos] if eos and eos not in until else []
            new = int(gen_kwargs.get("max_gen_toks") or gen_kwargs.get("max_new_tokens") or self.max_gen_toks)
            encoded = [(i, self.tok_encode(c)[-max(self.max_length - new, 1):]) for i, c in items]
            encoded.sort(key=lambda item: -len(item[1]))
            for start in tqdm(range(0, len(encoded), self.batch_size), desc="lm-eval generate",
                              leave=False, disable=disable_tqdm or None):
                chunk = encoded[start:start + self.batch_size]
                for (index, _), text in zip(chunk, self._greedy([p for _, p in chunk], new, until)):
                    out[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return out

    def _greedy(self, prompts: list, max_new_tokens: int, until: list) -> list[str]:
        """One left-padded batch, stopped per row at a stop string, cut before it."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        ids, mask = padded(prompts, pad, left=True)
        width = ids.shape[1]
        stops = [s for s in until if s]
        with torch.no_grad():
            generated = self.model.generate(
                input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                stopping_criteria=StoppingCriteriaList([StopStrings(self.tokenizer, stops, width)]))
        texts = self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        return [_cut(t, stops) for t in texts]


class StopStrings(StoppingCriteria):
    """Per row: done once the text generated after position ``start`` holds a stop string."""

    def __init__(self, tokenizer, stops: list, start: int):
        self.tokenizer, self.stops, self.start = tokenizer, stops, start

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:])
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def _cut(text: str, stops: list) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


# -- tasks ---------------------------------------------------------------------------------
class LocalDataFactory(TaskFactory):
    """lm-eval's task factory, with data paths taken beside each task's YAML. ``last`` is
    the task built last (the one a loading error is about) and ``remote`` maps each task
    built whose ``dataset_path`` is neither a local path nor a builder to that path."""

    def __init__(self, meta=None):
        super().__init__(meta=meta)
        self.last, self.remote = None, {}

    def _load_full_config(self, entry, overrides=None) -> dict:
        cfg = super()._load_full_config(entry, overrides)
        if entry.yaml_path:
            cfg = localise(cfg, Path(entry.yaml_path).parent)
        self.last = str(cfg.get("task", entry.name))
        path = cfg.get("dataset_path")
        if isinstance(path, str) and not cfg.get("custom_dataset") and not _is_local(path):
            self.remote[self.last] = path
        return cfg


def task_manager(include: list, defaults: bool) -> TaskManager:
    """A TaskManager over the folders ``include`` (and lm-eval's own tasks if ``defaults``)."""
    manager = TaskManager(include_path=[str(p) for p in include], include_defaults=defaults)
    manager._factory = LocalDataFactory(meta=manager.metadata)
    return manager


def remote_task(manager) -> tuple[str, str] | None:
    """``(task, dataset path)`` when the task built last needs data from the Hub."""
    factory = manager._factory
    return (factory.last, factory.remote[factory.last]) if factory.last in factory.remote else None


def localise(cfg: dict, base: Path) -> dict:
    """``cfg`` with relative data paths that exist under ``base`` made absolute."""
    kwargs = cfg.get("dataset_kwargs")
    out = dict(cfg)
    if isinstance(cfg.get("dataset_path"), str):
        out["dataset_path"] = _beside(cfg["dataset_path"], base)
    if isinstance(kwargs, dict):
        kwargs = dict(kwargs)
        if isinstance(kwargs.get("data_dir"), str):      # data_files are then relative to it
            kwargs["data_dir"] = _beside(kwargs["data_dir"], base)
        elif kwargs.get("data_files") is not None:
            kwargs["data_files"] = _each(kwargs["data_files"], base)
        out["dataset_kwargs"] = kwargs
    return out


def _each(files, base: Path):
    if isinstance(files, str):
        return _beside(files, base)
    if isinstance(files, dict):
        return {split: _each(f, base) for split, f in files.items()}
    return [_each(f, base) for f in files]


def _beside(path: str, base: Path) -> str:
    if "://" in path or Path(path).expanduser().is_absolute():
        return path
    return str(base / path) if glob.glob(str(base / path), recursive=True) else path


def _is_local(path: str) -> bool:
    """A packaged ``datasets`` builder (json, csv, parquet, …) or an existing file or folder."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return path in _PACKAGED_DATASETS_MODULES or Path(path).expanduser().exists()
