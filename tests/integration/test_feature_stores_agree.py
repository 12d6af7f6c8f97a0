"""One feature implementation, two stores: Redis (live) and memory (training, replay, rebuild).

A property test: hypothesis picks random slices of the real event streams in
``../shared/data/*/events.jsonl.gz`` (in file order, which is event-time order), cuts
them into random micro-batches, redelivers some events, and feeds the same batches to
:class:`features.store.FeatureStore` on a real redis-server (``update_user.lua``,
``bump_counts.lua``) and to :class:`features.fold.MemoryStore`.  After every batch the
per-event results (applied, emit, recent history) must agree; at the end every key must
hold the same value (vectors to the float32 bit, counters to the double bit), the
behavioural vectors of items without text must agree, and so must what the recommender
reads (``read_context``) for every user.

Item vectors are seeded-random per item (the catalogue's text, not BERT, is the point:
items without text get none); categories are the catalogue's own.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

import features.store
from bench.features import private_redis
from features import keys
from features.behavioural import refresh_behavioural
from features.fold import MemoryStore
from features.store import (
    ALWAYS_EMIT,
    COVIS_KEEP,
    Context,
    FeatureStore,
    UpdatePolicy,
    UserUpdate,
)
from features.user_state import Vector, vector_from_bytes

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
DATASETS = ("amazon-gift-cards-2018", "otto-sample", "rees46-sample", "uci-online-retail")
DIM = keys.EMB_DIM
# The first events of each stream are enough: slices start anywhere in them.
EVENTS_PER_DATASET = 20_000


@dataclass(frozen=True)
class Shop:
    events: list[dict[str, Any]]
    category: dict[str, str]
    has_text: frozenset[str]

    def vector(self, item_id: str) -> Vector | None:
        if item_id not in self.has_text:
            return None
        seed = int.from_bytes(item_id.encode()[:8].ljust(8, b"\0"), "little")
        v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
        return v / np.float32(np.linalg.norm(v))


@cache
def shop(name: str) -> Shop:
    folder = DATA / name
    if not folder.is_dir():
        pytest.fail(f"the real datasets are missing: expected {folder}")
    with gzip.open(folder / "events.jsonl.gz", "rb") as fh:
        events = [orjson.loads(line) for line in itertools.islice(fh, EVENTS_PER_DATASET)]
    category: dict[str, str] = {}
    has_text: set[str] = set()
    with gzip.open(folder / "items.jsonl.gz", "rb") as fh:
        for line in fh:
            item = orjson.loads(line)
            if item.get("category"):
                category[str(item["item_id"])] = str(item["category"])
            if any(item.get(f) for f in ("title", "description", "category", "brand")):
                has_text.add(str(item["item_id"]))
    return Shop(events, category, frozenset(has_text))


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with private_redis() as url:
        yield url


@dataclass(frozen=True)
class Stream:
    name: str
    events: list[dict[str, Any]]
    batch_sizes: list[int]
    policy: UpdatePolicy
    covis_keep: int
    read_n: int


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    """A dataset, a slice of its real events with some redelivered, batch sizes, a policy,
    and how many neighbours are kept and read (small ones make caps and ties bite)."""
    name = draw(st.sampled_from(DATASETS))
    events = shop(name).events
    n = draw(st.integers(5, 400))
    start = draw(st.integers(0, len(events) - n))
    picked = events[start : start + n]
    # Redeliveries: an earlier event again, later in the stream (Kafka at least once).
    for _ in range(draw(st.integers(0, 5))):
        at = draw(st.integers(1, len(picked)))
        picked.insert(at, picked[draw(st.integers(0, at - 1))])
    sizes = []
    left = len(picked)
    while left:
        size = draw(st.integers(1, min(left, 64)))
        sizes.append(size)
        left -= size
    policy = UpdatePolicy(
        half_life_ms=draw(st.sampled_from([3_600_000.0, 7 * 86_400_000.0])),
        history_len=draw(st.sampled_from([5, 50])),
        ttl_s=3600,
        min_emit_interval_ms=draw(st.sampled_from([0, 30_000])),
        dedupe_window=draw(st.sampled_from([8, 128])),
        memory_len=draw(st.sampled_from([0, 3, 200])),
    )
    return Stream(
        name,
        picked,
        sizes,
        policy,
        covis_keep=draw(st.sampled_from([3, COVIS_KEEP])),
        read_n=draw(st.sampled_from([2, 20, 200])),
    )


def _update(e: dict[str, Any], vector: Vector | None) -> UserUpdate:
    return UserUpdate(
        event_id=str(e["event_id"]),
        user_id=str(e["user_id"]),
        type=str(e["type"]),
        ts=int(e["ts"]),
        item_id=None if e.get("item_id") is None else str(e["item_id"]),
        vector=vector,
        always_emit=e["type"] in ALWAYS_EMIT,
    )


async def _redis_dump(redis: Redis) -> dict[str, Any]:
    """Every event-derived key (users, co-visitation, co-purchase, popularity) in
    MemoryStore.dump form."""
    out: dict[str, Any] = {}
    async for raw in redis.scan_iter(count=10_000):
        key = raw.decode()
        kind = (await redis.type(key)).decode()
        if key.startswith("items:") or (key.startswith("{i:") and not key.endswith((":cv", ":cb"))):
            continue  # the catalogue: compared through the behavioural vectors
        if kind == "string":
            out[key] = await redis.get(key)
        elif kind == "hash":
            out[key] = {k.decode(): v.decode() for k, v in (await redis.hgetall(key)).items()}
        elif kind == "list":
            out[key] = [x.decode() for x in await redis.lrange(key, 0, -1)]
        elif kind == "zset":
            out[key] = {m.decode(): s for m, s in await redis.zrange(key, 0, -1, withscores=True)}
        else:
            raise AssertionError(f"unexpected {kind} key {key}")
    return out


def _same_context(a: Context, b: Context) -> None:
    assert a.trending == b.trending
    assert a.users.keys() == b.users.keys()
    for u, x in a.users.items():
        y = b.users[u]
        assert np.array_equal(x.embedding, y.embedding), u
        assert np.array_equal(x.query, y.query), u
        assert x.history == y.history, u
        assert x.covis == y.covis and x.covis_source == y.covis_source, u
        assert x.bought_with == y.bought_with, u
        assert x.bought_with_source == y.bought_with_source, u
        assert x.category_trending == y.category_trending, u
        # Strongest first on both, ties by member: the order is part of the contract.
        assert list(x.memory.items()) == list(y.memory.items()), u


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(streams())
def test_redis_and_memory_stores_hold_the_same_state(redis_url: str, stream: Stream) -> None:
    events, policy, n = stream.events, stream.policy, stream.read_n
    data = shop(stream.name)
    items = sorted({str(e["item_id"]) for e in events if e.get("item_id") is not None})
    textless = [i for i in items if i not in data.has_text]

    async def run() -> None:
        redis = Redis.from_url(redis_url)
        try:
            await redis.flushdb()
            # The catalogue hashes exist (a behavioural vector is only written for an item
            # in the catalogue); nothing else is in Redis.
            async with redis.pipeline(transaction=False) as pipe:
                for item in items:
                    pipe.hset(keys.item(item), "title", "")
                await pipe.execute()
            live = FeatureStore(redis, policy, category_of=data.category.get)
            memory = MemoryStore(policy, category_of=data.category.get)
            bemb: dict[str, Vector] = {}  # what the live worker's item index holds
            start = 0
            for size in stream.batch_sizes:
                batch = events[start : start + size]
                start += size
                got_live = await live.apply_events(
                    [_update(e, _vector(data, bemb, e)) for e in batch]
                )
                got_memory = memory.apply_events(
                    [_update(e, _vector(data, memory.behavioural, e)) for e in batch]
                )
                assert got_live == got_memory
                # Behavioural vectors move between batches, as the worker refreshes them.
                await refresh_behavioural(redis, textless, data.vector)
                memory.refresh_behavioural(textless, data.vector, lambda _: True)
                async with redis.pipeline(transaction=False) as pipe:
                    for item in textless:
                        pipe.hget(keys.item(item), "bemb")
                    stored = await pipe.execute()
                bemb = {
                    i: v
                    for i, raw in zip(textless, stored, strict=True)
                    if raw is not None
                    if (v := vector_from_bytes(raw)) is not None
                }
                assert bemb.keys() == memory.behavioural.keys()
                for item, vec in bemb.items():
                    assert np.array_equal(vec, memory.behavioural[item]), item
            assert await _redis_dump(redis) == memory.dump()
            last = {str(e["user_id"]): int(e["ts"]) for e in events}
            users = sorted(last)
            _same_context(
                await live.read_context(users, last, covis_per_item=n, trending_n=n),
                memory.read_context(users, last, covis_per_item=n, trending_n=n),
            )
        finally:
            await redis.aclose()

    # Both stores cap neighbour sets through features.store.signal_bumps.
    with mock.patch.object(features.store, "COVIS_KEEP", stream.covis_keep):
        asyncio.run(run())


def _vector(data: Shop, behavioural: dict[str, Vector], e: dict[str, Any]) -> Vector | None:
    """The vector the worker folds into the user: the item's text vector, else its
    behavioural one (``ItemIndex.vector``)."""
    item = e.get("item_id")
    if item is None:
        return None
    return data.vector(str(item)) if str(item) in data.has_text else behavioural.get(str(item))
