"""What the complements after a purchase do to the served lists: ``python -m bench.complements``.

``bench/after_purchase.py`` compares the signals on their own; this measures the served
path with and without them.  Per dataset (default: every folder of ``../shared/data``),
``shoprec experiment simulate`` (``ops.simulate``: the worker's own ingest, feature store
and one-call pipeline, replayed in event time) runs twice on the same events, with
``SHOPREC_COMPLEMENTS_AFTER_PURCHASE`` at 0 (the ranker's list alone) and at each value
of ``--complements``, and reports each arm's purchase rate per list: the share of lists
of which the same customer later bought an item within ``--window-days`` (the live
attribution rule), with its 95% interval over users.  Both arms of the default
experiment are shown (the served ranker, and co-visitation order): the complements open
either list after a purchase.

The runs see the same triggers, but the two reports are separate, so their intervals are
unpaired (wider than a paired difference would be).  The estimator's bias
(docs/experiments.md): it credits lists that predicted what the customer did anyway.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import click

from bench.report import (
    REPO_ROOT,
    bar,
    bars_with_intervals,
    data_option,
    datasets,
    json_option,
    publish,
)
from ops.simulate import SimulateOptions, default_experiment, simulate
from shoprec.settings import Settings

DAY_MS = 86_400_000
ARMS = ("ranker", "covisitation")


def measure(folder: Path, complements: int, window_days: float) -> dict[str, Any]:
    settings = Settings(
        complements_after_purchase=complements,
        attribution_window_ms=int(window_days * DAY_MS),
        _env_file=None,
    )
    opts = SimulateOptions(
        data=folder,
        experiment=default_experiment(bandit=False),
        model_repo=REPO_ROOT / "model_repo",
        cache=REPO_ROOT / ".shoprec" / "cache",
        batch=settings.batch_max,
    )
    started = time.monotonic()
    report = asyncio.run(simulate(settings, opts)).to_json()
    out: dict[str, Any] = {
        "complements": complements,
        "seconds": round(time.monotonic() - started, 1),
    }
    for arm in ARMS:
        row = report["arms"][arm]
        out[arm] = {
            "lists": row["lists"],
            "purchases_credited": row["purchases"],
            "purchase_rate": row["purchase_rate"]["value"],
            "purchase_rate_ci95": row["purchase_rate"]["ci95"],
        }
    return out


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    runs = [(r["dataset"], run) for r in results for run in r["runs"]]

    bars_with_intervals(
        path,
        [f"{d.split('-')[0]}\nc={run['complements']}" for d, run in runs],
        {arm: [bar(run[arm], "purchase_rate") for _, run in runs] for arm in ARMS},
        "purchase rate per list (95% CI)",
        "Served lists with and without complements after a purchase",
    )


@click.command()
@data_option
@click.option(
    "--complements",
    "values",
    multiple=True,
    type=click.IntRange(1, 100),
    default=(10,),
    show_default=True,
    help="SHOPREC_COMPLEMENTS_AFTER_PURCHASE values to compare with 0 (repeatable).",
)
@click.option("--window-days", default=30.0, show_default=True, help="Attribution window.")
@json_option
def main(
    folders: tuple[Path, ...], values: tuple[int, ...], window_days: float, json_path: Path | None
) -> None:
    """Purchase rate per list of the served path, with and without complements."""
    chosen = datasets(folders)
    results = []
    for folder in chosen:
        runs = []
        for c in (0, *values):
            click.echo(f"{folder.name}, complements {c}: replaying ...", err=True)
            runs.append(measure(folder, c, window_days))
            for arm in ARMS:
                row = runs[-1][arm]
                lo, hi = row["purchase_rate_ci95"]
                click.echo(
                    f"  {arm:<13} purchase rate {row['purchase_rate'] or 0:.4f} "
                    f"[{lo or 0:.4f}, {hi or 0:.4f}] over {row['lists']:,} lists",
                    err=True,
                )
        results.append({"dataset": folder.name, "runs": runs})
    publish("complements", {"window_days": window_days}, results, json_path, _plot)


if __name__ == "__main__":
    main()
