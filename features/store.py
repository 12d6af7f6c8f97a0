"""The async Redis layer of the feature store.

Two paths, kept apart so each batches a whole micro-batch into two round trips:

* the write path (:meth:`FeatureStore.apply_events`) runs the update script for
  every event of the batch in one pipeline, then (second pipeline, only for
  events that were not duplicates) sums the co-visitation and popularity
  increments per key and writes each key with one ``bump_counts.lua`` call;
* the read path (:meth:`FeatureStore.read_context`) fetches what the
  recommender needs for a set of users in two pipelines: user state and
  global popularity first, then what depends on it (co-visitation of the
  user's latest items, popularity within their categories).

Co-visitation is forward-decayed (``features.decay``); popularity is kept in
hour and day buckets, overall and per category, read as trailing windows.
An item's category comes from the injected ``category_of`` (the worker's item
index), so no Redis read sits between an event and its counters; a user who
has only searched gets the categories of the items nearest their query
(``query_categories``), so cold start works from a query as from a click.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, cast

from redis.asyncio import Redis

from features import keys
from features.connection import ScriptCall, ScriptRunner
from features.decay import (
    COVIS_HALF_LIFE_MS,
    DAY_MS,
    HOUR_MS,
    MEMORY_HALF_LIFE_MS,
    decayed_value,
    forward_weight,
    sliding_window,
    window_buckets,
)
from features.user_state import (
    HistoryEntry,
    Vector,
    decode_history,
    decode_history_entry,
    normalise,
    vector_from_bytes,
    vector_to_bytes,
)
from shoprec.events import EVENT_WEIGHTS, ShopEvent
from shoprec.settings import Settings

HOUR_BUCKET_TTL_S = 2 * 86_400
DAY_BUCKET_TTL_S = 3 * 86_400
COVIS_TTL_S = 30 * 86_400
# Neighbours kept per item: reads take the top 20-40; popular items would otherwise
# collect every item ever bought beside them.
COVIS_KEEP = 200
# How many of a user's latest distinct items feed co-visitation and category trending.
COVIS_SOURCES = 3
CATEGORY_SOURCES = 2
# Co-visitation pairs an event with this many of the user's previous items.
COVIS_SPAN = 5
# Two events further apart than this are not "seen together".
COVIS_WINDOW_MS = 24 * HOUR_MS
# Two purchases of one customer this far apart are still "bought together" (a phone, then
# its case a week later): bench/after_purchase.py measured complements over 30 days.
COPURCHASE_WINDOW_MS = 30 * DAY_MS
# How many items of the basket just bought have their co-purchases read after a purchase.
BASKET_SOURCES = 5
# Purchases and searches change what a user wants right now: always answer them.
ALWAYS_EMIT = frozenset({"purchase", "search"})


@dataclass(frozen=True, slots=True)
class UserUpdate:
    """What the update script needs for one event."""

    event_id: str
    user_id: str
    type: str
    ts: int
    item_id: str | None
    vector: Vector | None  # item or query embedding; None when the item has no text
    always_emit: bool

    @classmethod
    def of(cls, event: ShopEvent, vector: Vector | None) -> UserUpdate:
        """The update a validated event makes, with the vector it adds to its user."""
        return cls(
            event.event_id,
            event.user_id,
            event.type,
            event.ts,
            event.item_id,
            vector,
            event.type in ALWAYS_EMIT,
        )


@dataclass(frozen=True, slots=True)
class UpdateResult:
    applied: bool  # False: the event id was seen before, nothing changed
    # The per-user rate limit allows a recommendation now; for a duplicate, True means it
    # is the user's pending trigger, whose recommendation was never confirmed published.
    emit: bool
    recent: list[HistoryEntry]  # the user's latest items before this event


@dataclass(frozen=True, slots=True)
class UpdatePolicy:
    half_life_ms: float
    history_len: int
    ttl_s: int
    min_emit_interval_ms: int
    # 128 ids keep the set in Redis's compact listpack encoding (zset-max-listpack-entries):
    # measured on UCI, 1,000 ids cost 10.2 kB of a user's 13.4 kB.  Kafka redelivers at most
    # the records since the last commit, far fewer than 128 events of one user.
    dedupe_window: int = 128
    memory_len: int = 0
    """Distinct items of the user's whole past kept (``keys.user_memory``); 0: none."""

    @classmethod
    def of(cls, settings: Settings) -> UpdatePolicy:
        """The policy under these settings: the worker's, and the replays' of
        ``rebuild-state``, ``simulate``, the learner and ``train --from-topics``."""
        return cls(
            half_life_ms=settings.embedding_half_life_s * 1000.0,
            history_len=settings.history_len,
            memory_len=settings.memory_len,
            ttl_s=settings.user_ttl_s,
            min_emit_interval_ms=settings.min_emit_interval_ms,
        )


