"""A worker stopped (SIGTERM) while a batch is in flight finishes that batch first: what it
put in user state it counts and publishes, so no record falls between two workers' books.

Faust stops the consumer, then waits for every record the agents took to be acknowledged
(``stream_wait_empty``) before the worker logs its final counters and closes its
connections; a batch cut short after its ingest would be counted by no worker (the
partition's next owner finds its events applied already: duplicates only).  The batch
here waits on a frozen Triton (SIGSTOP) when the signal comes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.faults.harness import Scenario, assert_books_balance, count_users

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]


@contextmanager
def frozen(s: Scenario, role: str) -> Iterator[None]:
    """``role``'s processes stopped (SIGSTOP) inside the block: calls to it hang until
    their timeout, as on a stalled server; SIGCONT after, whatever happened."""
    pgid = int(s.faults.stack.status()[role]["pid"])  # the process group's leader
    os.killpg(pgid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(pgid, signal.SIGCONT)


async def test_a_stopping_worker_finishes_counts_and_publishes_the_batch_in_flight(
    scenario: Scenario,
) -> None:
    s = scenario
    events = s.events(30)
    warm, last = events[:25], events[25:]
    await s.stream(warm, 40.0)
    await s.caught_up()

    with frozen(s, "triton"):
        # Ingested at once (Redis), then the batch waits on the frozen ranker for
        # SHOPREC_TRITON_TIMEOUT_S before it falls back: the stop lands in that wait.
        await s.stream(last, 200.0)
        deadline = time.monotonic() + 5.0
        while sum((await s.state_counts(events)).values()) <= len(warm):
            assert time.monotonic() < deadline, s.worker.tail()
            await asyncio.sleep(0.02)
        stopped_at = time.monotonic()
        stats = await asyncio.to_thread(s.worker.stop)
        stop_s = time.monotonic() - stopped_at

    in_state = sum((await s.state_counts(events)).values())
    assert in_state > len(warm)  # the batch really was in flight at the signal
    # What the worker put in user state, its books count: no record is left for the next
    # owner to find applied and count as a duplicate only.
    assert_books_balance(stats, in_state)
    # ... and its lists went out (degraded: the ranker was frozen), published before exit.
    last_ids = {e["event_id"] for e in last}
    deadline = time.monotonic() + 10.0
    while not (served := [r for r in s.out.recs if r["trigger"]["event_id"] in last_ids]):
        assert time.monotonic() < deadline, s.worker.tail()
        await asyncio.sleep(0.1)
    assert {r["user_id"] for r in served} <= set(count_users(last))
    assert all(r["degraded"] for r in served), served
    assert stop_s < 15.0, stop_s  # the drain is bounded (DRAIN_ON_CLOSE_S)
