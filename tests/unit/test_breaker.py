"""The Triton circuit breaker: opens on failures, fails fast, probes once, backs off."""

from __future__ import annotations

import pytest

from ranking.breaker import BreakerState, CircuitBreaker
from ranking.client import RankerClient
from shoprec.errors import RankerUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_and_refuses_calls() -> None:
    clock = Clock()
    b = CircuitBreaker("t", failures=3, cool_down_s=1.0, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert b.state is BreakerState.CLOSED
    assert b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    assert [b.allow() for _ in range(50)] == [False] * 50
    assert b.rejected == 50


def test_a_success_resets_the_failure_count() -> None:
    b = CircuitBreaker("t", failures=2, clock=Clock())
    b.record_failure()
    b.record_success()
    b.record_failure()
    assert b.state is BreakerState.CLOSED


def test_one_probe_after_cool_down_then_closed_on_success() -> None:
    clock = Clock()
    b = CircuitBreaker("t", failures=1, cool_down_s=1.0, clock=clock)
    b.record_failure()
    clock.now += 0.99
    assert not b.allow()
    clock.now += 0.02
    assert b.allow()  # the probe
    assert b.state is BreakerState.HALF_OPEN
    assert not b.allow()  # only one probe at a time
    b.record_success()
    assert b.state is BreakerState.CLOSED
    assert b.allow() and b.probes == 1


def test_failed_probes_double_the_cool_down_up_to_the_cap() -> None:
    clock = Clock()
    b = CircuitBreaker("t", failures=1, cool_down_s=1.0, max_cool_down_s=4.0, clock=clock)
    b.record_failure()
    waits = []
    for _ in range(5):
        start = clock.now
        while not b.allow():
            clock.now += 0.25
        waits.append(clock.now - start)
        b.record_failure()
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("t", failures=0)
    with pytest.raises(ValueError):
        CircuitBreaker("t", cool_down_s=2.0, max_cool_down_s=1.0)


async def test_client_fails_fast_while_open_and_counts_unreachable_calls() -> None:
    # Nothing listens on port 1: every real call fails with UNAVAILABLE.
    clock = Clock()
    breaker = CircuitBreaker("t", failures=2, cool_down_s=60.0, max_cool_down_s=60.0, clock=clock)
    client = RankerClient("127.0.0.1:1", timeout_s=0.5, breaker=breaker)
    try:
        for _ in range(2):
            with pytest.raises(RankerUnavailable, match="unavailable"):
                await client.encode(["x"])
        assert breaker.state is BreakerState.OPEN
        with pytest.raises(RankerUnavailable, match="circuit open"):
            await client.encode(["x"])
        assert breaker.rejected == 1
    finally:
        await client.close()