@dataclass(slots=True)
class UserContext:
    """What the recommender reads for one user."""

    embedding: Vector
    query: Vector
    history: list[HistoryEntry]
    covis: dict[str, float] = field(default_factory=dict)  # neighbour -> decayed count
    covis_source: dict[str, str] = field(default_factory=dict)  # neighbour -> history item
    # After a purchase only: items bought together with the basket (co-purchase).
    bought_with: dict[str, float] = field(default_factory=dict)  # item -> decayed count
    bought_with_source: dict[str, str] = field(default_factory=dict)  # item -> basket item
    # Trending within the categories of the user's latest items (cold start by category).
    category_trending: dict[str, float] = field(default_factory=dict)
    # The items of the user's whole past (keys.user_memory), strongest first: item -> count
    # of the user's events on it, decayed to the trigger (memory_at).
    memory: dict[str, float] = field(default_factory=dict)


def memory_at(rows: Iterable[tuple[str, float]], ts_ms: int) -> dict[str, float]:
    """A user's memory as read (``ZREVRANGE ... WITHSCORES``: forward-decayed sums, strongest
    first) as counts decayed to ``ts_ms``."""
    scale = decayed_value(1.0, ts_ms, MEMORY_HALF_LIFE_MS)
    return {item: score * scale for item, score in rows}


@dataclass(frozen=True, slots=True)
class Popularity:
    """Weighted event counts over the trailing hour and day."""

    hour: dict[str, float]
    day: dict[str, float]

    def trending(self) -> dict[str, float]:
        """The last hour, plus the day's hourly average so quiet hours still rank something."""
        out = {i: s / 24.0 for i, s in self.day.items()}
        for i, s in self.hour.items():
            out[i] = out.get(i, 0.0) + s
        return out


@dataclass(slots=True)
class Context:
    users: dict[str, UserContext]
    trending: dict[str, float]  # item -> Popularity.trending()


# Clears a user's pending trigger once its recommendation is acknowledged by the broker,
# unless a newer trigger has replaced it meanwhile.
_CONFIRM_PUBLISHED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _load_script(name: str = "update_user.lua") -> str:
    return resources.files("features").joinpath(name).read_text()


