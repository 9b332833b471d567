"""Option checks shared by several commands, run by click at parse time (before any load)."""
import click


def device(ctx, param, value):
    """``--device``: a device name that exists on this machine (one line otherwise)."""
    from qpeft.core.settings.config import device_problem

    problem = device_problem(value) if value is not None else None
    if problem:
        raise click.BadParameter(problem.removeprefix("--device "), ctx, param)
    return value


RANK = click.IntRange(min=1)    # a LoRA rank
COUNT = click.IntRange(min=0)   # a number of examples, 0 for all
