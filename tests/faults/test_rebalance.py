"""A second worker joins mid-stream and leaves again: partitions move twice, and every
record is still counted once across the two workers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.faults.harness import BUCKETS, Scenario, count_users

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

RATE = 50.0
JOIN_AT, LEAVE_AT = 250, 650


async def test_worker_joins_and_leaves_mid_stream(scenario: Scenario) -> None:
    s = scenario
    events = s.events(1000)
    b_stats: dict[str, Any] = {}

    async def join() -> None:
        s.start_worker("worker-b")

    async def leave() -> None:
        nonlocal b_stats
        b = s.workers[1]
        await b.wait_for("Worker ready")
        b_stats = await asyncio.to_thread(b.stop)

    await s.stream(events, RATE, at={JOIN_AT: join, LEAVE_AT: leave})
    await s.caught_up(timeout_s=240)
    recs = list(s.out.recs)
    a_stats = s.worker.stop()

    assert len(s.workers) == 2 and b_stats, "the second worker never ran"
    b = s.workers[1]
    both = [a_stats, b_stats]
    # The second worker really took partitions, and the first got them back.
    assert int(b_stats["events_in"]) > 0, b.tail()
    for stats in both:
        assert stats["events_in"] == sum(stats[k] for k in BUCKETS), stats
    events_in = sum(int(stats["events_in"]) for stats in both)
    duplicates = sum(int(stats["duplicates"]) for stats in both)
    assert events_in - duplicates == len(events), both
    await s.assert_in_state_once(events)
    assert {r["user_id"] for r in recs} == set(count_users(events))
