"""The feature store's write and read paths against a real redis-server."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from features import keys
from features.ann import TableIndex
from features.candidates import SOURCES
from features.catalog import upsert_items
from features.decay import COVIS_HALF_LIFE_MS, forward_weight
from features.item_index import ItemIndex
from features.item_table import ItemTable
from features.store import COVIS_KEEP, FeatureStore, UpdatePolicy, UserUpdate
from features.user_state import decayed_sum, normalise
from ranking.pipeline import candidates
from shoprec.events import CatalogItem, ShopEvent
from streams.recommend import RecommendPolicy, build_request

pytestmark = pytest.mark.integration

DIM = keys.EMB_DIM
HOUR = 3_600_000
POLICY = UpdatePolicy(half_life_ms=HOUR, history_len=5, ttl_s=3600, min_emit_interval_ms=60_000)


@pytest.fixture
def redis(private_redis_client: Redis) -> Redis:
    return private_redis_client  # a server of this module's own, not the stack's


@pytest.fixture
def redis_url(private_redis_url: str) -> str:
    return private_redis_url


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
    pair = forward_weight(t0 + 1000)
    assert await redis.zscore(keys.item_covis("x"), "y") == pytest.approx(pair)
    assert await redis.zscore(keys.item_covis("y"), "x") == pytest.approx(pair)
    assert await redis.zscore(keys.popularity_hour(t0 // HOUR), "y") == 3.0
    assert await redis.zscore(keys.popularity_day(t0 // (24 * HOUR)), "y") == 3.0
    ctx = await store.read_context(["u1"], {"u1": t0 + 1000})
    assert [h.item_id for h in ctx.users["u1"].history] == ["y", "x"]
    assert ctx.users["u1"].covis == pytest.approx({"x": 1.0, "y": 1.0})
    # the last hour's 3, plus the day's 3 spread over 24 hours
    assert ctx.trending["y"] == pytest.approx(3.0 + 3.0 / 24)


async def test_covisitation_fades_with_its_half_life(redis: Redis) -> None:
    store = FeatureStore(redis, POLICY)
    t0 = 1_700_000_000_000
    await store.apply_events([update("a", t0, "x", 1), update("b", t0 + 1000, "y", 2)])
    later = t0 + 1000 + int(COVIS_HALF_LIFE_MS)
    await store.apply_events([update("c", later, "x", 1, user="u2")])  # u2's only item: x
    ctx = await store.read_context(["u2"], {"u2": later})
    assert ctx.users["u2"].covis["y"] == pytest.approx(0.5)


async def test_a_new_user_gets_the_trending_items_of_the_category_they_touched(
    redis: Redis,
) -> None:
    categories = {"s1": "shoes", "s2": "shoes", "s3": "shoes", "b1": "books", "b2": "books"}
    store = FeatureStore(redis, POLICY, category_of=categories.get)
    t0 = 1_700_000_000_000
    crowd = [
        update(f"c{n}", t0 + n, item, None, user=f"crowd{n}")
        for n, item in enumerate(["b1", "b1", "b1", "b2", "b2", "s2", "s3", "s3"])
    ]
    await store.apply_events(crowd)
    await store.apply_events([update("new", t0 + 100, "s1", None, user="newbie")])
    ctx = await store.read_context(["newbie"], {"newbie": t0 + 100})
    newbie = ctx.users["newbie"]
    assert set(newbie.category_trending) == {"s1", "s2", "s3"}
    table = ItemTable(dim=DIM)  # every item for sale, none with text
    table.upsert(list(categories), np.zeros((5, DIM), np.float32), has_emb=[False] * 5)
    trigger = ShopEvent("new", "view", "newbie", t0 + 100, item_id="s1")
    policy = RecommendPolicy(top_k=10, n_candidates=10, history_len=50, complements=10)
    request = build_request([trigger], [newbie], ctx.trending, table, policy)
    got = candidates(request, table, TableIndex(table))
    # No taste or co-visitation yet: their share goes to the user's own category, best
    # seller first, before the whole shop's best sellers.
    assert table.id_of(got.items[0][got.items[0] >= 0]) == ["s3", "s2", "b1", "b2"]
    assert [SOURCES[s] for s in got.source[0][:4]] == [
        "category",
        "category",
        "trending",
        "trending",
    ]


async def test_user_keys_expire_when_idle(redis: Redis) -> None:
    store = FeatureStore(redis, POLICY)
    await store.apply_events([update("a", 1_700_000_000_000, "x", 1)])
    present = [k for k in keys.user_keys("u1") if await redis.exists(k)]
    # No search yet: no query key; the event's list is not confirmed published: pending.
    assert [k.rsplit(":", 1)[1] for k in present] == ["emb", "meta", "hist", "ev", "pend"]
    ttls = [await redis.ttl(k) for k in present]
    assert all(0 < t <= POLICY.ttl_s for t in ttls)


_examples = itertools.count()
lua_events = st.lists(
    st.tuples(
        st.integers(0, 30 * 86_400_000),
        st.sampled_from(["view", "click", "cart", "purchase"]),
        st.integers(0, 1000),
    ),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lua_events, st.data())
def test_lua_update_matches_the_decay_arithmetic_under_replays_and_reordering(
    redis_url: str, evs: list[tuple[int, str, int]], data: st.DataObject
) -> None:
    """The real script, fed any arrival order with any re-deliveries, equals the pure sum."""
    t0 = 1_700_000_000_000
    user = f"prop{next(_examples)}"
    ups = [
        update(f"e{n}", t0 + ts, f"i{n}", seed, etype, user)
        for n, (ts, etype, seed) in enumerate(evs)
    ]
    repeats = data.draw(st.lists(st.integers(0, len(ups) - 1), max_size=6))
    arrival = data.draw(st.permutations([*range(len(ups)), *repeats]))

    async def run() -> np.ndarray:
        client = Redis.from_url(redis_url)
        try:
            store = FeatureStore(client, POLICY)
            for i in arrival:  # one event per round trip: the worst interleaving
                await store.apply_events([ups[i]])
            return await store.user_embedding(user)
        finally:
            await client.aclose()

    got = asyncio.run(run())
    weights = {"view": 1.0, "click": 2.0, "cart": 3.0, "purchase": 4.0}
    expected, _ = decayed_sum([(u.ts, weights[u.type], u.vector) for u in ups], HOUR)  # type: ignore[misc]
    np.testing.assert_allclose(got, normalise(expected, DIM), atol=2e-5)
    assert float(np.linalg.norm(got)) == pytest.approx(1.0, abs=1e-5)


def unit(*xs: float) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[: len(xs)] = xs
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("ann_min_items", [10_000, 3], ids=["exact", "ivf"])
async def test_a_new_item_is_retrievable_at_the_next_refresh(
    redis: Redis, ann_min_items: int
) -> None:
    index = ItemIndex(redis, ann_min_items=ann_min_items)
    old = [CatalogItem(f"old{n}", title=f"old {n}") for n in range(8)]
    await upsert_items(redis, old, [unit(0, 1, n / 8) for n in range(8)])
    await index.refresh()
    assert index.nearest(unit(1, 0)[None, :], 1)[0][0][0] != "new"
    await upsert_items(redis, [CatalogItem("new", title="new")], [unit(1, 0.01)])
    await index.refresh()
    assert index.nearest(unit(1, 0)[None, :], 1)[0][0][0] == "new"
    await upsert_items(redis, [CatalogItem("new", title="new", in_stock=False)], [unit(1, 0.01)])
    await index.refresh()
    assert "new" not in [i for i, _ in index.nearest(unit(1, 0)[None, :], 9)[0]]


async def test_an_event_batch_never_waits_for_a_catalogue_refresh_in_progress(
    redis: Redis,
) -> None:
    """The catalogue agent refreshes after each write; an event batch arriving meanwhile
    serves what is loaded instead of queueing behind it (or applying the same log twice)."""
    index = ItemIndex(redis)
    items = [CatalogItem(f"i{n}", title=f"item {n}") for n in range(600)]
    await upsert_items(redis, items, [unit(1, n / 600) for n in range(600)])
    catalogue_refresh = asyncio.create_task(index.refresh())
    await asyncio.sleep(0)  # the refresh holds the index and is waiting on Redis
    assert await index.maybe_refresh(0.0) == 0
    assert await catalogue_refresh == 600
    assert len(index) == 600
    assert await index.maybe_refresh(0.0) == 0, "nothing new in the log"


async def test_a_shadow_index_never_writes_behavioural_embeddings(redis: Redis) -> None:
    """A replay's index reads the live catalogue; co-visitation from its shadow state
    must not become the live items' behavioural embeddings."""
    await upsert_items(
        redis, [CatalogItem("a", title="a"), CatalogItem("mute")], [unit(1, 0), None]
    )
    store = FeatureStore(redis, POLICY)
    t0 = 1_700_000_000_000
    await store.apply_events([update("1", t0, "a", None), update("2", t0 + 1, "mute", None)])
    shadow = ItemIndex(redis, write_behavioural=False)
    await shadow.maybe_refresh(0.0)
    assert await redis.hget(keys.item("mute"), "bemb") is None
    live = ItemIndex(redis)
    await live.maybe_refresh(0.0)
    assert await redis.hget(keys.item("mute"), "bemb") is not None


