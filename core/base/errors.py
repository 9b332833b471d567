"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""
import difflib


class QpeftError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2
    prefix = "Error: "     # how the CLI opens the line


class OptionsError(QpeftError):
    """An option was unknown, of the wrong type or out of range."""


class UnknownPluginError(QpeftError):
    """A plugin name that no installed plugin provides."""


class PluginLoadError(QpeftError):
    """A plugin failed to import, and the user asked for something it provides."""


class ModelLoadError(QpeftError):
    """A model could not be found or loaded."""


def closest(word: str, choices) -> str | None:
    """The choice most like ``word``, or None when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return match[0] if match else None


def unknown(what: str, word: str, choices, hint: str = "", lead: str = "") -> str:
    """The one-line message for an unknown name: the closest match, then all choices."""
    choices = sorted(choices)
    near = closest(word, choices)
    msg = lead or f"unknown {what} '{word}'"
    msg += f"; did you mean '{near}'?" if near else "."
    msg += f" Available: {', '.join(choices) if choices else '(none)'}"
    return msg + (f". {hint}" if hint else "")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for a one-line error (the type's name where
    the message alone says nothing: a KeyError's key, an empty message)."""
    lines = str(exc).strip().splitlines()
    first = lines[0].strip() if lines else ""
    return f"{type(exc).__name__}: {first}" if isinstance(exc, KeyError) or not first else first
