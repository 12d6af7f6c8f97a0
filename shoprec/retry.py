"""The one retry helper: exponential backoff with full jitter, for Redis and Triton alike."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import ClusterError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shoprec.errors import ShoprecError, describe

T = TypeVar("T")
log = logging.getLogger("shoprec.retry")

# Errors worth another try: the dependency may come back.
RETRIABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
    # Redis Cluster while a failover runs: CLUSTERDOWN (a primary's slots have no node
    # yet; ClusterDownError is a ClusterError), or the client's own retries ran out.
    ClusterError,
    SlotNotCoveredError,
    TryAgainError,
)


def is_retriable(exc: BaseException) -> bool:
    if isinstance(exc, ShoprecError):
        return exc.retriable
    return isinstance(exc, RETRIABLE)


def backoff_s(attempt: int, base_s: float = 0.1, cap_s: float = 5.0) -> float:
    """Full jitter: uniform in [0, min(cap, base·2^attempt)]."""
    return random.uniform(0.0, min(cap_s, base_s * 2.0**attempt))


async def retry(
    what: str,
    call: Callable[[], Awaitable[T]],
    attempts: int | None = None,
    base_s: float = 0.1,
    cap_s: float = 5.0,
) -> T:
    """Await ``call()`` until it succeeds; ``attempts=None`` retries for as long as it takes.

    Only retriable errors are retried; anything else propagates at once.
    """
    attempt = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            attempt += 1
            if not is_retriable(exc) or (attempts is not None and attempt >= attempts):
                raise
            delay = backoff_s(attempt, base_s, cap_s)
            log.warning("%s failed (%s); retry %d in %.2f s", what, describe(exc), attempt, delay)
            await asyncio.sleep(delay)
