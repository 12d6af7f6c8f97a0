"""What the complements after a purchase do to the served lists: ``python -m bench.complements``.

``bench/after_purchase.py`` compares the signals on their own; this measures the served
path with and without them.  Per dataset (default: every folder of ``../shared/data``),
``shoprec experiment simulate`` (``ops.simulate``: the worker's own ingest, feature store
and one-call pipeline, replayed in event time) runs once, with one arm of the served
ranker per number of complements: 0 (the control) and each value of ``--complements``
(the arms' ``complements`` field, docs/experiments.md).  In the estimate every arm scores
every trigger, so each arm is compared with the control user by user: the purchase rate
per list (the share of lists of which the same customer later bought an item within
``--window-days``, the live attribution rule) and its paired difference, with 95%
intervals.

The estimator's bias (docs/experiments.md): it credits lists that predicted what the
customer did anyway.  A shop reads the causal effect with the same arms live.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
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
from ops.simulate import SimulateOptions, simulate
from shoprec.experiments import Experiment
from shoprec.settings import CACHE_DIR, Settings

DAY_MS = 86_400_000


def arm_name(complements: int) -> str:
    return f"complements-{complements}"


def experiment(values: Sequence[int]) -> Experiment:
    """The served ranker with each number of complements, 0 first (the control)."""
    counts = (0, *values)
    return Experiment.model_validate(
        {
            "name": "complements",
            "control": arm_name(0),
            "arms": [
                {"name": arm_name(c), "complements": c, "share": 1.0 if c == 0 else 0.0}
                for c in counts
            ],
            "click_types": ["click", "view"],
        }
    )


def measure(folder: Path, values: Sequence[int], window_days: float) -> dict[str, Any]:
    settings = Settings(attribution_window_ms=int(window_days * DAY_MS), _env_file=None)
    opts = SimulateOptions(
        data=folder,
        experiment=experiment(values),
        model_repo=REPO_ROOT / "model_repo",
        cache=REPO_ROOT / CACHE_DIR,
        batch=settings.batch_max,
    )
    started = time.monotonic()
    report = asyncio.run(simulate(settings, opts)).to_json()
    runs = []
    for c in (0, *values):
        row = report["arms"][arm_name(c)]
        runs.append(
            {
                "complements": c,
                "lists": row["lists"],
                "purchases_credited": row["purchases"],
                "purchase_rate": row["purchase_rate"]["value"],
                "purchase_rate_ci95": row["purchase_rate"]["ci95"],
                # Paired with the control on the same triggers; none for the control.
                "vs_no_complements": (row["vs_control"] or {}).get("purchase_rate"),
            }
        )
    return {"seconds": round(time.monotonic() - started, 1), "runs": runs}


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    runs = [(r["dataset"], run) for r in results for run in r["runs"]]
    bars_with_intervals(
        path,
        [f"{d.split('-')[0]}\nc={run['complements']}" for d, run in runs],
        {"served ranker": [bar(run, "purchase_rate") for _, run in runs]},
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
    help="Numbers of complements to compare with 0, each an arm (repeatable).",
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
        click.echo(f"{folder.name}: replaying with {(0, *values)} complements ...", err=True)
        measured = measure(folder, values, window_days)
        for run in measured["runs"]:
            lo, hi = run["purchase_rate_ci95"]
            diff = run["vs_no_complements"]
            paired = (
                f", {diff['diff']:+.4f} [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}] paired"
                if diff and diff.get("diff") is not None
                else ""
            )
            click.echo(
                f"  complements {run['complements']:>3}: purchase rate "
                f"{run['purchase_rate'] or 0:.4f} [{lo or 0:.4f}, {hi or 0:.4f}] over "
                f"{run['lists']:,} lists{paired}",
                err=True,
            )
        results.append({"dataset": folder.name, **measured})
    publish("complements", {"window_days": window_days}, results, json_path, _plot)


if __name__ == "__main__":
    main()
