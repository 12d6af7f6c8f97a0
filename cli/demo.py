"""`shoprec demo`: the whole path on the real stack, with real data, then a summary.

Starts the stack and a worker process, loads a real catalogue (BERT embeds
every item once, on Triton), streams real events at a fixed rate, follows
recs.out, and prints recommendations for real users with their latencies.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer

from bench.api import ApiServer, start_api
from features.connection import open_redis
from infra import procs
from ops.produce import (
    Pacing,
    ProduceReport,
    dataset_files,
    produce_catalog_and_wait,
    produce_events,
    read_jsonl,
    start_producer,
)
from ops.tail import format_recommendation
from shoprec.settings import Settings, load_settings
from streams.topics import TopicNames, ensure_topics, kafka_options


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def start_worker_process(log_path: Path, extra_env: dict[str, str]) -> procs.Proc:
    """The worker as its own process, as in production."""
    argv = [sys.executable, "-m", "cli.main", "worker"]
    return procs.start("worker", argv, log_path, env={**os.environ, **extra_env})


async def collect(
    settings: Settings, topic: str, started: asyncio.Event, sent: asyncio.Event, idle_s: float
) -> list[dict[str, Any]]:
    """Everything published on ``topic`` from now until ``idle_s`` after ``sent`` is set."""
    consumer = AIOKafkaConsumer(
        topic, **kafka_options(settings), group_id=None, auto_offset_reset="latest"
    )
    await consumer.start()
    out: list[dict[str, Any]] = []
    last = time.monotonic()
    try:
        # Hold a position before anything is produced, or the first records are missed.
        await consumer.seek_to_end()
        await consumer.getmany(timeout_ms=100)
        started.set()
        while not (sent.is_set() and time.monotonic() - last > idle_s):
            batch = await consumer.getmany(timeout_ms=250)
            for records in batch.values():
                out.extend(orjson.loads(r.value) for r in records if r.value)
                last = time.monotonic()
        return out
    finally:
        await consumer.stop()


async def stream_and_collect(
    settings: Settings, data: Path, events: int, rate: float
) -> tuple[list[dict[str, Any]], ProduceReport]:
    topics = TopicNames.from_settings(settings)
    started, sent = asyncio.Event(), asyncio.Event()
    collector = asyncio.create_task(collect(settings, topics.recs_out, started, sent, 5.0))
    await started.wait()
    producer = await start_producer(settings)
    try:
        report = await produce_events(
            producer,
            topics,
            data,
            Pacing(rate=rate, limit=events),
            progress=lambda n: say(f"  sent {n}/{events} events") if n % 500 == 0 else None,
        )
    finally:
        await producer.stop()
    sent.set()
    return await collector, report


async def titles(settings: Settings, ids: Sequence[str]) -> dict[str, str]:
    redis = open_redis(settings.redis_url, cluster=settings.redis_cluster)
    try:
        from features.catalog import item_titles

        return await item_titles(redis, list(ids))
    finally:
        await redis.aclose()


def summarise(recs: list[dict[str, Any]], report: ProduceReport, n_items: int) -> dict[str, Any]:
    lat = np.array([r["latency_ms"] for r in recs], dtype=np.float64)
    return {
        "events_sent": report.events,
        "users": report.users,
        "catalogue_items": n_items,
        "recommendations": len(recs),
        "users_recommended": len({r["user_id"] for r in recs}),
        "degraded": sum(r["degraded"] for r in recs),
        "latency_ms": {f"p{q}": round(float(np.percentile(lat, q)), 1) for q in (50, 95, 99)}
        | {"max": float(lat.max())}
        if len(lat)
        else {},
        "models": sorted({r["model"] for r in recs}),
    }


@dataclass(frozen=True, slots=True)
class DemoOptions:
    data: Path
    events: int = 3000
    rate: float = 100.0
    broker: str = "kafka"
    keep_stack: bool = False
    json_out: Path | None = None


def run_demo(opts: DemoOptions, model_repo: Path) -> None:
    from infra.stack import Stack

    data, events, rate, broker = opts.data, opts.events, opts.rate, opts.broker

    dataset_files(data)
    base = load_settings(broker=broker)
    stack = Stack(base, model_repo=model_repo)
    say(f"1/5 starting the stack ({broker}, Redis, Triton with BERT) ...")
    t0 = time.monotonic()
    endpoints = stack.up(("broker", "redis", "triton"), timeout_s=300)
    say(f"    stack healthy in {time.monotonic() - t0:.1f} s: {endpoints}")
    settings = load_settings(
        broker=broker,
        kafka_bootstrap=endpoints.kafka_bootstrap,
        redis_url=endpoints.redis_url,
        triton_url=endpoints.triton_url,
    )
    env = {
        "SHOPREC_KAFKA_BOOTSTRAP": endpoints.kafka_bootstrap,
        "SHOPREC_REDIS_URL": endpoints.redis_url,
        "SHOPREC_TRITON_URL": endpoints.triton_url,
    }
    worker: procs.Proc | None = None
    api: ApiServer | None = None
    try:
        asyncio.run(ensure_topics(settings))
        say("2/5 starting the worker and the pull API (`shoprec serve`) beside it ...")
        worker = start_worker_process(base.stack_dir / "logs" / "worker.log", env)
        api = start_api(settings, base.stack_dir / "logs" / "api.log")
        n_items = sum(1 for _ in read_jsonl(data / "items.jsonl.gz"))
        say(f"3/5 loading the catalogue of {data.name} ({n_items} items) ...")

        alive = functools.partial(procs.is_alive, worker)
        took = asyncio.run(produce_catalog_and_wait(settings, data, n_items, alive))
        say(f"\n    catalogue ready in {took:.1f} s; pull API ready in {api.wait_ready():.1f} s")
        say(f"4/5 streaming {events} real events at {rate:.0f}/s ...")
        recs, report = asyncio.run(stream_and_collect(settings, data, events, rate))
        say("")
        say("5/5 results")
        shown = _pick_examples(recs, 3)
        names = asyncio.run(titles(settings, [i["item_id"] for r in shown for i in r["items"]]))
        for r in shown:
            print(format_recommendation(orjson.dumps(r), names))
            print()
        pulled = ask_pull_api(api, [r["user_id"] for r in shown], names)
        summary = summarise(recs, report, n_items) | {
            "dataset": data.name,
            "broker": broker,
            "offered_rate": rate,
            "catalogue_load_s": round(took, 1),
            "pull_api": pulled,
        }
        text = orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode()
        print(text)
        if opts.json_out is not None:
            opts.json_out.parent.mkdir(parents=True, exist_ok=True)
            opts.json_out.write_text(text + "\n")
    finally:
        if api is not None:
            api.stop()
        if worker is not None:
            procs.stop(worker)
        if not opts.keep_stack:
            stack.down()
            say("stack stopped")


def ask_pull_api(api: ApiServer, users: Sequence[str], names: dict[str, str]) -> dict[str, Any]:
    """The same users' lists now from the pull API, each asked twice (the first call of a
    process warms it up), with the latency the caller saw."""
    latencies = []
    for user in users:
        for _ in range(2):
            began = time.perf_counter()
            status, body = api.get(f"/v1/users/{quote(user, safe='')}/recommendations?k=5")
            latencies.append((time.perf_counter() - began) * 1000)
        top = [
            i["item_id"] + (f" [{names[i['item_id']][:30]}]" if i["item_id"] in names else "")
            for i in body.get("items", [])[:2]
        ]
        print(
            f"pull API: GET /v1/users/{user}/recommendations?k=5 -> {status}, "
            f"{len(body.get('items', []))} items in {latencies[-1]:.1f} ms "
            f"(degraded {body.get('degraded')}); top: {', '.join(top)}"
        )
    warm = latencies[1::2]
    return {
        "users": len(users),
        "latency_ms": {"max_warm": round(max(warm), 1), "first_call": round(latencies[0], 1)}
        if warm
        else {},
    }


def _pick_examples(recs: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The latest recommendation of a few users, preferring purchases then carts."""
    order = {"purchase": 0, "search": 1, "cart": 2, "click": 3, "view": 4}
    latest: dict[str, dict[str, Any]] = {}
    for r in recs:
        latest[r["user_id"]] = r
    return sorted(
        latest.values(), key=lambda r: (order.get(r["trigger"]["type"], 9), -len(r["items"]))
    )[:n]
