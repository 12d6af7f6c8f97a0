"""The one way shoprec processes open Redis, so every client is configured alike.

RESP2 on purpose: redis-py 8 speaks RESP3 by default and then reshapes sorted-set and
stream replies into their RESP2 form in Python; with hiredis parsing RESP2 directly the
worker's Redis reads cost less CPU (see bench/results/ablation/).  Every reply shape
shoprec reads is the same under both protocols (``ranking.item_table.stream_entries``
accepts either), so this is a speed choice, not a contract.
"""

from __future__ import annotations

from pydantic import SecretStr
from redis.asyncio import Redis

RESP_PROTOCOL = 2


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
        protocol=RESP_PROTOCOL,
    )
