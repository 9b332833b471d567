"""Turning an :class:`~qpeft.core.dataset.examples.Example` into token ids and labels.

Two prompt templates:

* ``chat``   — the tokenizer's own chat template (``apply_chat_template`` with the
  generation prompt); an optional system message is prepended when the example has none.
* ``alpaca`` — the Stanford Alpaca prompt, with or without an ``### Input:`` section.

The default is ``chat`` when the tokenizer has a chat template, else ``alpaca``.

A sequence is ``prompt ids + response ids + [eos]``. The prompt and the response are
tokenized separately, so the prompt's ids are exactly what :func:`prompt_ids` gives the
model at generation time. Labels are -100 on the prompt (loss on the response only) unless
``train_on_prompt=True``; the eos token is always supervised, so the model learns to stop.
Plain-text examples are ``bos + text + eos``, supervised in full.

Overlong sequences (more than ``max_length`` tokens): the prompt is cut from the left
(its end, nearest the response, is kept). An example whose response and eos alone do not
fit, leaving at least one prompt token, is dropped. Plain text is cut from the right. Both
are counted in :class:`EncodeStats`, and :func:`encode_all` warns once with the counts.
"""
import dataclasses
import warnings

from qpeft.core.base.errors import QpeftError

TEMPLATES = ("chat", "alpaca")
IGNORE = -100

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


class TemplateError(QpeftError):
    """A prompt template is unknown or does not fit the tokenizer."""


@dataclasses.dataclass
class Encoded:
    """Token ids of one sequence and its labels (-100 where no loss is taken)."""

    input_ids: list
    labels: list
    task: str | None = None     # the example's task (MTLoRA routes by it; batches carry it)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclasses.dataclass
class EncodeStats:
    """How many examples :func:`encode_all` kept whole, truncated, or dropped."""

    kept: int = 0
    truncated: int = 0
    dropped: int = 0


def default_template(tokenizer) -> str:
    """``"chat"`` when the tokenizer has a chat template, else ``"alpaca"``."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def _check_template(tokenizer, template: str | None) -> str:
    template = template or default_template(tokenizer)
    if template not in TEMPLATES:
        raise TemplateError(f"unknown template '{template}'; use one of {', '.join(TEMPLATES)}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise TemplateError("this tokenizer has no chat template; pass template='alpaca'")
    return template


def render_prompt(example, tokenizer, template: str | None = None, system: str | None = None) -> str:
    """The prompt text the model sees before its answer (for training and generation)."""
    template = _check_template(tokenizer, template)
    if example.is_text:
        raise TemplateError(f"{example.source}: a plain-text example has no prompt; "
                            "use instruction or chat records for evaluation")
    if template == "chat":
        messages = list(example.messages)
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    instruction, inp = _alpaca_parts(example, system)
    if inp:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=inp)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def _alpaca_parts(example, system: str | None) -> tuple[str, str]:
    """Instruction and input for the Alpaca template; chat turns are joined into the instruction."""
    if example.instruction is not None:
        instruction, inp = example.instruction, example.input
    else:
        instruction = "\n\n".join(m["content"] for m in example.messages)
        inp = ""
    if system:
        instruction = f"{system}\n\n{instruction}"
    return instruction, inp


def prompt_ids(example, tokenizer, template: str | None = None, system: str | None = None) -> list:
    """Token ids of :func:`render_prompt` — what to feed ``generate`` at evaluation time."""
    text = render_prompt(example, tokenizer, template, system)
    template = _check_template(tokenizer, template)
    # A chat template writes its own special tokens (bos included) into the text.
    prefix = [] if template == "chat" else bos_prefix(tokenizer)
    return prefix + tokenizer(text, add_special_tokens=False)["input_ids"]


def bos_prefix(tokenizer) -> list:
    """The ids the tokenizer puts before text by default (e.g. ``[bos]``), often none."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def encode(example, tokenizer, template: str | None = None, max_length: int = 512,
           train_on_prompt: bool = False, system: str | None = None):
    """``(Encoded, status)`` for one example; status is "kept", "truncated" or "dropped".

    On "dropped" the Encoded is None.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TemplateError("the tokenizer has no eos token; set tokenizer.eos_token first")
    if example.is_text:
        ids = bos_prefix(tokenizer) + tokenizer(example.text, add_special_tokens=False)["input_ids"]
        ids.append(eos)
        status = "truncated" if len(ids) > max_length else "kept"
        ids = ids[:max_length]
        return Encoded(ids, list(ids), example.task), status
    prompt = prompt_ids(example, tokenizer, template, system)
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [eos]
    status = "kept"
    if len(prompt) + len(response) > max_length:
        room = max_length - len(response)
        if room < 1:
            return None, "dropped"
        prompt, status = prompt[-room:], "truncated"
    prompt_labels = list(prompt) if train_on_prompt else [IGNORE] * len(prompt)
    return Encoded(prompt + response, prompt_labels + response, example.task), status


def encode_all(examples, tokenizer, template: str | None = None, max_length: int = 512,
               train_on_prompt: bool = False, system: str | None = None):
    """``(list of Encoded, EncodeStats)``; warns once if any example was truncated or dropped."""
    if max_length < 2:
        raise TemplateError(f"max_length must be at least 2, got {max_length}; e.g. 512")
    template = _check_template(tokenizer, template)
    out, stats = [], EncodeStats()
    for example in examples:
        enc, status = encode(example, tokenizer, template, max_length, train_on_prompt, system)
        setattr(stats, status, getattr(stats, status) + 1)
        if enc is not None:
            out.append(enc)
    if stats.truncated or stats.dropped:
        warnings.warn(f"max_length={max_length}: truncated {stats.truncated} and dropped "
                      f"{stats.dropped} of {len(examples)} examples; raise max_length to keep "
                      "them whole", stacklevel=2)
    return out, stats
