"""Running a quantizer × adapter grid: its cells, their specs checked, each existing cell
matched against its run record, one ``qpeft run`` process per cell.

    grid(quants, adapters) ─▶ cells (quantizers outermost; colliding run names refused)
    spec_errors            ─▶ every spec that would fail, found without starting a process
    cell_modes             ─▶ per cell: new, done (same settings, report there: skipped),
                              resume (same settings, no report: continued), overwrite (other
                              settings, only with --overwrite; else nothing runs)
    run_grid ─▶ run_cell   ─▶ python -m qpeft run --name CELL … [--resume|--overwrite], stderr
                              to logs/CELL.log; a failing cell is recorded, the grid goes on;
                              one line per cell with the grid's ETA

:mod:`qpeft.core.compare.table` tabulates and scores what the cells wrote.
"""
import dataclasses
import subprocess
import sys
from pathlib import Path

from qpeft.core.base.errors import QpeftError


@dataclasses.dataclass
class Cell:
    """One combination of the grid; ``name`` is its run directory's name."""

    quant: str
    adapter: str

    @property
    def name(self) -> str:
        from qpeft.core.settings.config import RunConfig

        return RunConfig(quant=self.quant, adapter=self.adapter).run_name


def grid(quants: list, adapters: list) -> list[Cell]:
    """Every quantizer × adapter cell, quantizers outermost; refuses colliding names."""
    cells = [Cell(q, a) for q in quants for a in adapters]
    names = [c.name for c in cells]
    if not cells:
        raise QpeftError("the grid is empty; pass e.g. --quant 'A;B' --adapter 'C;D'")
    if len(set(names)) != len(names):
        raise QpeftError(f"two cells share a run name ({sorted(n for n in names if names.count(n) > 1)[0]}); "
                         "remove the duplicate spec")
    return cells


def spec_errors(quants: list, adapters: list, export_quant: str | None = None) -> list[str]:
    """One line per quantizer or adapter spec that would fail, found without starting a process."""
    from qpeft.core.plugin import registry
    from qpeft.core.kinds.adapter import compose
    from qpeft.core.plugin.build import build_plugin

    reg = registry.default()
    checks = (("--quant", quants, lambda spec: build_plugin("quantizer", spec, reg)),
              ("--adapter", adapters, lambda spec: compose(spec, reg)),
              ("--export-quant", [export_quant] if export_quant else [],
               lambda spec: build_plugin("quantizer", spec, reg)))
    out = []
    for flag, specs, build in checks:
        for spec in dict.fromkeys(specs):
            try:
                build(spec)
            except QpeftError as exc:
                out.append(f"{flag} '{spec}': {exc}")
    return out


# Settings that change how a run is shown, not what it computes: a finished cell is reused
# whatever they were.
NOT_COMPARED = ("resume", "overwrite", "progress")


def run_flags(flags: list) -> dict:
    """The settings given in ``flags`` (``--config`` as ``config_file``), parsed by the run
    command's own parser: what every cell's process receives."""
    from qpeft.core.settings.flags import given, parse

    return given(parse(flags))


def grid_defaults(flags: list) -> list[str]:
    """The flags of ``GRID_RUN_DEFAULTS`` (core/settings/config.py) that neither ``flags`` nor
    their ``--config`` file set: what every cell gets beside ``flags``."""
    from qpeft.core.settings import config

    file = run_flags(flags).get("config_file")
    from_file = config.read_file(file) if file else {}
    out = []
    for key, value in config.GRID_RUN_DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        if key not in from_file and not any(f == flag or f.startswith(flag + "=") for f in flags):
            out += [flag, str(value)]
    return out


def cell_settings(cell: Cell, output_dir: Path, flags: list):
    """The RunConfig that the cell's ``qpeft run`` process builds from ``flags``, built the
    same way here (the run command's own parser and settings)."""
    from qpeft.core.settings import config

    parsed = run_flags([*flags, *grid_defaults(flags)])
    file = parsed.pop("config_file", None)
    return config.build(file, {**parsed, "quant": cell.quant, "adapter": cell.adapter, "name": cell.name,
                               "output_dir": str(output_dir)})


def _flat(cfg) -> dict:
    values = cfg.to_dict()
    values.update(values.pop("train"))
    return {k: v for k, v in values.items() if k not in NOT_COMPARED}


