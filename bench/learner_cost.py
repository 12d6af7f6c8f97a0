"""What one learner round costs as a shop grows: ``python -m bench.learner_cost``.

A learner round (``ops.learn.train_round``, what ``shoprec learner`` and ``shoprec train
--from-topics`` run after reading the topics) holds the shop's events in memory, replays
them into labelled queries, trains and judges.  Its time and memory grow with the events
it reads (``SHOPREC_LEARNER_WINDOW_S`` bounds them), and this measures by how much: each
dataset of ``../shared/data`` whole, and the largest (uci-online-retail, 396,337 events)
also cut to its first 50,000 and 100,000 events.  No dataset is larger, so the sizes
beyond it are not measured; docs/operations.md extrapolates linearly and says so.

Each size runs in a process of its own, with the learner's options (the settings'
defaults) and the shipped model live (the judgement scores it too), one torch thread as
``shoprec learner`` uses by default:

* ``rows_s`` and ``rows_mb``: the events as the topics give them (``ranking.data.load_rows``
  here; ``ops.learn.read_shop`` in the learner, which also waits on Kafka), and the
  resident memory they add;
* ``round_s``, ``train_s`` (the replay and the training: the card's ``training.seconds``)
  and ``judge_s`` (the rest: the held-out slice, one event per step, the baselines);
* ``peak_rss_mb``: the process's peak resident memory (the catalogue's BERT vectors come
  from the cache, as in a learner past its first round).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import click

from bench.report import REPO_ROOT, data_option, datasets, json_option, publish, say
from infra import procs

SIZES = (50_000, 100_000)
"""Prefixes of the largest dataset, besides every dataset whole."""


def _resident_mb(field: str = "VmRSS") -> float:
    got = procs.memory_mb(os.getpid(), field)
    assert got is not None, "this process has a /proc entry"
    return got


def _one_round(folder: Path, max_events: int | None) -> dict[str, Any]:
    """One learner round on ``folder``'s first ``max_events`` events (in a fresh process)."""
    import torch

    from ops.learn import LearnOptions, ShopHistory, train_round
    from ops.versions import Versions
    from ranking.data import embed_catalogue, load_catalogue, load_rows
    from shoprec.settings import CACHE_DIR, Settings

    torch.set_num_threads(1)
    catalogue = load_catalogue(folder)
    embed_catalogue(catalogue, REPO_ROOT / CACHE_DIR)  # cached, as after a first round
    before = _resident_mb()
    t0 = time.perf_counter()
    rows = load_rows(folder)[:max_events]
    rows_s, rows_mb = time.perf_counter() - t0, _resident_mb() - before
    history = ShopHistory(catalogue, rows, ["events"], "catalog", [])
    with tempfile.TemporaryDirectory() as archive:
        settings = Settings(model_repo=REPO_ROOT / "model_repo", model_archive=Path(archive))
        options = dataclasses.replace(
            LearnOptions().judged_as(settings), cache_dir=REPO_ROOT / CACHE_DIR
        )
        t0 = time.perf_counter()
        result = train_round(settings, history, Versions.from_settings(settings), options)
        round_s = time.perf_counter() - t0
    train_s = float(result.card["training"]["seconds"])
    return {
        "events": len(rows),
        "users": result.card["data"]["users"],
        "items": result.card["data"]["items"],
        "train_queries": result.card["split"]["train_queries"],
        "rows_s": round(rows_s, 1),
        "rows_mb": round(rows_mb, 1),
        "round_s": round(round_s, 1),
        "train_s": round(train_s, 1),
        "judge_s": round(round_s - train_s, 1),
        "best_epoch": result.card["training"]["best_epoch"],
        "peak_rss_mb": round(_resident_mb("VmHWM"), 1),
    }


def measure(folder: Path, max_events: int | None) -> dict[str, Any]:
    spawn = multiprocessing.get_context("spawn")  # a clean process: its own peak memory
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        got: dict[str, Any] = pool.submit(_one_round, folder, max_events).result()
    return {"dataset": folder.name, "max_events": max_events, **got}


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    """Round time and peak memory against the events read, one line per dataset (the
    largest at several sizes): the catalogue's size matters too (rees46's 5,000+ items)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["dataset"] for r in results):
        rows = sorted((r for r in results if r["dataset"] == name), key=lambda r: r["events"])
        xs = [r["events"] for r in rows]
        label = f"{name.split('-')[0]} ({rows[-1]['items']:,} items)"
        left.plot(xs, [r["round_s"] for r in rows], marker="o", label=label)
        right.plot(xs, [r["peak_rss_mb"] for r in rows], marker="o", label=label)
    left.set_ylabel("seconds per round (one torch thread)")
    right.set_ylabel("peak resident memory, MiB")
    for ax in (left, right):
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:,.0f}k"))
        ax.set_xlabel("events read")
        ax.legend(fontsize=8)
    fig.suptitle("One learner round as the shop grows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command()
@data_option
@click.option(
    "--sizes/--no-sizes",
    default=True,
    show_default=True,
    help=f"Also the largest dataset's first {', '.join(f'{n:,}' for n in SIZES)} events.",
)
@json_option
def main(folders: tuple[Path, ...], sizes: bool, json_path: Path | None) -> None:
    """Time and memory of one learner round on every dataset, and on the largest one's
    first 50,000 and 100,000 events (each in a process of its own)."""
    plan: list[tuple[Path, int | None]] = [(f, None) for f in datasets(folders)]
    if sizes:
        largest = max(datasets(folders), key=lambda f: (f / "events.jsonl.gz").stat().st_size)
        plan = [(largest, n) for n in SIZES] + plan
    results = []
    for folder, max_events in plan:
        say(f"{folder.name}{'' if max_events is None else f', first {max_events:,}'} ...")
        got = measure(folder, max_events)
        say(
            f"  {got['events']:,} events: round {got['round_s']} s (replay + training "
            f"{got['train_s']} s, judging {got['judge_s']} s), events in memory "
            f"{got['rows_mb']} MiB, peak {got['peak_rss_mb']} MiB"
        )
        results.append(got)
    publish("learner_cost", {"torch_threads": 1}, results, json_path, _plot)


if __name__ == "__main__":
    main()
