"""A small circuit breaker, so a dead Triton costs the worker nothing but a flag check.

    closed ──(``failures`` retriable errors in a row)──► open
    open ──(cool-down elapsed)──► half-open: one probe call goes through
    half-open ──probe succeeds──► closed      half-open ──probe fails──► open, cool-down doubled

While open every call is refused at once (:meth:`CircuitBreaker.allow` is False),
and the caller serves its fallback.  The cool-down doubles after each failed
probe up to ``max_cool_down_s``, so a server that stays down for minutes sees one
probe every ``max_cool_down_s``, not one call per micro-batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import Enum

log = logging.getLogger("shoprec.breaker")


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Consecutive-failure breaker with one half-open probe at a time.

    Not thread-safe; one event loop.  ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        name: str,
        *,
        failures: int = 3,
        cool_down_s: float = 1.0,
        max_cool_down_s: float = 16.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or cool_down_s <= 0 or max_cool_down_s < cool_down_s:
            raise ValueError("need failures >= 1 and 0 < cool_down_s <= max_cool_down_s")
        self.name = name
        self._threshold = failures
        self._base_s = cool_down_s
        self._max_s = max_cool_down_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._cool_down_s = cool_down_s
        self._opened_at = 0.0
        self._probing = False
        self.rejected = 0
        """Calls refused while open (each one a call the dead server did not get)."""
        self.probes = 0
        """Half-open probe calls let through."""
        self.opened = 0
        """Times the breaker opened."""

    @property
    def state(self) -> BreakerState:
        return self._state

    def twin(self, name: str) -> CircuitBreaker:
        """A fresh breaker with this one's thresholds and clock (one per server)."""
        return CircuitBreaker(
            name,
            failures=self._threshold,
            cool_down_s=self._base_s,
            max_cool_down_s=self._max_s,
            clock=self._clock,
        )

    def available(self) -> bool:
        """Whether :meth:`allow` would let a call through now; counts nothing, starts no
        probe (to pick among several servers before calling one)."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            return self._clock() - self._opened_at >= self._cool_down_s
        return not self._probing

    def allow(self) -> bool:
        """Whether a call may go to the server now; False means fail fast."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self._cool_down_s:
                self.rejected += 1
                return False
            self._state = BreakerState.HALF_OPEN
        if self._probing:
            self.rejected += 1
            return False
        self._probing = True
        self.probes += 1
        log.info("%s circuit half-open: probing", self.name)
        return True

    def record_success(self) -> None:
        if self._state is not BreakerState.CLOSED:
            log.warning("%s circuit closed: the server answers again", self.name)
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._cool_down_s = self._base_s
        self._probing = False

    def record_failure(self) -> None:
        """A retriable failure (unreachable, timed out); invalid requests do not count."""
        if self._state is BreakerState.HALF_OPEN:
            self._cool_down_s = min(self._max_s, self._cool_down_s * 2)
            self._trip()
            return
        self._failures += 1
        if self._state is BreakerState.CLOSED and self._failures >= self._threshold:
            self._trip()

    def _trip(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._probing = False
        self.opened += 1
        log.warning(
            "%s circuit open after %d failures; next probe in %.1f s",
            self.name,
            self._failures,
            self._cool_down_s,
        )
