"""Apache Kafka stopped and started again mid-stream (its log on disk survives): the worker
rides it out, nothing is lost, and redelivered records are counted once."""

from __future__ import annotations

import pytest

from tests.faults.harness import Scenario, assert_books_balance, count_users

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

RATE = 50.0
RESTART_AT = 250


async def test_broker_restart_mid_stream_loses_nothing(scenario: Scenario) -> None:
    s = scenario
    events = s.events(700)

    async def bounce_broker() -> None:
        await s.bounce("broker", away_s=3.0, start_timeout_s=120)

    await s.stream(events, RATE, meanwhile={RESTART_AT: bounce_broker})
    await s.caught_up(timeout_s=240)
    recs, dead = list(s.out.recs), list(s.out.dead)
    assert s.worker.proc.poll() is None, s.worker.tail()
    stats = s.worker.stop()

    assert not dead, [d.value for d in dead]
    assert_books_balance(stats, len(events))
    # Each good event folded into user state exactly once, redeliveries or not.
    await s.assert_in_state_once(events)
    # Every user still got recommendations, and events after the restart were served.
    assert {r["user_id"] for r in recs} == set(count_users(events))
    assert {e["event_id"] for e in events[-50:]} & {r["trigger"]["event_id"] for r in recs}
