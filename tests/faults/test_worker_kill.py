"""The worker SIGKILLed mid-stream and started again: at-least-once delivery (the new
worker takes over from the last commit), and no double counting in user state thanks
to event ids."""

from __future__ import annotations

import uuid
from pathlib import Path

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

RATE = 60.0
KILL_AT = 300


async def test_sigkill_mid_stream_then_restart(faults: FaultStack, logs: Path) -> None:
    settings = scenario_settings(faults.endpoints)
    names = await prepare(settings)
    events = live(load_events(800), uuid.uuid4().hex[:6])
    sent = Sent()
    first = await Worker(settings, logs / "worker-1.log").ready()
    workers = [first]
    producer = await start_producer(settings)

    async def kill_and_restart_at(n: int) -> None:
        if n == KILL_AT:
            first.kill()
            workers.append(Worker(settings, logs / "worker-2.log"))

    try:
        async with Collector(settings) as out:
            await stream(producer, names, events, RATE, sent, on_sent=kill_and_restart_at)
            second = await workers[-1].ready()
            await wait_caught_up(settings, second, out, timeout_s=240)
            recs = list(out.recs)
        stats = second.stop()
    finally:
        await producer.stop()
        for w in workers:
            if w.proc.poll() is None:
                w.kill()

    assert first.proc.returncode == -9
    assert "final stats" not in first.log()  # it really died without a clean shutdown
    # Nothing lost and nothing counted twice: every good event is in user state once.
    counts = await state_event_counts(settings, set(count_users(events)))
    assert counts == count_users(events)
    # The new worker took over from the last commit: it saw some records the killed one
    # had already applied (at-least-once), and knew them by their event ids.
    assert stats["events_in"] == sum(stats[b] for b in BUCKETS)
    assert stats["duplicates"] > 0, stats
    assert stats["events_in"] - stats["duplicates"] <= len(events) - KILL_AT // 2
    assert {r["user_id"] for r in recs} == set(count_users(events))
