"""The flags of ``qpeft run`` as data, the click options they make, and parsing a list of them.

The run command (:mod:`qpeft.core.cli.run_cmd`) is built from these, and ``qpeft compare``
parses the flags it passes to every cell with the same parser (:func:`parse`), so the
comparison grid needs nothing from the CLI.
"""
import click

from qpeft.core.settings import config as run_config

SETTINGS = [  # (flag, type, help) — the field is the flag with '_' for '-'
    ("--model", str, "Hugging Face id or directory, a .gguf file, or tiny (a random 2-layer test model) [default: embedded SmolLM2-135M-Instruct]"),
    ("--quant", str, f"quantizer spec, e.g. hqq:nbits=2 [default: {run_config.DEFAULT_QUANT}]"),
    ("--adapter", str, f"adapter spec, e.g. lora:r=8:targets=q_proj,v_proj+rslora [default: {run_config.DEFAULT_ADAPTER}]"),
    ("--init-adapter", click.Path(file_okay=False), "start from this adapter directory's weights: PEFT's format "
     "(adapter_config.json + adapter_model.safetensors) from PEFT, Unsloth, axolotl, LLaMA-Factory or qpeft; "
     "the adapter spec comes from it"),
    ("--data", click.Path(dir_okay=False), "training data: Alpaca, chat or text JSON/JSONL [default: bundled edge tasks]"),
    ("--validation-data", click.Path(dir_okay=False), "explicit validation file [default: seeded 80/20 split]"),
    ("--data-format", click.Choice(["auto", "alpaca", "chat", "text"]), "format of --data [default: auto]"),
    ("--template", click.Choice(["auto", "chat", "alpaca"]), "prompt template [default: the model's chat template]"),
    ("--max-length", int, "maximum tokens per example [default: 256]"),
    ("--evaluators", str, "evaluator specs separated by ';', or the flag repeated "
     f"[default: {run_config.DEFAULT_EVALUATORS}]"),
    ("--eval-limit", int, "evaluate on at most N examples per split, 0 for all [default: 0]"),
    ("--steps", int, "optimizer steps; 0 to train for --epochs [default: 100]"),
    ("--epochs", float, "epochs when --steps is 0 [default: 1]"),
    ("--batch-size", int, "examples per optimizer step, across processes [default: 8]"),
    ("--grad-accum", int, "micro-batches per step [default: 1]"),
    ("--lr", float, "peak learning rate [default: 3e-4]"),
    ("--schedule", click.Choice(["constant", "cosine", "linear"]), "LR schedule after warmup [default: constant]"),
    ("--warmup-steps", int, "linear warmup steps [default: 0]"),
    ("--weight-decay", float, "AdamW weight decay [default: 0]"),
    ("--max-grad-norm", float, "gradient clipping, 0 to disable [default: 1.0]"),
    ("--optimizer", click.Choice(["adamw", "paged_adamw_32bit", "paged_adamw_8bit"]), "optimizer; paged ones need CUDA [default: adamw]"),
    ("--seed", int, "seed for data order, split, init and dropout [default: 42]"),
    ("--log-every", int, "log every N steps [default: 5]"),
    ("--eval-every", int, "validation loss every N steps (in metrics.jsonl and loss.png), 0 never [default: -1, five times per run]"),
    ("--save-every", int, "checkpoint every N steps [default: 50]"),
    ("--name", str, "run name [default: QUANT-ADAPTER]"),
    ("--output-dir", click.Path(file_okay=False), "where run directories go [default: runs]"),
    ("--device", str, "cpu, cuda, cuda:1 or auto [default: auto]"),
]
FLAGS = [("--resume", "continue RUN_DIR from its newest complete checkpoint"),
         ("--overwrite", "replace an existing run directory"),
         ("--skip-bad-lines", "skip malformed data lines instead of refusing them"),
         ("--train-on-prompt", "take the loss on prompt tokens too"),
         ("--packing", "pack short examples into --max-length sequences"),
         ("--gradient-checkpointing", "recompute activations in backward to save memory")]


REPEATABLE = ("--evaluators",)  # lists of specs (config.LIST_SETTINGS): the flag may repeat


def options(command):
    """Decorate a click command with the run settings' options (and ``--config``)."""
    for flag, typ, help_text in reversed(SETTINGS):
        many = flag in REPEATABLE
        command = click.option(flag, type=typ, default=None, multiple=many, help=help_text)(command)
    for flag, help_text in reversed(FLAGS):
        command = click.option(flag, is_flag=True, default=None, help=help_text)(command)
    return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                        help="YAML/JSON file of settings named like the flags; flags override it")(command)


@click.command("run")
@click.argument("run_dir", required=False)
@options
def _parser(run_dir, config_file, **flags):
    """Only parses: what ``qpeft run`` accepts (the command itself is in qpeft.core.cli.run_cmd)."""


def parse(flags: list, resilient: bool = False) -> dict:
    """The parameters ``qpeft run FLAGS`` receives (``--config`` as ``config_file``): click's
    usage errors for a bad flag or value; ``resilient`` parses what it can (no errors)."""
    return _parser.make_context("qpeft run", list(flags), resilient_parsing=resilient).params


def given(flags: dict) -> dict:
    """The flags given on the command line (a repeatable flag not given is an empty tuple)."""
    return {k: v for k, v in flags.items() if v is not None and v != ()}
