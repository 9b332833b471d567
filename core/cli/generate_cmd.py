"""``qpeft generate``: answer prompts with a finished run's model (or an adapter directory
over a base model), through the same template and greedy generation as ``qpeft eval``'s
generation-based evaluators. :func:`load` is shared with ``qpeft chat``."""
import click

from qpeft.core.cli import params
from qpeft.core.cli.run_cmd import SETTINGS

# An adapter directory's base (a run directory brings its own): as ``qpeft eval`` takes them.
BASE_FLAGS = ["--model", "--quant", "--template"]
HELP = {"--model": "the base model: Hugging Face id, directory or .gguf [default: embedded SmolLM2-135M-Instruct]",
        "--quant": "quantizer spec of the base, e.g. nf4, hqq:nbits=2, none [default: nf4]"}


def target_options(command):
    """DIR's options shared by ``generate`` and ``chat``: --no-adapter, --device, --rank and
    an adapter directory's base (--model, --quant, --template)."""
    helps = {flag: (typ, HELP.get(flag, text)) for flag, typ, text in SETTINGS}
    for flag in reversed(BASE_FLAGS):
        typ, text = helps[flag]
        command = click.option(flag, type=typ, default=None, help=f"adapter directory: {text}")(command)
    command = click.option("--rank", type=params.RANK,
                           help="a dynamic-rank adapter (qdylora) at this rank ≤ its saved rank")(command)
    command = click.option("--device", default="auto", show_default=True, callback=params.device,
                           help="cpu, cuda, cuda:1 or auto")(command)
    command = click.option("--no-adapter", is_flag=True,
                           help="the quantized base alone: the run's model and quantizer, no adapter")(command)
    return click.argument("directory", metavar="DIR", type=click.Path(exists=True, file_okay=False))(command)


def load(directory, no_adapter=False, device="auto", rank=None, say=print, **base):
    """``(Rebuilt, template, device)`` for DIR: a run directory rebuilt (its quantized model and
    saved adapter, or with ``no_adapter`` the base alone, loaded as the run loaded it), or
    an adapter directory over ``--model``/``--quant``; ``template`` is what the run's
    evaluators render prompts with (None: the tokenizer's chat template when it has one)."""
    from pathlib import Path

    from qpeft.core.settings import config
    from qpeft.core.train import distributed
    from qpeft.core.run import pipeline, rebuild
    from qpeft.core.base.errors import QpeftError
    from qpeft.core.run.record import RunRecord

    if no_adapter and rank is not None:
        raise QpeftError("--rank selects a rank of the adapter; --no-adapter has none; drop one of them")
    given = {k: v for k, v in base.items() if v is not None}
    directory = Path(directory)
    device = distributed.device_for(device)
    if (directory / "adapter_config.json").is_file() or (given and not (directory / "config.json").is_file()):
        from qpeft.core.model import models
        from qpeft.core.interop import peft_files

        cfg = config.build(None, {**given, "init_adapter": str(directory)})
        plan = pipeline.plan(cfg)
        peft_files.check_fits(directory, cfg.model, plan.init.base_model)
        what = "alone" if no_adapter else f"with {directory.name}"
        say(f"qpeft: loading {cfg.model or models.EMBEDDED} × {cfg.quant} {what} on {device}")
        built = rebuild.onto_base(cfg, plan, device, rank, no_adapter=no_adapter)
    else:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise click.UsageError(f"{flags}: only for an adapter directory; {directory} is a run directory, "
                                   f"which brings its own model, quantizer and template")
        record = RunRecord.read(directory)
        what = "no adapter" if no_adapter else record.adapter_spec
        say(f"qpeft: rebuilding {directory.name} ({record.quantizer.name} × {what}) on {device}")
        built = rebuild.rebuild(directory, device, rank, record, no_adapter=no_adapter)
    return built, pipeline._template(built.cfg), device


