"""The one way shoprec processes open Redis, so every client is configured alike.

redis-py 8's default protocol (RESP3) stays: RESP2 was measured no cheaper for the
worker's read (``bench/redis_protocol.py``: 157 vs 149 CPU-us per user for RESP2 vs
RESP3, rees46-sample, batches of 32; bench/results/ablation/redis-protocol.json).
"""

from __future__ import annotations

from pydantic import SecretStr
from redis.asyncio import Redis


def open_redis(
    url: SecretStr | str, *, timeout_s: float = 5.0, max_connections: int | None = None
) -> Redis:
    """An async client for ``url`` (redis:// or rediss://; connects on first use).

    ``timeout_s`` bounds every socket read: the worker's hot path wants seconds, bulk
    jobs (rebuild, verify) a minute.
    """
    raw = url.get_secret_value() if isinstance(url, SecretStr) else url
    return Redis.from_url(
        raw,
        socket_timeout=timeout_s,
        max_connections=max_connections,
    )