class FeatureStore:
    """User state, co-visitation and popularity over one Redis connection pool."""

    def __init__(
        self,
        redis: Redis,
        policy: UpdatePolicy,
        dim: int = keys.EMB_DIM,
        category_of: Callable[[str], str | None] = lambda _: None,
        query_categories: Callable[[Vector], list[str]] = lambda _: [],
    ) -> None:
        self._redis = redis
        self._policy = policy
        self._dim = dim
        self._category_of = category_of
        self._query_categories = query_categories
        self._update = redis.register_script(_load_script())
        self._bump = redis.register_script(_load_script("bump_counts.lua"))
        self._confirm = redis.register_script(_CONFIRM_PUBLISHED)
        # One round trip per batch; on a Redis Cluster one per primary (features.connection).
        self._scripts = ScriptRunner(redis)

    async def apply_events(self, updates: Sequence[UserUpdate]) -> list[UpdateResult]:
        """Fold a batch of events into user state; idempotent per event id."""
        if not updates:
            return []
        p = self._policy
        raw = await self._scripts.run(
            [
                (
                    self._update,
                    [
                        keys.user_emb(u.user_id),
                        keys.user_meta(u.user_id),
                        keys.user_hist(u.user_id),
                        keys.user_events(u.user_id),
                        keys.user_query(u.user_id),
                        keys.user_pending(u.user_id),
                        keys.user_memory(u.user_id),
                    ],
                    [
                        u.event_id,
                        u.ts,
                        u.type,
                        u.item_id or "",
                        EVENT_WEIGHTS[u.type],
                        p.half_life_ms,
                        p.history_len,
                        p.ttl_s,
                        b"" if u.vector is None else vector_to_bytes(u.vector),
                        p.min_emit_interval_ms,
                        1 if u.always_emit else 0,
                        p.dedupe_window,
                        p.memory_len,
                        repr(forward_weight(u.ts, MEMORY_HALF_LIFE_MS)),
                    ],
                )
                for u in updates
            ]
        )
        results = [
            UpdateResult(
                applied=bool(r[0]),
                emit=bool(r[1]),
                recent=[decode_history_entry(x) for x in r[2:]],
            )
            for r in raw
        ]
        await self._record_signals(updates, results)
        return results

    async def confirm_published(self, triggers: Iterable[tuple[str, str]]) -> int:
        """Mark these ``(user_id, event_id)`` triggers' recommendations as published, so a
        redelivery of the event is a plain duplicate again; returns how many were pending."""
        pairs = list(triggers)
        if not pairs:
            return 0
        cleared = await self._scripts.run(
            [
                (self._confirm, [keys.user_pending(user_id)], [event_id])
                for user_id, event_id in pairs
            ]
        )
        return sum(int(c) for c in cleared)

    async def _record_signals(
        self, updates: Sequence[UserUpdate], results: Sequence[UpdateResult]
    ) -> None:
        """Popularity and co-visitation of the applied events: one script call per key.

        Increments are summed per (key, member) over the batch first (:func:`signal_bumps`,
        which the in-memory store applies too); a batch touches far fewer keys than it has
        increments (measured on UCI: 10 ZINCRBY and 5 EXPIRE per event, which cost more
        client and server time than the user update itself).
        """
        bumps = signal_bumps(updates, results, self._category_of)
        if not bumps:
            return
        calls: list[ScriptCall] = []
        for key, bump in bumps.items():
            args: list[str | float] = [bump.ttl_s, bump.keep]
            for member, by in bump.members.items():
                args += [member, repr(by)]
            calls.append((self._bump, [key], args))
        await self._scripts.run(calls)

    async def read_context(
        self,
        user_ids: Iterable[str],
        trigger_ts: dict[str, int],
        covis_per_item: int = 20,
        trending_n: int = 50,
    ) -> Context:
        """Everything the recommender needs for these users, in two round trips.

        The reads are Redis's; what is made of them is :func:`plan_neighbourhood` and
        :func:`fill_neighbourhood`, which the in-memory store (``features.fold``) shares.
        """
        users = list(dict.fromkeys(user_ids))
        now = max(trigger_ts.values(), default=0)
        memory_len = self._policy.memory_len
        per_user = 4 if memory_len else 3
        async with self._redis.pipeline(transaction=False) as pipe:
            for u in users:
                pipe.get(keys.user_emb(u))
                pipe.get(keys.user_query(u))
                pipe.lrange(keys.user_hist(u), 0, self._policy.history_len - 1)
                if memory_len:
                    pipe.zrevrange(keys.user_memory(u), 0, memory_len - 1, withscores=True)
            weights = queue_popularity_reads(pipe, now, None, trending_n)
            raw = await pipe.execute()
        contexts: dict[str, UserContext] = {}
        for i, u in enumerate(users):
            emb, query, hist = raw[per_user * i : per_user * i + 3]
            mem = raw[per_user * i + 3] if memory_len else []
            contexts[u] = UserContext(
                embedding=normalise(vector_from_bytes(emb), self._dim),
                query=normalise(vector_from_bytes(query), self._dim),
                history=decode_history(hist),
                memory=memory_at(((m.decode(), s) for m, s in mem), trigger_ts.get(u, now)),
            )
        trending = popularity_from_replies(raw[per_user * len(users) :], weights).trending()
        await self._read_neighbourhood(contexts, trigger_ts, now, covis_per_item, trending_n)
        return Context(users=contexts, trending=trending)

    async def popularity(self, now_ms: int, category: str | None = None, n: int = 50) -> Popularity:
        """The top ``n`` items of the trailing hour and day, overall or within one category."""
        async with self._redis.pipeline(transaction=False) as pipe:
            weights = queue_popularity_reads(pipe, now_ms, category, n)
            raw = await pipe.execute()
        return popularity_from_replies(raw, weights)

    async def context_for(
        self,
        contexts: dict[str, UserContext],
        now_ms: int,
        covis_per_item: int = 20,
        trending_n: int = 50,
    ) -> Context:
        """:meth:`read_context` for shoppers whose state is given, not read (the pull API's
        similar items: a shopper whose only history is one item): the shop's trending,
        the co-visitation of their items and the trending in their categories."""
        trending = (await self.popularity(now_ms, None, trending_n)).trending()
        at = dict.fromkeys(contexts, now_ms)
        await self._read_neighbourhood(contexts, at, now_ms, covis_per_item, trending_n)
        return Context(users=contexts, trending=trending)

    async def _read_neighbourhood(
        self,
        contexts: dict[str, UserContext],
        trigger_ts: dict[str, int],
        now: int,
        per_item: int,
        trending_n: int,
    ) -> None:
        """Co-visitation of each user's latest items and trending in their categories."""
        plan = plan_neighbourhood(contexts, self._category_of, self._query_categories)
        if not plan.items and not plan.categories:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for item in plan.items:
                pipe.zrevrange(keys.item_covis(item), 0, per_item - 1, withscores=True)
            for item in plan.bought:
                pipe.zrevrange(keys.item_cobought(item), 0, per_item - 1, withscores=True)
            cat_weights = [
                queue_popularity_reads(pipe, now, c, trending_n) for c in plan.categories
            ]
            raw = await pipe.execute()
        n, m = len(plan.items), len(plan.bought)
        rows = {item: _decoded(r) for item, r in zip(plan.items, raw[:n], strict=True)}
        bought = {item: _decoded(r) for item, r in zip(plan.bought, raw[n : n + m], strict=True)}
        n += m
        per_cat = 4  # replies per popularity read: hour now, hour before, day now, day before
        cat_pop = {
            c: popularity_from_replies(raw[n + per_cat * k : n + per_cat * (k + 1)], w).trending()
            for k, (c, w) in enumerate(zip(plan.categories, cat_weights, strict=True))
        }
        fill_neighbourhood(contexts, plan, rows, cat_pop, trigger_ts, now, bought)

    async def user_embedding(self, user_id: str) -> Vector:
        """The normalised rolling embedding of one user (zeros when unknown)."""
        raw = cast(bytes | None, await self._redis.get(keys.user_emb(user_id)))
        return normalise(vector_from_bytes(raw), self._dim)


