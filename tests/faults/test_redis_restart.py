"""Redis stopped and started again mid-stream: the worker retries with backoff without
acknowledging, so no event is lost or dead-lettered, and it serves again once Redis is back.

The local Redis keeps no data across a restart (the feature store is rebuilt from
Kafka); the catalogue is written again as soon as it is back, as an operator's
catalogue replay would."""

from __future__ import annotations

import time

import pytest

from tests.faults.harness import Scenario, assert_books_balance, count_users

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

RATE = 50.0
RESTART_AT = 250
CATALOGUE_CATCH_UP_MS = 6000
"""After the catalogue is written again, Triton's and the worker's item followers see it
within their read interval (0.5 s), or their backoff after the outage (up to 5 s,
``ItemLogFollower.max_backoff_s``): lists of triggers before that may still be empty."""


async def test_redis_restart_mid_stream_loses_nothing(scenario: Scenario) -> None:
    s = scenario
    events = s.events(1100)
    back_at_ms = 0.0

    async def bounce_redis() -> None:
        nonlocal back_at_ms
        await s.bounce("redis", away_s=4.0, start_timeout_s=60)
        await s.faults.catalogue.ensure_in(s.faults.endpoints.redis_url)
        back_at_ms = time.time() * 1000

    await s.stream(events, RATE, meanwhile={RESTART_AT: bounce_redis})
    await s.caught_up(timeout_s=240)
    recs, dead = list(s.out.recs), list(s.out.dead)
    stats = s.worker.stop()

    log = s.worker.log()
    assert "retry" in log  # it waited for Redis rather than giving up
    assert not dead, [d.value for d in dead]  # an outage is not bad input
    assert_books_balance(stats, len(events))
    # Events after the restart are in the (new) state exactly once, and were served.
    after = [e for e in events if e["ts"] > back_at_ms]
    assert len(after) > 200
    later_users = count_users(after)
    counts = await s.state_counts(after)
    assert all(counts[u] >= n for u, n in later_users.items()), s.worker.tail()
    assert {r["trigger"]["event_id"] for r in recs} >= {after[-1]["event_id"]}
    served_late = [r for r in recs if r["trigger"]["ts"] > back_at_ms + CATALOGUE_CATCH_UP_MS]
    assert len(served_late) > 100 and all(r["items"] for r in served_late)
    assert not any(r["degraded"] for r in served_late), s.worker.tail()
