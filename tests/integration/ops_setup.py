"""A live run for the operator-tool tests: real rees46 events through a real worker.

The worker runs with its own state prefix (the "live" state of these tests),
its Prometheus endpoint on a free port and JSON logs; a few malformed records
are interleaved so the DLQ has something to show.  When every good event is
in the live state, the worker stops, so what the tools do afterwards is all
that can change anything.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.asyncio import Redis

from features import keys
from infra import procs
from infra.stack import Endpoints
from shoprec.settings import Settings
from streams.topics import TopicNames, ensure_topics, kafka_options
from tests.integration.golden import take_in_catalogue
from tests.integration.helpers import isolated_settings, rees46_fixture, run_cli
from tests.worker import WorkerProcess

N_EVENTS = 600
BAD_RECORDS: list[tuple[bytes, str]] = [
    (b"{this is not json", "not_json"),
    (b'{"event_id":"bad-1","type":"like","user_id":"u","item_id":"i","ts":1}', "unknown_type"),
    (b'{"event_id":"bad-2","type":"view","item_id":"i","ts":1570000000000}', "missing_field"),
]


def shoprec(
    settings: Settings, *args: str, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, as an operator runs it."""
    return run_cli({**os.environ, **settings.as_env(), **env}, *args, timeout=timeout)


def json_out(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return orjson.loads(result.stdout)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


@dataclass
class LiveRun:
    settings: Settings  # state_prefix = the live state of this run
    events: list[dict[str, Any]]
    metrics_text: str
    log_text: str
    recs_out_end: dict[TopicPartition, int]
    tag: str

    def prefix(self, name: str) -> str:
        """A state prefix of this run only (the session's Redis is shared)."""
        return f"{name}{self.tag}:"


async def end_offsets(settings: Settings, topic: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(**kafka_options(settings), group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


async def events_in_state(redis: Redis, prefix: str) -> int:
    total = 0
    async for key in redis.scan_iter(match=f"{prefix}{{u:*}}:meta", count=10_000):
        total += int(await redis.hget(key, "n") or 0)
    return total


async def start_live_run(stack: Endpoints, data_dir: Path, tmp: Path) -> LiveRun:
    tag = uuid.uuid4().hex[:6]
    port = procs.free_port()
    settings = isolated_settings(
        stack,
        min_emit_interval_ms=0,
        topic_partitions=2,
        state_prefix=f"live{tag}:",
        metrics_port=port,
        log_format="json",
        triton_timeout_s=30.0,
        # One micro-batch at a time keeps each user's events in partition order, so the
        # live state is the one a rebuild or replay of the same events reproduces.
        agent_concurrency=1,
    )
    events, items = rees46_fixture(data_dir, N_EVENTS)
    await ensure_topics(settings)
    names = TopicNames.from_settings(settings)
    worker = WorkerProcess(settings, tmp / "worker.log")
    redis = Redis.from_url(stack.redis_url)
    try:
        # The catalogue first, all of it embedded, as in steady state: an event whose item
        # is not in the table yet folds in no vector, and a rebuild later would differ.
        await send(
            settings, [(names.catalog, it["item_id"].encode(), orjson.dumps(it)) for it in items]
        )
        await wait_for(lambda: items_embedded(redis, items), worker, 240)
        # Every event on one topic: the worker keeps a user's order within a partition, not
        # across the five topics, and history order and co-visitation depend on arrival
        # order; on one topic live, replay and rebuild see the same order, so their states
        # must be equal exactly.  (The type comes from the payload, not the topic.)
        records = []
        for n, e in enumerate(events):
            key = str(e["user_id"]).encode()
            records.append((names.event_topic("view"), key, orjson.dumps(e)))
            if n % 200 == 100:
                bad, _ = BAD_RECORDS[(n // 200) % len(BAD_RECORDS)]
                records.append((names.event_topic("view"), b"bad", bad))
        await send(settings, records)
        await wait_for(
            lambda: _at_least(events_in_state(redis, settings.state_prefix), len(events)),
            worker,
            240,
        )
        assert await events_in_state(redis, settings.state_prefix) == len(events), worker.tail()
        await asyncio.sleep(13)  # a lag probe (every 10 s) after the last commit (~3 s)
        metrics = await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
    finally:
        worker.close()
        await redis.aclose()
    return LiveRun(
        settings=settings,
        events=events,
        metrics_text=metrics,
        log_text=(tmp / "worker.log").read_text(errors="replace"),
        recs_out_end=await end_offsets(settings, names.recs_out),
        tag=tag,
    )


async def send(settings: Settings, records: list[tuple[str, bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(**kafka_options(settings), acks="all")
    await producer.start()
    try:
        for topic, key, value in records:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def _at_least(count: Awaitable[int], n: int) -> bool:
    return await count >= n


async def items_embedded(redis: Redis, items: list[dict[str, Any]]) -> bool:
    async with redis.pipeline(transaction=False) as pipe:
        for it in items:
            pipe.hexists(f"{{i:{it['item_id']}}}", "ts")
        return all(await pipe.execute())


async def wait_for(
    condition: Callable[[], Awaitable[bool]], worker: WorkerProcess, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert worker.proc.poll() is None, worker.tail()
        assert time.monotonic() < deadline, worker.tail()
        await asyncio.sleep(0.5)


async def load_catalogue(
    settings: Settings,
    redis: Redis,
    worker: WorkerProcess,
    items: list[dict[str, Any]],
    timeout_s: float = 600.0,
) -> None:
    """Send ``items`` on the catalogue topic, wait until ``worker`` has logged every one in
    ``items:log`` (embedded and written), then until Triton's ranker holds them: it follows
    the log every 0.5 s, and a batch ranked before it took in a catalogue loaded into an
    empty table gets an empty list (seen in CI)."""
    before = await redis.xlen(keys.ITEM_LOG)
    names = TopicNames.from_settings(settings)
    await send(
        settings, [(names.catalog, it["item_id"].encode(), orjson.dumps(it)) for it in items]
    )
    await wait_for(
        lambda: _at_least(redis.xlen(keys.ITEM_LOG), before + len(items)), worker, timeout_s
    )
    await take_in_catalogue(settings)


async def snapshot(redis: Redis, exclude_prefixes: tuple[str, ...]) -> dict[bytes, bytes | None]:
    """Every key outside ``exclude_prefixes`` with its serialised value (DUMP)."""
    out: dict[bytes, bytes | None] = {}
    async for key in redis.scan_iter(count=10_000):
        if not key.decode(errors="replace").startswith(exclude_prefixes):
            out[key] = await redis.dump(key)
    return out


async def prefixed_snapshot(redis: Redis, prefix: str) -> dict[bytes, bytes | None]:
    """The state under ``prefix`` minus replay checkpoints."""
    out: dict[bytes, bytes | None] = {}
    async for key in redis.scan_iter(match=f"{prefix}*", count=10_000):
        if b"ckpt:" not in key:
            out[key] = await redis.dump(key)
    return out
