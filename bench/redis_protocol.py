"""Ablation: the worker's Redis read (``FeatureStore.read_context``) under RESP2 and RESP3.

Loads rees46-sample (real catalogue with its cached MiniLM vectors, every event folded
into user state) into a private Redis, then times the recommend step's read for
batches of users drawn from the dataset, alternating the protocols so both see the
same machine load.  Reports CPU time of this process per user (what the protocol
changes: reply parsing in Python) and wall time per batch.

    .venv/bin/python -m bench.redis_protocol --json bench/results/ablation/redis-protocol.json
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from redis.asyncio import Redis

from bench.features import (
    DEFAULT_DATA_ROOT,
    embed_catalogue,
    private_redis,
    read_dataset,
    updates_of,
)
from bench.report import say
from features.catalog import upsert_items
from features.item_index import ItemIndex
from features.store import FeatureStore, UpdatePolicy

POLICY = UpdatePolicy(
    half_life_ms=7 * 86_400_000.0, history_len=50, ttl_s=30 * 86_400, min_emit_interval_ms=0
)


async def load(url: str, folder: Path) -> tuple[list[str], dict[str, int]]:
    """Catalogue and state of ``folder`` in Redis; returns the users and their last event."""
    items, events = read_dataset(folder)
    texts = [it.text() for it in items]
    vectors = embed_catalogue(folder.name, texts)
    redis = Redis.from_url(url)
    try:
        await upsert_items(
            redis, items, [v if t else None for v, t in zip(vectors, texts, strict=True)]
        )
        index = ItemIndex(redis)
        await index.refresh()
        store = FeatureStore(redis, POLICY, category_of=index.category)
        for start in range(0, len(events), 256):
            await store.apply_events(updates_of(events[start : start + 256], index))
    finally:
        await redis.aclose()
    last = {e["user_id"]: e["ts"] for e in events}
    return sorted(last), last


async def time_reads(
    url: str, protocol: int, batches: list[list[str]], last: dict[str, int]
) -> tuple[float, float]:
    """(CPU seconds, wall seconds) to read the context of every batch."""
    redis = Redis.from_url(url, protocol=protocol)
    store = FeatureStore(redis, POLICY)
    try:
        await store.read_context(batches[0], {u: last[u] for u in batches[0]})  # connect
        cpu, wall = time.process_time(), time.perf_counter()
        for users in batches:
            await store.read_context(users, {u: last[u] for u in users})
        return time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await redis.aclose()


async def measure(url: str, folder: Path, batch: int, rounds: int, reps: int) -> dict[str, Any]:
    users, last = await load(url, folder)
    rng = random.Random(7)
    per_user: dict[int, list[float]] = {2: [], 3: []}
    per_batch_ms: dict[int, list[float]] = {2: [], 3: []}
    for r in range(rounds):
        batches = [rng.sample(users, batch) for _ in range(reps)]
        for protocol in (2, 3) if r % 2 == 0 else (3, 2):
            cpu, wall = await time_reads(url, protocol, batches, last)
            per_user[protocol].append(1e6 * cpu / (reps * batch))
            per_batch_ms[protocol].append(1e3 * wall / reps)
    return {
        f"resp{p}": {
            "cpu_us_per_user_median": round(float(np.median(per_user[p])), 1),
            "cpu_us_per_user_rounds": [round(x, 1) for x in per_user[p]],
            "wall_ms_per_batch_median": round(float(np.median(per_batch_ms[p])), 2),
        }
        for p in (2, 3)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_ROOT / "rees46-sample")
    parser.add_argument("--batch", type=int, default=32, help="users per read (the recommend step)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per protocol")
    parser.add_argument("--reps", type=int, default=200, help="batches per round")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    with private_redis() as url:
        say(f"loading {args.data.name} into a private Redis ...")
        result = asyncio.run(measure(url, args.data, args.batch, args.rounds, args.reps))
    result = {"dataset": args.data.name, "batch": args.batch, "reps": args.reps} | result
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
