"""Ablation: what the user's memory (``{u:<id>}:mem``, ``SHOPREC_MEMORY_LEN``) costs.

Folds a real dataset's events into user state in process (``features.fold``, the same
state the worker's script writes), writes it to a private Redis (``write_folded``, as
``shoprec rebuild-state`` does), then times the recommend step's read
(``FeatureStore.read_context``) for batches of users drawn from the dataset, with the
memory read and without it, alternating so both see the same machine load.  Reports the
CPU time of this process per user (reply parsing in Python) and Redis's bytes per user for
the memory key (``MEMORY USAGE``), beside the history's.

    .venv/bin/python -m bench.user_memory --json bench/results/ablation/user-memory.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.features import DEFAULT_DATA_ROOT, private_redis, read_dataset
from bench.report import say
from features import keys
from features.connection import open_redis
from features.fold import MemoryStore, write_folded
from features.store import FeatureStore, UserUpdate
from ranking.data import POLICY


async def load(url: str, folder: Path) -> tuple[list[str], dict[str, int]]:
    """Every event of ``folder`` folded (no vectors: the embedding is not what is measured)
    and written to Redis; returns the users and their last event time."""
    _, events = read_dataset(folder)
    store = MemoryStore(POLICY)
    for start in range(0, len(events), 1024):
        store.apply_events(
            [
                UserUpdate(
                    e["event_id"], e["user_id"], e["type"], e["ts"], e["item_id"], None, False
                )
                for e in events[start : start + 1024]
            ]
        )
    redis = open_redis(url, timeout_s=120.0)  # a bulk write, as rebuild-state's
    try:
        await write_folded(redis, store, POLICY.ttl_s)
    finally:
        await redis.aclose()
    last = {e["user_id"]: e["ts"] for e in events}
    return sorted(last), last


async def time_reads(
    url: str, memory_len: int, batches: list[list[str]], last: dict[str, int]
) -> float:
    """CPU seconds to read the context of every batch."""
    redis = open_redis(url)  # the worker's client (RESP3)
    store = FeatureStore(redis, dataclasses.replace(POLICY, memory_len=memory_len))
    try:
        await store.read_context(batches[0], {u: last[u] for u in batches[0]})  # connect
        cpu = time.process_time()
        for users in batches:
            await store.read_context(users, {u: last[u] for u in users})
        return time.process_time() - cpu
    finally:
        await redis.aclose()


async def key_bytes(url: str, users: list[str]) -> dict[str, Any]:
    redis = open_redis(url)
    sizes: dict[str, list[int]] = {"mem": [], "hist": []}
    members: list[int] = []
    try:
        for user in users:
            sizes["mem"].append(int(await redis.memory_usage(keys.user_memory(user), 0) or 0))
            sizes["hist"].append(int(await redis.memory_usage(keys.user_hist(user), 0) or 0))
            members.append(int(await redis.zcard(keys.user_memory(user))))
    finally:
        await redis.aclose()
    return {
        "users_sampled": len(users),
        "memory_items_mean": round(float(np.mean(members)), 1),
        "users_at_the_cap": sum(m >= POLICY.memory_len for m in members),
        "bytes_mean": {k: round(float(np.mean(v))) for k, v in sizes.items()},
        "bytes_p99": {k: round(float(np.percentile(v, 99))) for k, v in sizes.items()},
    }


async def measure(url: str, folder: Path, batch: int, rounds: int, reps: int) -> dict[str, Any]:
    users, last = await load(url, folder)
    rng = random.Random(7)
    per_user: dict[int, list[float]] = {0: [], POLICY.memory_len: []}
    for r in range(rounds):
        batches = [rng.sample(users, batch) for _ in range(reps)]
        order = list(per_user) if r % 2 == 0 else list(per_user)[::-1]
        for memory_len in order:
            cpu = await time_reads(url, memory_len, batches, last)
            per_user[memory_len].append(1e6 * cpu / (reps * batch))
    median = {m: float(np.median(v)) for m, v in per_user.items()}
    return {
        "read_cpu_us_per_user_median": {
            "without_memory": round(median[0], 1),
            "with_memory": round(median[POLICY.memory_len], 1),
        },
        "read_cpu_us_per_user_rounds": {
            str(m): [round(x, 1) for x in v] for m, v in per_user.items()
        },
        "redis": await key_bytes(url, rng.sample(users, min(500, len(users)))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_ROOT / "uci-online-retail")
    parser.add_argument("--batch", type=int, default=32, help="users per read (the recommend step)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds")
    parser.add_argument("--reps", type=int, default=100, help="batches per round")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    with private_redis() as url:
        say(f"folding {args.data.name} into a private Redis ...")
        result = asyncio.run(measure(url, args.data, args.batch, args.rounds, args.reps))
    result = {
        "dataset": args.data.name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "memory_len": POLICY.memory_len,
        "batch": args.batch,
        "reps": args.reps,
    } | result
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
