"""Triton stopped mid-stream and started again: recommendations go on, degraded, from
retrieval scores; the circuit breaker spares the dead server; the ranker comes back alone."""

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

RATE = 40.0
COOL_DOWN_S = 0.25  # the breaker's longest wait is 16 times this


async def test_triton_outage_degrades_then_recovers(faults: FaultStack, logs: Path) -> None:
    settings = scenario_settings(faults.endpoints, triton_breaker_cool_down_s=COOL_DOWN_S)
    names = await prepare(settings)
    events = live(load_events(1400), uuid.uuid4().hex[:6])
    before, during, spare, after = events[:150], events[150:400], events[400:1000], events[1000:]
    sent = Sent()
    streamed = [*before, *during]
    worker = await Worker(settings, logs / "worker.log").ready()
    producer = await start_producer(settings)
    try:
        async with Collector(settings) as out:
            await stream(producer, names, before, RATE, sent)
            await wait_caught_up(settings, worker, out)  # all served by the ranker
            await asyncio.to_thread(faults.stack.stop_component, "triton")
            down_at = time.monotonic()
            await stream(producer, names, during, RATE, sent)
            # Triton's restart (BERT and the ranker load) takes a while; events keep coming.
            restart = asyncio.create_task(
                asyncio.to_thread(faults.stack.start_component, "triton", 300)
            )
            while not restart.done():
                assert spare, "Triton took too long to restart"
                chunk, spare = spare[:10], spare[10:]
                await stream(producer, names, chunk, 10.0, sent)
                streamed += chunk
            await restart
            outage_s = time.monotonic() - down_at
            back_at_ms = time.time() * 1000
            await stream(producer, names, after, RATE, sent)
            streamed += after
            await wait_caught_up(settings, worker, out)
            recs = list(out.recs)
        stats = worker.stop()
    finally:
        await producer.stop()
        if worker.proc.poll() is None:
            worker.kill()

    by_trigger = {r["trigger"]["event_id"]: r for r in recs}
    first = [by_trigger[e["event_id"]] for e in before if e["event_id"] in by_trigger]
    mid = [by_trigger[e["event_id"]] for e in during if e["event_id"] in by_trigger]
    # Served by the ranker before the outage; by retrieval scores, flagged, during it.
    assert first and all(not r["degraded"] for r in first), worker.tail()
    assert all(r["model"].startswith("fused_ranker@") for r in first)
    assert len(mid) > len(during) // 2, worker.tail()
    assert all(r["degraded"] and r["model"] == "retrieval@fallback" for r in mid)
    assert all(r["items"] for r in mid)
    # Back to the ranker by itself: at the latest one longest cool-down after Triton is up.
    recovered_by_ms = back_at_ms + 16 * COOL_DOWN_S * 1000 + 2000
    late = [r for r in recs if r["trigger"]["ts"] > recovered_by_ms]
    assert len(late) > 50, (len(late), worker.tail())
    assert all(not r["degraded"] for r in late), worker.tail()

    # The breaker spared the dead server: a probe per (doubling, capped) cool-down,
    # not a call per micro-batch.
    log = worker.log()
    probes = log.count("circuit half-open: probing")
    assert "circuit open after" in log and "circuit closed" in log, worker.tail()
    assert 1 <= probes <= 6 + outage_s / (16 * COOL_DOWN_S), (probes, outage_s)
    assert probes < stats["degraded"] / 3, (probes, stats["degraded"])

    # Nothing lost, nothing counted twice.
    assert sent.good == len(streamed)
    assert_books_balance(stats, len(streamed))
    assert stats["degraded"] >= len(mid)
    counts = await state_event_counts(settings, set(count_users(streamed)))
    assert counts == count_users(streamed)
