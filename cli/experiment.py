"""``shoprec experiment report``: how the arms of an experiment do, docs/experiments.md.

A thin shell over ``ops/experiment.py``: text or ``--json`` on stdout, ``--plot`` a PNG.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import click
import orjson

from shoprec.errors import ShoprecError
from shoprec.settings import Settings, load_settings

_JSON = click.option("--json", "as_json", is_flag=True, help="The whole report as JSON.")
_PLOT = click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the report (each metric per arm with its interval, the bandit's "
    "allocation over time) into this PNG.",
)


def _settings() -> Settings:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        return load_settings()
    except Exception as exc:
        raise click.ClickException(f"invalid settings: {exc}") from exc


def _show(report: Any, as_json: bool, plot: Path | None) -> None:
    from ops.experiment import format_report, plot_report

    if plot is not None:
        try:
            plot_report(report, plot)
        except ShoprecError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"plot written to {plot}", err=True)
    if as_json:
        click.echo(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(format_report(report))


@click.group()
def experiment() -> None:
    """Experiments and attribution: reports per arm."""


@experiment.command("report")
@click.option(
    "--name",
    help="Report this experiment instead of the configured one (a past one: its users' "
    "records stay until SHOPREC_USER_TTL_S after their last event). [env SHOPREC_EXPERIMENT]",
)
@_JSON
@_PLOT
def report(name: str | None, as_json: bool, plot: Path | None) -> None:
    """Per arm: users, lists shown, credited clicks, carts, purchases and revenue; CTR@K,
    add-to-cart and purchase rate per list, conversion and revenue per user, each with its
    95% interval and its difference to the control; the bandit's allocations.

    Reads every user's record of the experiment under SHOPREC_STATE_PREFIX (one SCAN of
    Redis at SHOPREC_REDIS_URL).
    """
    from ops.experiment import read_report

    settings = _settings()
    try:
        result = asyncio.run(read_report(settings, name))
    except ShoprecError as exc:
        raise click.ClickException(str(exc)) from exc
    _show(result, as_json, plot)