def covisited(item_id: str, ts: int, recent: Sequence[HistoryEntry]) -> list[str]:
    """The items an event on ``item_id`` at ``ts`` pairs with for co-visitation: those of
    the user's ``recent`` history (newest first) within ``COVIS_WINDOW_MS``, distinct, not
    the item itself, at most ``COVIS_SPAN``.  The live store and the rebuild's fold
    (``features/fold.py``) both pair with this."""
    out: list[str] = []
    for h in recent:
        if h.item_id != item_id and abs(ts - h.ts) <= COVIS_WINDOW_MS and h.item_id not in out:
            out.append(h.item_id)
            if len(out) >= COVIS_SPAN:
                break
    return out


def copurchased(item_id: str, ts: int, recent: Sequence[HistoryEntry]) -> list[str]:
    """The items a purchase of ``item_id`` at ``ts`` pairs with for co-purchase: the
    user's purchases among ``recent`` (newest first) within ``COPURCHASE_WINDOW_MS``,
    distinct, not the item itself, at most ``COVIS_SPAN``.

    ``recent`` is the update script's short history (the latest five events of any type),
    so a browsing shop pairs a purchase with the same basket and the purchases just before
    it; a shop whose stream is purchases only (amazon, UCI) pairs with the last five.
    """
    out: list[str] = []
    for h in recent:
        if (
            h.type == "purchase"
            and h.item_id != item_id
            and abs(ts - h.ts) <= COPURCHASE_WINDOW_MS
            and h.item_id not in out
        ):
            out.append(h.item_id)
            if len(out) >= COVIS_SPAN:
                break
    return out


