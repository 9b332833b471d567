"""Building one plugin from the spec a user typed (``hqq:nbits=2``): the quantizer and the
evaluators of a run, of each cell of a comparison, and of the conformance kit. An adapter
spec composes several parts instead: :func:`qpeft.core.kinds.adapter.compose`."""
from qpeft.core.base.errors import QpeftError
from qpeft.core.base.spec import parse
from qpeft.core.plugin.base import Plugin


def build_plugin(kind: str, spec: str, reg) -> Plugin:
    """One quantizer or evaluator from ``name[:key=value...]``."""
    parts = parse(spec)
    if len(parts) != 1:
        raise QpeftError(f"a {kind} spec names one plugin; got '{spec}'")
    name, values = parts[0]
    return reg.get(kind, name).from_values(values)
