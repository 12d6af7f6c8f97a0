"""The feature store's write and read paths against a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
from redis.asyncio import Redis

from features import keys
from features.store import FeatureStore, UpdatePolicy, UserUpdate
from features.user_state import decayed_sum, normalise
from infra import procs
from infra.redis_server import RedisServer

pytestmark = pytest.mark.integration

DIM = keys.EMB_DIM
HOUR = 3_600_000
POLICY = UpdatePolicy(half_life_ms=HOUR, history_len=5, ttl_s=3600, min_emit_interval_ms=60_000)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), procs.free_port())
    proc = server.start()
    try:
        procs.wait_until(server.ready, 20, "redis", server.log_path, proc=proc)
        yield server.url
    finally:
        procs.stop(proc)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def update(
    eid: str, ts: int, item: str, seed: int | None, etype: str = "click", user: str = "u1"
) -> UserUpdate:
    return UserUpdate(
        eid, user, etype, ts, item, None if seed is None else vec(seed), etype == "purchase"
    )


async def test_order_and_duplicates_do_not_change_the_embedding(redis: Redis) -> None:
    store = FeatureStore(redis, POLICY)
    t0 = 1_700_000_000_000
    ups = [update(f"e{i}", t0 + i * 600_000, f"i{i}", i) for i in range(6)]
    shuffled = [ups[3], ups[0], ups[5], ups[1], ups[4], ups[2]]
    results = await store.apply_events(shuffled)
    assert all(r.applied for r in results)
    once = await store.user_embedding("u1")
    again = await store.apply_events(ups)  # a replay of the same ids
    assert not any(r.applied for r in again)
    np.testing.assert_allclose(await store.user_embedding("u1"), once)
    expected, _ = decayed_sum([(u.ts, 2.0, u.vector) for u in ups], HOUR)  # type: ignore[misc]
    np.testing.assert_allclose(once, normalise(expected, DIM), atol=1e-5)
    hist = await redis.lrange(keys.user_hist("u1"), 0, -1)
    assert len(hist) == POLICY.history_len


async def test_rate_limit_lets_purchases_through(redis: Redis) -> None:
    store = FeatureStore(redis, POLICY)
    t0 = 1_700_000_000_000
    results = await store.apply_events(
        [
            update("a", t0, "i1", 1),
            update("b", t0 + 1000, "i2", 2),  # within the minimum interval
            update("c", t0 + 2000, "i3", 3, etype="purchase"),
            update("d", t0 + 61_000 + 2000, "i4", None),  # interval passed, item without text
        ]
    )
    assert [r.emit for r in results] == [True, False, True, True]


async def test_covisitation_and_popularity_are_counted_once(redis: Redis) -> None:
    store = FeatureStore(redis, POLICY)
    t0 = 1_700_000_000_000
    batch = [update("a", t0, "x", 1), update("b", t0 + 1000, "y", 2, etype="cart")]
    await store.apply_events(batch[:1])
    await store.apply_events(batch[1:])
    await store.apply_events(batch)  # replayed: no double counting
    assert await redis.zscore(keys.item_covis("x"), "y") == 1.0
    assert await redis.zscore(keys.item_covis("y"), "x") == 1.0
    assert await redis.zscore(keys.popularity_hour(t0 // HOUR), "y") == 3.0
    ctx = await store.read_context(["u1"], {"u1": t0 + 1000})
    assert [h.item_id for h in ctx.users["u1"].history] == ["y", "x"]
    assert ctx.users["u1"].covis == {"x": 1.0, "y": 1.0}
    assert ctx.trending["y"] == 3.0


def test_user_keys_share_one_hash_tag() -> None:
    """Redis Cluster hashes only the {tag}: one user's keys land in one slot, as Lua needs."""
    names = [
        f("u9")
        for f in (keys.user_emb, keys.user_meta, keys.user_hist, keys.user_events, keys.user_query)
    ]
    assert {n[: n.index("}") + 1] for n in names} == {"{u:u9}"}
