"""``shoprec experiment report`` and ``shoprec experiment simulate``: how the arms of an
experiment do, live (from Redis) and offline (a real dataset replayed), docs/experiments.md.

Thin shells over ``ops/experiment.py`` and ``ops/simulate.py``: text or ``--json`` on
stdout, progress on stderr, ``--plot`` a PNG.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

import click
import orjson

from shoprec.errors import ShoprecError
from shoprec.experiments import load_experiment
from shoprec.settings import CACHE_DIR, Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent

_JSON = click.option("--json", "as_json", is_flag=True, help="The whole report as JSON.")
_PLOT = click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the report (each metric per arm with its interval, the bandit's "
    "allocation over time) into this PNG.",
)


def _settings() -> Settings:
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
    help="Dataset folder holding events.jsonl.gz and items.jsonl.gz in the canonical "
    "format (../shared/data/README.md), e.g. ../shared/data/rees46-sample.",
)
@click.option(
    "--experiment",
    "spec",
    metavar="JSON|FILE",
    help="The experiment to simulate, as in SHOPREC_EXPERIMENT (default: SHOPREC_EXPERIMENT "
    "if set, else the served ranker against co-visitation order, views counted as clicks). "
    "Holdout arms are left out of an estimate: offline they can earn no credit.",
)
@click.option(
    "--bandit",
    is_flag=True,
    help="Let the experiment's bandit assign users (periods of event time) instead of "
    "scoring every trigger with every arm; the report then shows its allocations.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Replay only the first N events (in event time): a quick look at a large dataset.",
)
@click.option(
    "--score-from",
    metavar="valid|test|TIME",
    help="Make and credit lists only from this event time on (ISO UTC, or ms since "
    "epoch); the events before only warm the state.  'valid' or 'test': where the "
    "trainer's validation (last 20% of events) or test period (last 10%) starts, so a "
    "ranker trained on this dataset is not scored on what it learned from.",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    help="At most this many events per micro-batch (a batch is also cut at every new "
    "timestamp).  [default: SHOPREC_BATCH_MAX]",
)
@click.option(
    "--model-repo",
    type=click.Path(file_okay=False, path_type=Path),
    default=REPO_ROOT / "model_repo",
    show_default=True,
    help="Where the ranker versions are (fused_ranker/<version>); a ranker arm scores with "
    "its model_version, else the newest.",
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=CACHE_DIR,
    show_default=True,
    help="Where item MiniLM vectors are cached between runs (the first run of a dataset "
    "with item text embeds its catalogue: a minute or so on a CPU).",
)
@_JSON
@_PLOT
def simulate(
    data: Path,
    spec: str | None,
    bandit: bool,
    limit: int | None,
    score_from: str | None,
    batch: int | None,
    model_repo: Path,
    cache: Path,
    as_json: bool,
    plot: Path | None,
) -> None:
    """Try an experiment's arms on a real dataset, offline, before any shopper sees them.

    The events are replayed in event time through the worker's own code; at every trigger
    each arm makes its list, and a list is credited with the user's later logged clicks
    (or views, per click_types), carts and purchases of its items within
    SHOPREC_ATTRIBUTION_WINDOW_MS: the live attribution rule.  Per arm the report gives
    the lists made, the events credited, and CTR@K, cart and purchase rate per list with
    95% intervals; the other arms' difference to the control is paired by user.

    How to read it: the logged shoppers never saw these lists, so this measures how well
    an arm *predicted* what they did next anyway (a replay/hit-rate estimate, biased
    toward arms that resemble what the shop showed and toward re-shown items), not a
    live CTR or an uplift.  Good for stopping an arm whose interval of the difference
    lies clearly below zero; docs/experiments.md, "the estimator and its bias".

    \b
    Examples:
      shoprec experiment simulate --data ../shared/data/rees46-sample
      shoprec experiment simulate --data ../shared/data/rees46-sample --score-from test
      shoprec experiment simulate --data DIR --experiment ab.json --json
      shoprec experiment simulate --data DIR --experiment ab.json --bandit --plot sim.png

    Progress goes to stderr, the report to stdout.  Uses SHOPREC_ATTRIBUTION_WINDOW_MS,
    SHOPREC_TOP_K, SHOPREC_N_CANDIDATES and the flood-control settings as the worker does.
    """
    settings = _settings()  # first: it quiets faiss's loader, which the import wakes

    from ops.simulate import SimulateOptions, default_experiment, held_out_from
    from ops.simulate import simulate as run_simulation

    try:
        chosen = load_experiment(spec) if spec else settings.experiment
    except ValueError as exc:
        raise click.ClickException(f"invalid --experiment: {exc}") from exc
    try:
        if score_from in ("valid", "test"):
            cut = held_out_from(data, score_from)
            when = dt.datetime.fromtimestamp(cut / 1000, dt.UTC)
            click.echo(f"scoring triggers from {when:%Y-%m-%d %H:%M:%S} UTC on", err=True)
            score_from_ms: int | None = cut
        else:
            score_from_ms = _event_time(score_from) if score_from else None
    except ShoprecError as exc:
        raise click.ClickException(str(exc)) from exc
    opts = SimulateOptions(
        data=data,
        experiment=chosen or default_experiment(bandit),
        model_repo=model_repo,
        cache=cache,
        bandit=bandit,
        limit=limit,
        batch=batch or settings.batch_max,
        score_from_ms=score_from_ms,
    )
    started = time.monotonic()
    shown = [False]

    def progress(n: int) -> None:
        took = time.monotonic() - started
        click.echo(f"\r{n:,} events replayed, {took:.0f} s", nl=False, err=True)
        shown[0] = True

    try:
        result = asyncio.run(run_simulation(settings, opts, progress))
    except ShoprecError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        if shown[0]:
            click.echo(err=True)
    for warning in _thin_evidence(result, settings.attribution_window_ms):
        click.echo(f"warning: {warning}", err=True)
    _show(result, as_json, plot)


FEW_CREDITS = 20
"""Below this many credited events an arm's normal-approximation intervals mislead."""


def _thin_evidence(report: Any, window_ms: int) -> list[str]:
    """What the reader of an estimate must know before trusting its intervals: no credit
    at all, or too few credited events of a kind for that rate's normal interval."""
    scoring = [a for a in report.arms.values() if a.lists > 0]
    if scoring and not any(a.clicks + a.carts + a.purchases for a in scoring):
        return [
            f"no list of any arm was credited: no user's click, cart or purchase of a listed "
            f"item came within {window_ms / 60_000:g} min after a list "
            "(SHOPREC_ATTRIBUTION_WINDOW_MS; a dataset of purchases days apart gives "
            "nothing to compare)"
        ]
    out = []
    for arm in scoring:
        few = [
            f"{what} ({n})"
            for what, n in (
                ("clicks", arm.clicks),
                ("carts", arm.carts),
                ("purchases", arm.purchases),
            )
            if 0 < n < FEW_CREDITS or (n == 0 and any(getattr(a, what) for a in scoring))
        ]
        if few:
            out.append(
                f"arm {arm.name}: few credited {', '.join(few)}: those rates' intervals "
                "(normal approximations) are rough"
            )
    return out


def _event_time(text: str) -> int:
    """``--score-from``: ms since epoch, or an ISO time (UTC unless it says otherwise)."""
    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: valid, test, an ISO time (2019-10-01T02:40) or ms since epoch",
            param_hint="--score-from",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)
