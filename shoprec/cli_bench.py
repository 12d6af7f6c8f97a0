"""`shoprec bench ...`: the benchmarks. Each subcommand lives in its own module under bench/."""

from __future__ import annotations

import click


@click.group(invoke_without_command=True)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Measure shoprec on the real stack and real data; write JSON and a plot."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
