"""``shoprec experiment report`` and ``shoprec experiment simulate``: how the arms of an
experiment do, live (from Redis) and offline (a real dataset replayed), docs/experiments.md.

Thin shells over ``ops/experiment.py`` and ``ops/simulate.py``: text or ``--json`` on
stdout, progress on stderr, ``--plot`` a PNG.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import click
import orjson

from shoprec.errors import ShoprecError
from shoprec.experiments import load_experiment
from shoprec.settings import Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent

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
    """Experiments and attribution: reports per arm, offline simulation."""


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


@experiment.command("simulate")
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Dataset folder with events.jsonl.gz and items.jsonl.gz (../shared/data/*).",
)
@click.option(
    "--experiment",
    "spec",
    help="The experiment to simulate, JSON or a file (default: SHOPREC_EXPERIMENT if set, "
    "else the served ranker against co-visitation order, views counted as clicks).",
)
@click.option(
    "--bandit",
    is_flag=True,
    help="Let the experiment's bandit assign users (event-time periods) instead of scoring "
    "every trigger with every arm.",
)
@click.option("--limit", type=int, help="Replay at most this many events.")
@click.option(
    "--batch",
    type=int,
    help="Events per micro-batch, as the worker takes them. [env SHOPREC_BATCH_MAX]",
)
@click.option(
    "--model-repo",
    type=click.Path(file_okay=False, path_type=Path),
    default=REPO_ROOT / "model_repo",
    show_default=True,
    help="Where the ranker versions are (fused_ranker/<version>).",
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".shoprec/cache"),
    show_default=True,
    help="Where item BERT vectors are cached between runs.",
)
@_JSON
@_PLOT
def simulate(
    data: Path,
    spec: str | None,
    bandit: bool,
    limit: int | None,
    batch: int | None,
    model_repo: Path,
    cache: Path,
    as_json: bool,
    plot: Path | None,
) -> None:
    """Replay a real dataset through an experiment's arms offline and estimate how each
    would do (docs/experiments.md: the estimator and its bias), before it goes live.

    Uses SHOPREC_ATTRIBUTION_WINDOW_MS, SHOPREC_TOP_K, SHOPREC_N_CANDIDATES and the
    flood-control settings as the worker does.
    """
    from ops.simulate import SimulateOptions, default_experiment
    from ops.simulate import simulate as run_simulation

    settings = _settings()
    try:
        chosen = load_experiment(spec) if spec else settings.experiment
    except ValueError as exc:
        raise click.ClickException(f"invalid --experiment: {exc}") from exc
    opts = SimulateOptions(
        data=data,
        experiment=chosen or default_experiment(bandit),
        model_repo=model_repo,
        cache=cache,
        bandit=bandit,
        limit=limit,
        batch=batch or settings.batch_max,
    )

    def progress(n: int) -> None:
        click.echo(f"\r{n} events replayed", nl=False, err=True)

    try:
        result = asyncio.run(run_simulation(settings, opts, progress))
    except ShoprecError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        click.echo(err=True)
    _show(result, as_json, plot)
