"""Apache Kafka stopped and started again mid-stream (its log on disk survives): the worker
rides it out, nothing is lost, and redelivered records are counted once."""

from __future__ import annotations

import asyncio
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


async def test_broker_restart_mid_stream_loses_nothing(faults: FaultStack, logs: Path) -> None:
    settings = scenario_settings(faults.endpoints)
    names = await prepare(settings)
    events = live(load_events(700), uuid.uuid4().hex[:6])
    sent = Sent()
    worker = await Worker(settings, logs / "worker.log").ready()
    producer = await start_producer(settings)

    async def bounce_broker() -> None:
        await asyncio.to_thread(faults.stack.stop_component, "broker")
        await asyncio.sleep(3.0)  # events keep coming while it is away
        await asyncio.to_thread(faults.stack.start_component, "broker", 120)

    bounce: list[asyncio.Task[None]] = []

    async def at(n: int) -> None:
        if n == 250:
            bounce.append(asyncio.create_task(bounce_broker()))

    try:
        async with Collector(settings) as out:
            await stream(producer, names, events, RATE, sent, on_sent=at)
            await asyncio.gather(*bounce)
            await wait_caught_up(settings, worker, out, timeout_s=240)
            recs, dead = list(out.recs), list(out.dead)
        assert worker.proc.poll() is None, worker.tail()
        stats = worker.stop()
    finally:
        await producer.stop()
        if worker.proc.poll() is None:
            worker.kill()

    assert not dead, [d.value for d in dead]
    assert_books_balance(stats, len(events))
    # Each good event folded into user state exactly once, redeliveries or not.
    counts = await state_event_counts(settings, set(count_users(events)))
    assert counts == count_users(events)
    # Every user still got recommendations, and events after the restart were served.
    assert {r["user_id"] for r in recs} == set(count_users(events))
    assert {e["event_id"] for e in events[-50:]} & {r["trigger"]["event_id"] for r in recs}