def just_bought(history: Sequence[HistoryEntry]) -> list[str]:
    """The basket of a user whose newest event is a purchase (the distinct items bought at
    its timestamp, at most ``BASKET_SOURCES``); empty for any other newest event."""
    if not history or history[0].type != "purchase":
        return []
    at = history[0].ts
    return _distinct_items(
        [h for h in history if h.type == "purchase" and h.ts == at], BASKET_SOURCES
    )


def _distinct_items(history: Sequence[HistoryEntry], n: int) -> list[str]:
    out: list[str] = []
    for h in history:
        if h.item_id not in out:
            out.append(h.item_id)
            if len(out) == n:
                break
    return out


def popularity_keys(ts: int, category: str | None) -> list[tuple[str, int]]:
    """The popularity buckets one event counts in, with their TTLs."""
    hour, day = ts // HOUR_MS, ts // DAY_MS
    out = [
        (keys.popularity_hour(hour), HOUR_BUCKET_TTL_S),
        (keys.popularity_day(day), DAY_BUCKET_TTL_S),
    ]
    if category:
        out += [
            (keys.popularity_hour(hour, category), HOUR_BUCKET_TTL_S),
            (keys.popularity_day(day, category), DAY_BUCKET_TTL_S),
        ]
    return out


def popularity_read_keys(
    now_ms: int, category: str | None
) -> tuple[list[str], tuple[float, float]]:
    """The bucket keys a trailing hour and day are read from (hour now, hour before, day now,
    day before) and the weights of the two previous buckets."""
    h, h_prev, wh = window_buckets(now_ms, HOUR_MS)
    d, d_prev, wd = window_buckets(now_ms, DAY_MS)
    names = [
        keys.popularity_hour(h, category),
        keys.popularity_hour(h_prev, category),
        keys.popularity_day(d, category),
        keys.popularity_day(d_prev, category),
    ]
    return names, (wh, wd)


def queue_popularity_reads(
    pipe: Any, now_ms: int, category: str | None, n: int
) -> tuple[float, float]:
    """Queue the trailing hour and day bucket reads; returns the previous buckets' weights."""
    names, weights = popularity_read_keys(now_ms, category)
    for key in names:
        pipe.zrevrange(key, 0, n - 1, withscores=True)
    return weights


Row = Sequence[tuple[str, float]]
"""A sorted set's top members, best first: what ``ZREVRANGE ... WITHSCORES`` answers."""


def _decoded(raw: Sequence[tuple[bytes, float]]) -> list[tuple[str, float]]:
    return [(m.decode(), float(s)) for m, s in raw]


def popularity_from_replies(raw: Sequence[Any], weights: tuple[float, float]) -> Popularity:
    """The four bucket reads of :func:`popularity_read_keys` (Redis replies, bytes members,
    or an in-memory store's rows) as one :class:`Popularity`."""

    def rows(r: Any) -> list[tuple[str, float]]:
        return [(m.decode() if isinstance(m, bytes) else m, float(s)) for m, s in r]

    return Popularity(
        hour=sliding_window(rows(raw[0]), rows(raw[1]), weights[0]),
        day=sliding_window(rows(raw[2]), rows(raw[3]), weights[1]),
    )


# --- what both stores share: counter increments and the neighbourhood read -------------------


@dataclass(frozen=True, slots=True)
class Bump:
    """Increments of one sorted set from one batch, and how it is kept."""

    ttl_s: int
    keep: int  # members kept, highest scores first (0 = all)
    members: dict[str, float]


