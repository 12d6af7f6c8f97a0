"""Redis stopped and started again mid-stream: the worker retries with backoff without
acknowledging, so no event is lost or dead-lettered, and it serves again once Redis is back.

The local Redis keeps no data across a restart (the feature store is rebuilt from
Kafka); the catalogue is written again as soon as it is back, as an operator's
catalogue replay would."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from tests.faults.harness import (
    Collector,
    FaultStack,
    Sent,
    Worker,
    assert_books_balance,
    count_users,
    live,
    load_events,
    prepare,
    scenario_settings,
    start_producer,
    state_event_counts,
    stream,
    wait_caught_up,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

RATE = 50.0
RESTART_AT = 250


async def test_redis_restart_mid_stream_loses_nothing(faults: FaultStack, logs: Path) -> None:
    settings = scenario_settings(faults.endpoints)
    names = await prepare(settings)
    events = live(load_events(700), uuid.uuid4().hex[:6])
    sent = Sent()
    worker = await Worker(settings, logs / "worker.log").ready()
    producer = await start_producer(settings)
    back_at_ms = 0.0

    async def bounce_redis() -> None:
        nonlocal back_at_ms
        await asyncio.to_thread(faults.stack.stop_component, "redis")
        await asyncio.sleep(4.0)  # events keep coming while it is away
        await asyncio.to_thread(faults.stack.start_component, "redis", 60)
        await faults.catalogue.ensure_in(faults.endpoints.redis_url)
        back_at_ms = time.time() * 1000

    bounce: list[asyncio.Task[None]] = []

    async def at(n: int) -> None:
        if n == RESTART_AT:
            bounce.append(asyncio.create_task(bounce_redis()))

    try:
        async with Collector(settings) as out:
            await stream(producer, names, events, RATE, sent, on_sent=at)
            await asyncio.gather(*bounce)
            await wait_caught_up(settings, worker, out, timeout_s=240)
            recs, dead = list(out.recs), list(out.dead)
        stats = worker.stop()
    finally:
        await producer.stop()
        if worker.proc.poll() is None:
            worker.kill()

    log = worker.log()
    assert "retry" in log  # it waited for Redis rather than giving up
    assert not dead, [d.value for d in dead]  # an outage is not bad input
    assert_books_balance(stats, len(events))
    # Events after the restart are in the (new) state exactly once, and were served.
    after = [e for e in events if e["ts"] > back_at_ms]
    assert len(after) > 200
    later_users = count_users(after)
    counts = await state_event_counts(settings, set(later_users))
    assert all(counts[u] >= n for u, n in later_users.items()), worker.tail()
    assert {r["trigger"]["event_id"] for r in recs} >= {after[-1]["event_id"]}
    served_late = [r for r in recs if r["trigger"]["ts"] > back_at_ms]
    assert len(served_late) > 100 and all(r["items"] for r in served_late)
    assert not any(r["degraded"] for r in served_late), worker.tail()