def prompt_ids(messages: list, tokenizer, template) -> list:
    """The token ids the model answers ``messages`` (a conversation ending with a user turn)
    from: the run's template — the model's chat template for chat models — exactly as the
    ``prompts`` and ``accuracy`` evaluators build them (:func:`qpeft.core.dataset.templates.prompt_ids`)."""
    from qpeft.core.dataset import templates
    from qpeft.core.dataset.examples import Example

    instruction = messages[-1]["content"] if len(messages) == 1 else None
    example = Example(messages=list(messages), instruction=instruction, source="prompt")
    return templates.prompt_ids(example, tokenizer, template)


def read_prompts(prompt: tuple, file) -> list[str]:
    """``--prompt`` texts, then the lines of ``--file`` (one prompt a line; blank lines skipped)."""
    from qpeft.core.base.errors import QpeftError

    prompts = list(prompt)
    if file is not None:
        try:
            text = open(file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as exc:
            raise QpeftError(f"--file {file} cannot be read ({exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0][:120] if str(exc) else 'no detail'}); "
                             f"pass a UTF-8 text file, one prompt a line") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise click.UsageError("nothing to answer; pass --prompt TEXT (repeatable) or --file prompts.txt")
    return prompts


def sampled(model, tokenizer, ids: list, max_new_tokens: int, temperature: float, device) -> str:
    """One sampled continuation of ``ids`` at ``temperature`` (seeded by the caller)."""
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids], device=device), max_new_tokens=max_new_tokens,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                             do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


@click.command("generate")
@target_options
@click.option("--prompt", "prompt", multiple=True, help="a prompt to answer (repeatable)")
@click.option("--file", "file", type=click.Path(dir_okay=False), help="a text file of prompts, one a line")
@click.option("--json", "as_json", is_flag=True, help="one JSON object a line: {prompt, answer}")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="tokens generated per answer at most")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy, as the evaluators generate; above 0: sampled")
@click.option("--seed", type=int, default=0, show_default=True, help="random seed (for sampling)")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="prompts generated at once (greedy)")
def generate_command(directory, no_adapter, device, rank, prompt, file, as_json, max_new_tokens, temperature,
                     seed, batch_size, **base):
    """Answer prompts with DIR's model: a run directory or an adapter directory.

    Each prompt is one user turn rendered with the run's template (the model's chat
    template for a chat model) and answered greedily by default — the text the 'prompts'
    and 'accuracy' evaluators of 'qpeft eval' would generate for it. Answers go to stdout,
    loading messages to stderr.

    \b
    Examples:
      qpeft generate runs/nf4-lora --prompt "Which number is larger, 9.11 or 9.9?"
      qpeft generate runs/nf4-lora --file prompts.txt --json > answers.jsonl
      qpeft generate runs/nf4-lora --no-adapter --prompt "..."      # the quantized base
      qpeft generate ./peft-lora --model ./base-model --quant nf4 --prompt "..."
    """
    import json

    import torch

    from qpeft.core.model.generation import generate

    prompts = read_prompts(prompt, file)
    built, template, device = load(directory, no_adapter, device, rank,
                                   say=lambda line: click.echo(line, err=True), **base)
    model, tokenizer = built.model, built.tokenizer
    ids = [prompt_ids([{"role": "user", "content": p}], tokenizer, template) for p in prompts]
    torch.manual_seed(seed)
    if temperature == 0:
        answers = generate(model, tokenizer, ids, max_new_tokens, batch_size, device)
    else:
        answers = [sampled(model, tokenizer, i, max_new_tokens, temperature, device) for i in ids]
    for n, (p, answer) in enumerate(zip(prompts, answers)):
        if as_json:
            click.echo(json.dumps({"prompt": p, "answer": answer}, ensure_ascii=False))
        elif len(prompts) == 1:
            click.echo(answer)
        else:
            click.echo(("\n" if n else "") + f"> {p}\n{answer}")
