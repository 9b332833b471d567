"""``qpeft list``: every plugin by kind, with origin, description and options (kept between
calls: :mod:`qpeft.core.plugin.listing`)."""
import json

import click

from qpeft.core.plugin import registry
from qpeft.core.plugin.listing import listing


@click.command("list")
@click.argument("kind", required=False, type=click.Choice(sorted(registry.KINDS)))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_command(kind: str | None, as_json: bool) -> None:
    """List quantizers, adapters and evaluators (or only KIND) with their options."""
    data = listing(kind)
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    for k in [kind] if kind else list(registry.KINDS):
        click.secho(f"{k}s", bold=True)
        for rec in data[k]:
            click.echo(f"  {rec['name']:<14} {rec['description']}  [{rec['origin']} {rec['version']}]")
            for extra in ("role", "modifies", "slots"):
                if rec.get(extra):
                    value = ", ".join(rec[extra]) if isinstance(rec[extra], list) else rec[extra]
                    click.echo(f"      {extra}: {value}")
            for opt in rec["options"]:
                setting = f"{opt['name']}={opt['default']!r}"
                click.echo(f"      {setting:<24} {opt['help']}")
        if not data[k]:
            click.echo("  (none)")
    if data["failures"]:
        click.secho("failed to load", bold=True, fg="red")
        for f in data["failures"]:
            click.echo(f"  {f['name']:<14} from {f['origin']} {f['version']}: {f['error']}")