def signal_bumps(
    updates: Sequence[UserUpdate],
    results: Sequence[UpdateResult],
    category_of: Callable[[str], str | None],
) -> dict[str, Bump]:
    """The popularity, co-visitation and co-purchase increments of a batch's applied events,
    summed per key and member (in first-seen order: both stores add them in this order, so
    their floating-point sums agree to the bit)."""
    bumps: dict[str, Bump] = {}

    def bump(key: str, member: str, by: float, ttl_s: int, keep: int) -> None:
        b = bumps.get(key)
        if b is None:
            b = bumps[key] = Bump(ttl_s, keep, {})
        b.members[member] = b.members.get(member, 0.0) + by

    for u, r in zip(updates, results, strict=True):
        if not r.applied or u.item_id is None:
            continue
        weight = EVENT_WEIGHTS[u.type]
        for key, ttl in popularity_keys(u.ts, category_of(u.item_id)):
            bump(key, u.item_id, weight, ttl, 0)
        pair = forward_weight(u.ts)
        for other in covisited(u.item_id, u.ts, r.recent):
            bump(keys.item_covis(u.item_id), other, pair, COVIS_TTL_S, COVIS_KEEP)
            bump(keys.item_covis(other), u.item_id, pair, COVIS_TTL_S, COVIS_KEEP)
        if u.type == "purchase":
            for other in copurchased(u.item_id, u.ts, r.recent):
                bump(keys.item_cobought(u.item_id), other, pair, COVIS_TTL_S, COVIS_KEEP)
                bump(keys.item_cobought(other), u.item_id, pair, COVIS_TTL_S, COVIS_KEEP)
    return bumps


@dataclass(frozen=True, slots=True)
class NeighbourhoodPlan:
    """What the second read of :meth:`FeatureStore.read_context` fetches."""

    sources: dict[str, list[str]]  # user -> their latest distinct items (co-visitation)
    categories_of: dict[str, list[str]]  # user -> categories whose trending they get
    items: list[str]  # every source item (one co-visitation read each)
    categories: list[str]  # every category (one popularity read each)
    baskets: dict[str, list[str]]  # user -> the items just bought (empty unless a purchase)
    bought: list[str]  # every basket item (one co-purchase read each)


def plan_neighbourhood(
    contexts: dict[str, UserContext],
    category_of: Callable[[str], str | None],
    query_categories: Callable[[Vector], list[str]],
) -> NeighbourhoodPlan:
    sources = {u: _distinct_items(c.history, COVIS_SOURCES) for u, c in contexts.items()}
    cats = {
        u: _categories(items[:CATEGORY_SOURCES], category_of)
        # A user who has only searched: the category their query points at most.
        or (query_categories(contexts[u].query)[:1] if not items else [])
        for u, items in sources.items()
    }
    baskets = {u: just_bought(c.history) for u, c in contexts.items()}
    return NeighbourhoodPlan(
        sources,
        cats,
        sorted({i for items in sources.values() for i in items}),
        sorted({c for cs in cats.values() for c in cs}),
        baskets,
        sorted({i for items in baskets.values() for i in items}),
    )


def fill_neighbourhood(
    contexts: dict[str, UserContext],
    plan: NeighbourhoodPlan,
    rows: Mapping[str, Row],
    category_trending: Mapping[str, dict[str, float]],
    trigger_ts: dict[str, int],
    now: int,
    bought_rows: Mapping[str, Row],
) -> None:
    """Each user's co-visitation and co-purchase (decayed to their trigger time) and category
    trending, from the planned reads: ``rows`` (co-visitation) and ``bought_rows``
    (co-purchase) per source item, ``category_trending`` per category."""
    for u, ctx in contexts.items():
        at = trigger_ts.get(u, now)
        _add_decayed(plan.sources[u], rows, at, ctx.covis, ctx.covis_source)
        _add_decayed(plan.baskets[u], bought_rows, at, ctx.bought_with, ctx.bought_with_source)
        for c in plan.categories_of[u]:
            for item, score in category_trending[c].items():
                ctx.category_trending[item] = ctx.category_trending.get(item, 0.0) + score


def _add_decayed(
    sources: Sequence[str],
    rows: Mapping[str, Row],
    at: int,
    into: dict[str, float],
    source_of: dict[str, str],
) -> None:
    scale = decayed_value(1.0, at, COVIS_HALF_LIFE_MS)  # one factor per read: forward decay
    for src in sources:
        for item, score in rows[src]:
            into[item] = into.get(item, 0.0) + float(score) * scale
            source_of.setdefault(item, src)


def _categories(item_ids: Sequence[str], category_of: Callable[[str], str | None]) -> list[str]:
    out: list[str] = []
    for item in item_ids:
        c = category_of(item)
        if c and c not in out:
            out.append(c)
    return out
