"""Rate limits of the pull API: a token bucket per client address, in memory.

Each API process keeps its own buckets (``SHOPREC_API_RATE_LIMIT`` requests/s refilled,
``SHOPREC_API_RATE_BURST`` at most), so behind a Service of N replicas a client that
hits every replica may make N times the rate: the limit protects each process from a
runaway client, not a quota shared by all.
"""

from __future__ import annotations

from collections import OrderedDict

# Clients remembered at once; the least recently seen is forgotten beyond this (it comes
# back with a full bucket), so a flood of source addresses cannot grow the table.
MAX_CLIENTS = 10_000


class RateLimiter:
    """``rate`` requests per second per client, ``burst`` at once; ``rate`` 0: no limit."""

    def __init__(self, rate: float, burst: int, max_clients: int = MAX_CLIENTS) -> None:
        if rate < 0 or burst < 1 or max_clients < 1:
            raise ValueError("rate must be >= 0, burst and max_clients >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def take(self, client: str, now: float) -> float:
        """Spend one request of ``client`` at monotonic time ``now``: 0.0 when allowed,
        else the seconds until one token will be there (nothing is spent then)."""
        if self.rate == 0:
            return 0.0
        tokens, at = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
