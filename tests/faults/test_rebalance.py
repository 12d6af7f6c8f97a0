"""A second worker joins mid-stream and leaves again: partitions move twice, and every
record is still counted once across the two workers."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import (
    BUCKETS,
    Collector,
    FaultStack,
    Sent,
    Worker,
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


async def test_worker_joins_and_leaves_mid_stream(faults: FaultStack, logs: Path) -> None:
    settings = scenario_settings(faults.endpoints)
    names = await prepare(settings)
    events = live(load_events(1000), uuid.uuid4().hex[:6])
    sent = Sent()
    a = await Worker(settings, logs / "worker-a.log").ready()
    b: Worker | None = None
    b_stats: dict[str, Any] = {}
    producer = await start_producer(settings)

    async def join_then_leave(n: int) -> None:
        nonlocal b, b_stats
        if n == 250:
            b = Worker(settings, logs / "worker-b.log")
        if n == 650 and b is not None:
            await b.wait_for("Worker ready")
            b_stats = await asyncio.to_thread(b.stop)

    try:
        async with Collector(settings) as out:
            await stream(producer, names, events, RATE, sent, on_sent=join_then_leave)
            await wait_caught_up(settings, a, out, timeout_s=240)
            recs = list(out.recs)
        a_stats = a.stop()
    finally:
        await producer.stop()
        for w in (a, b):
            if w is not None and w.proc.poll() is None:
                w.kill()

    assert b is not None and b_stats, "the second worker never ran"
    both = [a_stats, b_stats]
    # The second worker really took partitions, and the first got them back.
    assert int(b_stats["events_in"]) > 0, b.tail()
    for s in both:
        assert s["events_in"] == sum(s[k] for k in BUCKETS), s
    events_in = sum(int(s["events_in"]) for s in both)
    duplicates = sum(int(s["duplicates"]) for s in both)
    assert events_in - duplicates == len(events), both
    counts = await state_event_counts(settings, set(count_users(events)))
    assert counts == count_users(events)
    assert {r["user_id"] for r in recs} == set(count_users(events))