async def test_an_item_without_text_gets_a_behavioural_embedding(redis: Redis) -> None:
    index = ItemIndex(redis)
    await upsert_items(
        redis,
        [CatalogItem("a", title="a"), CatalogItem("b", title="b"), CatalogItem("mute")],
        [unit(1, 0), unit(0, 1), None],
    )
    await index.refresh()
    assert index.vector("mute") is None
    store = FeatureStore(redis, POLICY)
    t0 = 1_700_000_000_000
    await store.apply_events(
        [
            update("1", t0, "a", None),
            update("2", t0 + 1, "mute", None),
            update("3", t0, "b", None, user="u2"),
            update("4", t0 + 1, "mute", None, user="u2"),
            update("5", t0, "a", None, user="u3"),
            update("6", t0 + 1, "mute", None, user="u3"),
        ]
    )
    assert await index.refresh_behavioural() == 1
    await index.refresh()
    vec = index.vector("mute")
    assert vec is not None
    np.testing.assert_allclose(vec, normalise(2 * unit(1, 0) + unit(0, 1), DIM), atol=1e-5)
    assert "mute" in [i for i, _ in index.nearest(unit(1, 0.3)[None, :], 3)[0]]
    assert await index.refresh_behavioural() == 0  # unchanged: no rewrite, no log churn


