"""The flags of ``qpeft run`` as data, the click options they make, and parsing a list of them.

The run command (:mod:`qpeft.core.cli.run_cmd`) is built from these, and ``qpeft compare``
parses the flags it passes to every cell with the same parser (:func:`parse`), so the
comparison grid needs nothing from the CLI.
"""
import dataclasses
import typing
from typing import Literal

import click

from qpeft.core.settings import config as run_config

def _type(hint, meta: dict):
    """The click type of a setting: a choice for a Literal, a path, else int/float/str."""
    if typing.get_origin(hint) is Literal:
        return click.Choice(list(typing.get_args(hint)))
    if meta["path"]:
        return click.Path(file_okay=meta["path"] != "dir", dir_okay=meta["path"] != "file")
    plain = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]   # str | None → str
    return plain[0]


def _declared():
    """``(flag, field, hint, metadata)`` for every setting that has a flag, in declaration order."""
    for cls in (run_config.RunConfig, run_config.TrainConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("flag"):
                yield "--" + f.name.replace("_", "-"), f, hints[f.name], f.metadata


def _help(f, meta: dict) -> str:
    shown = meta["shown"] if meta["shown"] is not None else f.default
    return f"{meta['help']} [default: {shown}]"


# (flag, type, help) and (flag, help) for on/off flags: generated from the settings' declarations
SETTINGS = [(flag, _type(hint, meta), _help(f, meta)) for flag, f, hint, meta in _declared() if hint is not bool]
FLAGS = [(flag, meta["help"]) for flag, f, hint, meta in _declared() if hint is bool]


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
