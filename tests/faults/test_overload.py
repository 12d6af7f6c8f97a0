"""Back-pressure: a minute of load well above the worker's capacity raises latency
but loses no event, and afterwards the worker catches up (lag back to zero) and answers
as fast as before."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from tests.faults.harness import Scenario, assert_books_balance, load_events

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

CALM_RATE, CALM_S = 40.0, 10.0
OVERLOAD_RATE, OVERLOAD_S = 900.0, 60.0
EVENTS = load_events(4000)  # the events whose items the catalogue holds, cycled


def take(n: int, start: int, tag: str) -> list[dict[str, Any]]:
    """``n`` real events from ``start`` on, cycled, with ids unique to this run."""
    out = []
    for i in range(start, start + n):
        e = dict(EVENTS[i % len(EVENTS)])
        e["event_id"] = f"{tag}-{i}"
        out.append(e)
    return out


def p(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# Micro-batches of at most 16: the worker's capacity well below what the test's producer
# can offer on the same two cores (little more than 900 events/s). With the default 128 the
# worker ranks 660-750 events/s there, and the offer was no longer an overload to rely on.
@pytest.mark.scenario(batch_max=16)
async def test_overload_raises_latency_loses_nothing_and_recovers(scenario: Scenario) -> None:
    # Every event ranked (no per-user interval, the scenario's default): the heaviest load.
    s = scenario
    calm_before = take(int(CALM_RATE * CALM_S), 0, s.tag)
    overload = take(int(OVERLOAD_RATE * OVERLOAD_S), len(calm_before), s.tag)
    calm_after = take(int(CALM_RATE * CALM_S), len(calm_before) + len(overload), s.tag)
    await s.stream(calm_before, CALM_RATE)
    await s.caught_up()
    t0 = time.monotonic()
    await s.stream(overload, OVERLOAD_RATE)
    offered_s = time.monotonic() - t0
    backlog = await s.lag()
    caught_up_s = await s.caught_up(timeout_s=600)
    busy_s = time.monotonic() - t0
    await s.stream(calm_after, CALM_RATE)
    await s.caught_up()
    recs = list(s.out.recs)
    stats = s.worker.stop()

    def latencies(events: list[dict[str, Any]]) -> list[float]:
        ids = {e["event_id"] for e in events}
        return [r["latency_ms"] for r in recs if r["trigger"]["event_id"] in ids]

    before, during, after = latencies(calm_before), latencies(overload), latencies(calm_after)
    capacity = len(overload) / busy_s
    print(
        f"overload: offered {len(overload) / offered_s:.0f}/s for {offered_s:.0f} s, "
        f"backlog {backlog} records when it stopped, "
        f"worker capacity {capacity:.0f}/s, caught up {caught_up_s:.0f} s after; "
        f"p50/p99 ms before {p(before, 50):.0f}/{p(before, 99):.0f}, "
        f"during {p(during, 50):.0f}/{p(during, 99):.0f}, "
        f"after {p(after, 50):.0f}/{p(after, 99):.0f}"
    )
    # It was an overload: offered well above what the worker could do, queued in Kafka (at
    # least ten seconds of the worker's work when the offer stopped).
    assert len(overload) / offered_s > 1.3 * capacity, (capacity, offered_s)
    assert backlog > 10 * capacity, (backlog, capacity)
    # Latency rose under the overload (queueing in Kafka, not loss) ...
    assert p(during, 99) > 5 * p(before, 99)
    # ... nothing was lost or counted twice ...
    all_events = calm_before + overload + calm_after
    assert_books_balance(stats, len(all_events))
    await s.assert_in_state_once(all_events)
    # ... and once the backlog was gone, latency was back where it was.
    assert after and p(after, 50) < 3 * p(before, 50) + 50, (before, after)