def cell_modes(cells: list, output_dir: Path, flags: list, overwrite: bool = False) -> dict:
    """``{cell name: mode}`` before any cell runs: "new"; "done" (its report is there and its
    run record has this grid's settings); "resume" (same settings, stopped before its report:
    continued from its checkpoint); "overwrite" (other settings or an unreadable record, with
    ``overwrite``). Other settings without ``overwrite`` stop the grid: a finished cell is
    never replaced, nor a stale one shown as this grid's, unasked."""
    from qpeft.core.run.record import RunRecord

    modes, problems = {}, []
    for cell in cells:
        run_dir = output_dir / cell.name
        if not run_dir.exists():
            modes[cell.name] = "new"
            continue
        wanted = _flat(cell_settings(cell, output_dir, flags))   # a bad flag is its own error, not the record's
        try:
            recorded = _flat(RunRecord.read(run_dir).settings(run_dir))
        except QpeftError as exc:
            changed = [f"its run record cannot be used ({exc})"]
        else:
            changed = [f"--{k.replace('_', '-')} {recorded.get(k)!r} (this grid: {v!r})"
                       for k, v in wanted.items() if recorded.get(k) != v]
        if not changed:
            modes[cell.name] = "done" if (run_dir / "report.json").is_file() else "resume"
        elif overwrite:
            modes[cell.name] = "overwrite"
        else:
            problems.append(f"{run_dir} was run with {changed[0]}")
    if problems:
        more = f" (and {len(problems) - 1} more cell{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise QpeftError(f"{problems[0]}{more}; nothing was run: pass --overwrite to run those cells "
                         "again, or another --output-dir to keep both")
    return modes


def run_cell(cell: Cell, output_dir: Path, flags: list, log_dir: Path, mode: str = "new") -> str | None:
    """``qpeft run`` for one cell in its own process (``mode`` "resume" or "overwrite" adds
    that flag); None on success, else the last stderr line. The whole stderr goes to
    ``log_dir/<cell>.log``."""
    cmd = [sys.executable, "-m", "qpeft", "run", "--name", cell.name, "--output-dir", str(output_dir),
           "--quant", cell.quant, "--adapter", cell.adapter, *flags]
    if mode in ("resume", "overwrite"):
        cmd.append(f"--{mode}")
    last = ""
    with open(log_dir / f"{cell.name}.log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, text=True, errors="replace")
        for line in proc.stderr:
            log.write(line)
            shown = line.split("\r")[-1].strip()
            last = shown or last
        code = proc.wait()
    return None if code == 0 else (last or f"exited with status {code}")


def run_grid(cells: list, output_dir: Path, flags: list, say=print, after=None, modes: dict | None = None) -> dict:
    """Run every cell not finished yet (``modes``: from :func:`cell_modes`; None: every cell
    new); ``{cell name: error or None}``. One line per cell: its outcome, the cells done, the
    grid's elapsed time and its ETA (mean measured time of the cells run here × the cells
    left). ``after(cell, error)`` is called for each cell, right after it (``--export-quant``,
    the tables rewritten so far)."""
    import time

    log_dir = output_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    errors, ran, start = {}, [], time.perf_counter()
    for number, cell in enumerate(cells, 1):
        mode = (modes or {}).get(cell.name, "new")
        if mode == "done":
            errors[cell.name], outcome = None, "done before with these settings, skipped"
        else:
            began = time.perf_counter()
            errors[cell.name] = run_cell(cell, output_dir, flags, log_dir, mode=mode)
            ran.append(time.perf_counter() - began)
            outcome = f"ok in {clock(ran[-1])}" if errors[cell.name] is None else errors[cell.name]
        say(f"  {cell.name}: {outcome} · {progress_line(number, len(cells), ran, time.perf_counter() - start, cells[number:], modes)}")
        if after is not None:
            after(cell, errors[cell.name])
    return errors


def progress_line(done: int, total: int, ran: list, elapsed: float, rest: list, modes: dict | None) -> str:
    """``"3/28 cells · 7m12s elapsed · ETA 1h02m"``: the ETA is the mean time of the cells run
    so far times the cells still to run (those done before are skipped, and not counted)."""
    left = sum(1 for c in rest if (modes or {}).get(c.name, "new") != "done")
    eta = "ETA –" if not ran else f"ETA {clock(left * sum(ran) / len(ran))}"
    return f"{done}/{total} cells · {clock(elapsed)} elapsed · {eta if left else 'grid done'}"


def clock(seconds: float) -> str:
    """``"45s"``, ``"7m12s"``, ``"1h02m"``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
