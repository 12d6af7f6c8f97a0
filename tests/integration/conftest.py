"""The real stack for integration tests: Apache Kafka (KRaft), Redis, Triton with real BERT.

Started once per session on OS-assigned ports, stopped at the end; each test
module isolates itself with its own topic prefix and Faust app id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bench.features import private_redis
from features.connection import open_redis
from infra.stack import Endpoints, Stack
from tests.stack import stack_settings

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"the real datasets are missing: expected {DATA} (../shared/data)")
    return DATA


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    settings = stack_settings(tmp_path_factory.mktemp("stack"))
    s = Stack(settings, model_repo=REPO / "model_repo")
    endpoints = s.up(("broker", "redis", "triton"), timeout_s=300)
    try:
        yield endpoints
    finally:
        s.down(wipe=True)


@pytest.fixture
async def redis(stack: Endpoints) -> AsyncIterator[Redis]:
    """A client of the stack's Redis, configured as shoprec's own."""
    client = open_redis(stack.redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
def private_redis_url() -> Iterator[str]:
    """A redis-server of the module's own, for tests of the stores alone (no stack)."""
    with private_redis() as url:
        yield url


@pytest.fixture
async def private_redis_client(private_redis_url: str) -> AsyncIterator[Redis]:
    """A client of :func:`private_redis_url`, its database emptied for each test."""
    client = open_redis(private_redis_url)
    await client.flushdb()
    yield client
    await client.aclose()
