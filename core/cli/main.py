"""The ``qpeft`` command group: ``--version``, ``--debug`` and one-line errors.

Every user error (a :class:`QpeftError` or a click usage error) is printed as one line on
stderr with exit status 2; ``--debug`` (or ``QPEFT_DEBUG=1``) shows the traceback instead.
"""
import errno
import os
import signal
import sys

import click

from qpeft.core.cli.cache_cmd import cache_command
from qpeft.core.cli.chat_cmd import chat_command
from qpeft.core.cli.compare_cmd import compare_command
from qpeft.core.cli.export_cmd import export_command
from qpeft.core.cli.eval_cmd import eval_command
from qpeft.core.cli.generate_cmd import generate_command
from qpeft.core.cli.list_cmd import list_command
from qpeft.core.cli.run_cmd import run_command
from qpeft.core.cli.quantize_cmd import quantize_command
from qpeft.core.base.errors import QpeftError
from qpeft.core.base.rundir import disk_error
from qpeft.core.base.version import __version__


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM)


class QpeftGroup(click.Group):
    """A click group whose errors are one line on stderr (exit 2), tracebacks under --debug."""

    def main(self, args=None, prog_name="qpeft", **extra):
        args = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in args or os.environ.get("QPEFT_DEBUG") == "1"
        extra["standalone_mode"] = False
        previous = _catch_sigterm()
        try:
            code = super().main(args=args, prog_name=prog_name, **extra)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except Terminated:   # outside training (which defers signals and checkpoints first)
            click.echo("Aborted (SIGTERM).", err=True)
            sys.exit(143)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            if debug:
                raise
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(2)
        except QpeftError as exc:
            if debug:
                raise
            click.echo(f"{exc.prefix}{exc}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:   # a full disk or an unwritable path that no command foresaw
            if debug or exc.errno not in DISK_ERRORS:
                raise
            click.echo(f"Error: {disk_error(exc, exc.filename or 'a file')}", err=True)
            sys.exit(2)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        sys.exit(code if isinstance(code, int) else 0)


class Terminated(BaseException):
    """SIGTERM arrived outside training (loading a model, evaluating)."""


def _terminated(signum, frame):
    raise Terminated()


def _catch_sigterm():
    """SIGTERM raises :class:`Terminated` (so it ends with a line, as Ctrl-C does); returns the
    handler it replaced, or None off the main thread, where signals cannot be handled."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _terminated)


@click.group("qpeft", cls=QpeftGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="qpeft")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Fine-tune quantized LLMs with parameter-efficient adapters, and compare them.

    \b
    Start with:  qpeft list            # every quantizer, adapter and evaluator
                 qpeft run             # the whole pipeline on the embedded defaults
    """
    # --debug is read by QpeftGroup.main before parsing; nothing to do here.


cli.add_command(list_command)
cli.add_command(run_command)
cli.add_command(quantize_command)
cli.add_command(export_command)
cli.add_command(eval_command)
cli.add_command(compare_command)
cli.add_command(generate_command)
cli.add_command(chat_command)
cli.add_command(cache_command)


def main() -> None:
    """Entry point of the ``qpeft`` script and ``python -m qpeft``."""
    from qpeft.core.plugin.install_check import shadow_problem

    problem = shadow_problem()
    if problem:
        click.echo(f"Error: {problem}", err=True)
        sys.exit(2)
    cli.main()