def test_user_keys_share_one_hash_tag() -> None:
    """Redis Cluster hashes only the {tag}: one user's keys land in one slot, as Lua needs."""
    names = [
        f("u9")
        for f in (keys.user_emb, keys.user_meta, keys.user_hist, keys.user_events, keys.user_query)
    ]
    assert {n[: n.index("}") + 1] for n in names} == {"{u:u9}"}


async def test_a_user_who_only_searched_gets_the_trending_items_of_the_querys_category(
    redis: Redis,
) -> None:
    catalogue = [
        CatalogItem("s1", title="runner", category="shoes"),
        CatalogItem("s2", title="boot", category="shoes"),
        CatalogItem("b1", title="novel", category="books"),
    ]
    await upsert_items(redis, catalogue, [unit(1, 0.1), unit(1, 0.2), unit(0, 1)])
    index = ItemIndex(redis)
    await index.refresh()
    store = FeatureStore(
        redis, POLICY, category_of=index.category, query_categories=index.categories_near
    )
    t0 = 1_700_000_000_000
    await store.apply_events(
        [update(f"c{n}", t0 + n, i, None, user=f"c{n}") for n, i in enumerate(["s2", "s2", "b1"])]
    )
    search = UserUpdate("q", "searcher", "search", t0 + 10, None, unit(1, 0), True)
    await store.apply_events([search])
    ctx = await store.read_context(["searcher"], {"searcher": t0 + 10})
    assert ctx.users["searcher"].history == []
    assert list(ctx.users["searcher"].category_trending) == ["s2"]


async def test_a_replay_older_than_the_dedupe_window_is_refused_not_counted_twice(
    redis: Redis,
) -> None:
    policy = UpdatePolicy(
        half_life_ms=HOUR, history_len=5, ttl_s=3600, min_emit_interval_ms=0, dedupe_window=3
    )
    store = FeatureStore(redis, policy)
    t0 = 1_700_000_000_000
    ups = [update(f"e{n}", t0 + n * 1000, f"i{n}", n) for n in range(5)]
    await store.apply_events(ups)
    before = await store.user_embedding("u1")
    late_new = update("late", t0 + 3500, "i9", 9)  # late, but within the window: folded in
    again = await store.apply_events([ups[0], ups[1], late_new])
    assert [r.applied for r in again] == [False, False, True]
    assert await redis.zcard(keys.user_events("u1")) == 3
    expected, _ = decayed_sum([(u.ts, 2.0, u.vector) for u in [*ups, late_new]], HOUR)  # type: ignore[misc]
    got = await store.user_embedding("u1")
    np.testing.assert_allclose(got, normalise(expected, DIM), atol=1e-5)
    assert not np.allclose(got, before)


async def test_an_items_neighbours_are_capped_weakest_first(redis: Redis) -> None:
    store = FeatureStore(redis, POLICY)
    t0 = 1_700_000_000_000
    # A hub item seen right after COVIS_KEEP + 5 others, each by its own user, oldest first.
    n = COVIS_KEEP + 5
    for k in range(0, n, 50):
        batch = []
        for j in range(k, min(n, k + 50)):
            batch += [
                update(f"a{j}", t0 + j * 60_000, f"x{j}", None, user=f"v{j}"),
                update(f"b{j}", t0 + j * 60_000 + 1, "hub", None, user=f"v{j}"),
            ]
        await store.apply_events(batch)
    kept = await redis.zrange(keys.item_covis("hub"), 0, -1)
    assert len(kept) == COVIS_KEEP
    assert b"x0" not in kept and f"x{n - 1}".encode() in kept
