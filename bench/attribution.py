"""What attribution costs per event: ``python -m bench.attribution [--json PATH]``.

Real rees46 events in micro-batches of ``--batch`` through the worker's write path
(``FeatureStore.apply_events``, update script and counters) and then, per batch, the
experiment's two steps (``ExperimentRunner.observe``: ``attribute.lua`` per user, and
``show``: ``show_lists.lua`` per user with a 10-item list per trigger, plus the counters),
against a private redis-server.  Reported per event, for each: the worker's CPU
(``time.process_time``) and Redis's (``INFO cpu`` before and after), taken batch by
batch in the same run, so the write path is the yardstick; the median of ``--rounds``.
The write path gets random unit vectors (they cost the update script what BERT's do).
The lists are real items (up to half the user's own next items, so credit happens as
often as it can); their ranking is not what is measured.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import orjson

from bench.features import private_redis
from bench.report import DATA
from features import keys
from features.attribution import AttributionPolicy, AttributionStore, ShownList
from features.connection import open_redis
from features.store import FeatureStore, UpdatePolicy, UserUpdate
from shoprec.events import ShopEvent
from shoprec.experiments import Experiment, list_id
from streams.experiment import ExperimentRunner
from streams.metrics import WorkerStats

REES46 = DATA / "rees46-sample"
EXPERIMENT = Experiment.model_validate(
    {
        "name": "bench",
        "arms": [
            {"name": "ranker", "share": 0.45},
            {"name": "covis", "kind": "covisitation", "share": 0.45},
            {"name": "holdout", "kind": "holdout", "share": 0.1},
        ],
        "click_types": ["click", "view"],
    }
)


def _events(n: int) -> list[ShopEvent]:
    with gzip.open(REES46 / "events.jsonl.gz", "rb") as fh:
        rows = [orjson.loads(line) for _, line in zip(range(n), fh, strict=False)]
    return [
        ShopEvent(r["event_id"], r["type"], r["user_id"], r["ts"], r["item_id"], price=r["price"])
        for r in rows
    ]


def made_lists(
    events: list[ShopEvent],
    start: int,
    part: list[ShopEvent],
    emits: list[bool],
    arms: dict[str, str],
    items: list[str],
    rng: np.random.Generator,
) -> dict[str, list[ShownList]]:
    """A 10-item list per trigger (not measured): up to 5 of the user's next items, then
    random real ones."""
    lists: dict[str, list[ShownList]] = {}
    for n, (e, emit) in enumerate(zip(part, emits, strict=True)):
        if emit and arms[e.user_id] != "holdout":
            later = events[start + n + 1 : start + n + 201]
            ahead = [x.item_id for x in later if x.user_id == e.user_id][:5]
            picked = list(dict.fromkeys([*ahead, *rng.choice(items, 10)]))[:10]
            lid = list_id(e.user_id, e.event_id)
            shown = ShownList(lid, "bench", arms[e.user_id], e.ts, tuple(map(str, picked)))
            lists[e.user_id] = [shown]
    return lists


async def _cpu(redis: Any) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _round(url: str, events: list[ShopEvent], batch: int, prefix: str) -> dict[str, float]:
    keys.STATE_PREFIX.set(prefix)
    redis = open_redis(url)
    store = FeatureStore(redis, UpdatePolicy(7 * 86_400_000.0, 50, 3600, 30_000))
    policy = AttributionPolicy("bench", ("ranker", "covis", "holdout"), 1_800_000, 3600)
    runner = ExperimentRunner(EXPERIMENT, AttributionStore(redis, policy), WorkerStats())
    items = sorted({e.item_id for e in events if e.item_id})
    rng = np.random.default_rng(0)
    # Random unit vectors cost the update script what BERT vectors do (384 floats each).
    vectors = {i: rng.standard_normal(keys.EMB_DIM).astype(np.float32) for i in items}
    spent = {"state_cpu": 0.0, "state_redis": 0.0, "attr_cpu": 0.0, "attr_redis": 0.0}
    try:
        for start in range(0, len(events), batch):
            part = events[start : start + batch]
            c0, r0 = time.process_time(), await _cpu(redis)
            results = await store.apply_events(
                [
                    UserUpdate(
                        e.event_id,
                        e.user_id,
                        e.type,
                        e.ts,
                        e.item_id,
                        vectors[e.item_id or ""],
                        False,
                    )
                    for e in part
                ]
            )
            c1, r1 = time.process_time(), await _cpu(redis)
            arms = await runner.observe(part)
            c2, r2 = time.process_time(), await _cpu(redis)
            lists = made_lists(events, start, part, [r.emit for r in results], arms, items, rng)
            c3, r3 = time.process_time(), await _cpu(redis)
            await runner.show(lists)
            c4, r4 = time.process_time(), await _cpu(redis)
            spent["state_cpu"] += c1 - c0
            spent["state_redis"] += r1 - r0
            spent["attr_cpu"] += (c2 - c1) + (c4 - c3)
            spent["attr_redis"] += (r2 - r1) + (r4 - r3)
    finally:
        await redis.aclose()
    return {k: 1e6 * v / len(events) for k, v in spent.items()}


def run(n_events: int, batch: int, rounds: int) -> dict[str, Any]:
    events = _events(n_events)
    per_round: list[dict[str, float]] = []
    with private_redis() as url:
        for r in range(rounds):
            per_round.append(asyncio.run(_round(url, events, batch, f"bench{r}:")))
            print(f"round {r}: {per_round[-1]}", file=sys.stderr)
    median = {k: round(statistics.median(x[k] for x in per_round), 1) for k in per_round[0]}
    return {
        "benchmark": "attribution",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average": os.getloadavg(),
        "dataset": "rees46-sample",
        "events": n_events,
        "batch": batch,
        "rounds": rounds,
        "us_per_event_median": median,
        "rounds_us_per_event": per_round,
    }


@click.command()
@click.option("--events", default=6000, show_default=True)
@click.option("--batch", default=64, show_default=True)
@click.option("--rounds", default=5, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def main(events: int, batch: int, rounds: int, json_path: Path | None) -> None:
    result = run(events, batch, rounds)
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if json_path is not None:
        json_path.write_text(text + "\n")
    click.echo(text)


if __name__ == "__main__":
    main()
