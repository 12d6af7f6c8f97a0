"""Triton stopped mid-stream and started again: recommendations go on, degraded, from
retrieval scores; the circuit breaker spares the dead server; the ranker comes back alone."""

from __future__ import annotations

import time

import pytest

from tests.faults.harness import Scenario, assert_books_balance

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

RATE = 40.0
COOL_DOWN_S = 0.25  # the breaker's longest wait is 16 times this


@pytest.mark.scenario(triton_breaker_cool_down_s=COOL_DOWN_S)
async def test_triton_outage_degrades_then_recovers(scenario: Scenario) -> None:
    s = scenario
    # The spares stream at 10/s while Triton restarts: 1,600 of them allow 160 s (three
    # models load, two of them MiniLM; about 60-90 s on two busy cores).
    events = s.events(2400)
    before, during, spare, after = events[:150], events[150:400], events[400:2000], events[2000:]
    await s.stream(before, RATE)
    await s.caught_up()  # all served by the ranker
    await s.stop_component("triton")
    down_at = time.monotonic()
    await s.stream(during, RATE)
    # Triton's restart (BERT and the ranker load) takes a while; events keep coming.
    restart = s.background(s.start_component("triton", 300))
    while not restart.done():
        assert spare, "Triton took too long to restart"
        chunk, spare = spare[:10], spare[10:]
        await s.stream(chunk, 10.0)
    await restart
    outage_s = time.monotonic() - down_at
    back_at_ms = time.time() * 1000
    await s.stream(after, RATE)
    await s.caught_up()
    recs = list(s.out.recs)
    stats = s.worker.stop()

    by_trigger = {r["trigger"]["event_id"]: r for r in recs}
    first = [by_trigger[e["event_id"]] for e in before if e["event_id"] in by_trigger]
    mid = [by_trigger[e["event_id"]] for e in during if e["event_id"] in by_trigger]
    # Served by the ranker before the outage; by retrieval scores, flagged, during it.
    assert first and all(not r["degraded"] for r in first), s.worker.tail()
    assert all(r["model"].startswith("fused_ranker@") for r in first)
    assert len(mid) > len(during) // 2, s.worker.tail()
    assert all(r["degraded"] and r["model"] == "retrieval@fallback" for r in mid)
    assert all(r["items"] for r in mid)
    # Back to the ranker by itself: at the latest one longest cool-down after Triton is up.
    recovered_by_ms = back_at_ms + 16 * COOL_DOWN_S * 1000 + 2000
    late = [r for r in recs if r["trigger"]["ts"] > recovered_by_ms]
    assert len(late) > 50, (len(late), s.worker.tail())
    assert all(not r["degraded"] for r in late), s.worker.tail()

    # The breaker spared the dead server: a probe per (doubling, capped) cool-down,
    # not a call per micro-batch.
    log = s.worker.log()
    probes = log.count("circuit half-open: probing")
    assert "circuit open after" in log and "circuit closed" in log, s.worker.tail()
    assert 1 <= probes <= 6 + outage_s / (16 * COOL_DOWN_S), (probes, outage_s)
    assert probes < stats["degraded"] / 3, (probes, stats["degraded"])

    # Nothing lost, nothing counted twice: every event but the spares left unsent.
    assert s.sent.good == len(s.streamed) == len(events) - len(spare)
    assert_books_balance(stats, len(s.streamed))
    assert stats["degraded"] >= len(mid)
    await s.assert_in_state_once(s.streamed)
