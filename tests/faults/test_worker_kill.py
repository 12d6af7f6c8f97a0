"""The worker SIGKILLed mid-stream and started again: at-least-once delivery (the new
worker takes over from the last commit), and no double counting in user state thanks
to event ids."""

from __future__ import annotations

import pytest

from tests.faults.harness import BUCKETS, Scenario, count_users

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

RATE = 60.0
KILL_AT = 300  # the kill comes at the first send from here on that finds the worker has
KILL_BY = 500  # applied records its group has not committed yet (it commits every ~3 s)


async def test_sigkill_mid_stream_then_restart(scenario: Scenario) -> None:
    s = scenario
    events = s.events(800)

    async def kill_and_restart() -> None:
        # Killed right after a commit that covered everything it had applied, the worker
        # would leave nothing to redeliver and the test would show nothing; wait for a
        # moment with applied, uncommitted records instead.
        if len(s.workers) == 1 and await s.applied_past_commit(s.worker) > 0:
            s.worker.kill()
            s.start_worker("worker-2")

    await s.stream(events, RATE, at=dict.fromkeys(range(KILL_AT, KILL_BY), kill_and_restart))
    assert len(s.workers) == 2, f"no send from {KILL_AT} to {KILL_BY} found records to redeliver"
    first, second = s.workers
    await second.ready()
    await s.caught_up(timeout_s=240, worker=second)
    recs = list(s.out.recs)
    stats = second.stop()

    assert first.proc.returncode == -9
    assert "final stats" not in first.log()  # it really died without a clean shutdown
    # Nothing lost and nothing counted twice: every good event is in user state once.
    await s.assert_in_state_once(events)
    # The new worker took over from the last commit: it saw some records the killed one
    # had already applied (at-least-once), and knew them by their event ids.
    assert stats["events_in"] == sum(stats[b] for b in BUCKETS)
    assert stats["duplicates"] > 0, stats
    assert stats["events_in"] - stats["duplicates"] <= len(events) - KILL_AT // 2
    assert {r["user_id"] for r in recs} == set(count_users(events))
