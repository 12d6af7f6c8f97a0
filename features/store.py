"""The async Redis layer of the feature store.

Two paths, kept apart so each batches into one round trip per micro-batch:

* the write path (:meth:`FeatureStore.apply_events`) runs the update script for
  every event of the batch in one pipeline, then (second pipeline, only for
  events that were not duplicates) bumps co-visitation and popularity;
* the read path (:meth:`FeatureStore.read_context`) fetches what the
  recommender needs for a set of users in one pipeline.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import cast

from redis.asyncio import Redis

from features import keys
from features.user_state import (
    EVENT_WEIGHTS,
    HistoryEntry,
    Vector,
    decode_history,
    decode_history_entry,
    normalise,
    vector_from_bytes,
    vector_to_bytes,
)

HOUR_MS = 3_600_000
POPULARITY_TTL_S = 2 * 86_400
COVIS_TTL_S = 30 * 86_400
# Co-visitation pairs an event with this many of the user's previous items.
COVIS_SPAN = 5
# Two purchases further apart than this are not "bought together".
COVIS_WINDOW_MS = 24 * HOUR_MS


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


@dataclass(frozen=True, slots=True)
class UpdateResult:
    applied: bool  # False: the event id was seen before, nothing changed
    emit: bool  # the per-user rate limit allows a recommendation now
    recent: list[HistoryEntry]  # the user's latest items before this event


@dataclass(frozen=True, slots=True)
class UpdatePolicy:
    half_life_ms: float
    history_len: int
    ttl_s: int
    min_emit_interval_ms: int
    dedupe_window: int = 1000


@dataclass(slots=True)
class UserContext:
    """What the recommender reads for one user."""

    embedding: Vector
    query: Vector
    history: list[HistoryEntry]
    covis: dict[str, float] = field(default_factory=dict)  # neighbour -> count
    covis_source: dict[str, str] = field(default_factory=dict)  # neighbour -> history item


@dataclass(slots=True)
class Context:
    users: dict[str, UserContext]
    trending: dict[str, float]  # item -> events in the recent hours


def _load_script() -> str:
    return resources.files("features").joinpath("update_user.lua").read_text()


class FeatureStore:
    """User state, co-visitation and popularity over one Redis connection pool."""

    def __init__(self, redis: Redis, policy: UpdatePolicy, dim: int = keys.EMB_DIM) -> None:
        self._redis = redis
        self._policy = policy
        self._dim = dim
        self._update = redis.register_script(_load_script())

    async def apply_events(self, updates: Sequence[UserUpdate]) -> list[UpdateResult]:
        """Fold a batch of events into user state; idempotent per event id."""
        if not updates:
            return []
        p = self._policy
        async with self._redis.pipeline(transaction=False) as pipe:
            for u in updates:
                await self._update(
                    keys=[
                        keys.user_emb(u.user_id),
                        keys.user_meta(u.user_id),
                        keys.user_hist(u.user_id),
                        keys.user_events(u.user_id),
                        keys.user_query(u.user_id),
                    ],
                    args=[
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
                    ],
                    client=pipe,
                )
            raw = await pipe.execute()
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

    async def _record_signals(
        self, updates: Sequence[UserUpdate], results: Sequence[UpdateResult]
    ) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            touched: set[str] = set()
            for u, r in zip(updates, results, strict=True):
                if not r.applied or u.item_id is None:
                    continue
                hour_key = keys.popularity_hour(u.ts // HOUR_MS)
                pipe.zincrby(hour_key, EVENT_WEIGHTS[u.type], u.item_id)
                touched.add(hour_key)
                for other in _covisited(u, r.recent):
                    pipe.zincrby(keys.item_covis(u.item_id), 1.0, other)
                    pipe.zincrby(keys.item_covis(other), 1.0, u.item_id)
                    touched.update((keys.item_covis(u.item_id), keys.item_covis(other)))
            for key in touched:
                ttl = POPULARITY_TTL_S if key.startswith("pop:") else COVIS_TTL_S
                pipe.expire(key, ttl)
            if touched:
                await pipe.execute()

    async def read_context(
        self,
        user_ids: Iterable[str],
        trigger_ts: dict[str, int],
        covis_per_item: int = 20,
        trending_n: int = 50,
    ) -> Context:
        """Everything the recommender needs for these users, in two round trips."""
        users = list(dict.fromkeys(user_ids))
        hours = sorted({ts // HOUR_MS for ts in trigger_ts.values()})
        hour_keys = sorted({keys.popularity_hour(h - d) for h in hours for d in (0, 1)})
        async with self._redis.pipeline(transaction=False) as pipe:
            for u in users:
                pipe.get(keys.user_emb(u))
                pipe.get(keys.user_query(u))
                pipe.lrange(keys.user_hist(u), 0, self._policy.history_len - 1)
            for hk in hour_keys:
                pipe.zrevrange(hk, 0, trending_n - 1, withscores=True)
            raw = await pipe.execute()
        contexts: dict[str, UserContext] = {}
        for i, u in enumerate(users):
            emb, query, hist = raw[3 * i : 3 * i + 3]
            contexts[u] = UserContext(
                embedding=normalise(vector_from_bytes(emb), self._dim),
                query=normalise(vector_from_bytes(query), self._dim),
                history=decode_history(hist),
            )
        trending: dict[str, float] = {}
        for rows in raw[3 * len(users) :]:
            for member, score in rows:
                item = member.decode()
                trending[item] = trending.get(item, 0.0) + float(score)
        await self._read_covis(contexts, covis_per_item)
        return Context(users=contexts, trending=trending)

    async def _read_covis(self, contexts: dict[str, UserContext], per_item: int) -> None:
        sources = {u: _distinct_items(c.history, 3) for u, c in contexts.items()}
        wanted = sorted({i for items in sources.values() for i in items})
        if not wanted:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for item in wanted:
                pipe.zrevrange(keys.item_covis(item), 0, per_item - 1, withscores=True)
            rows = dict(zip(wanted, await pipe.execute(), strict=True))
        for u, ctx in contexts.items():
            for src in sources[u]:
                for member, score in rows[src]:
                    item = member.decode()
                    ctx.covis[item] = ctx.covis.get(item, 0.0) + float(score)
                    ctx.covis_source.setdefault(item, src)

    async def user_embedding(self, user_id: str) -> Vector:
        """The normalised rolling embedding of one user (zeros when unknown)."""
        raw = cast(bytes | None, await self._redis.get(keys.user_emb(user_id)))
        return normalise(vector_from_bytes(raw), self._dim)


def _covisited(update: UserUpdate, recent: Sequence[HistoryEntry]) -> list[str]:
    """Items the user touched shortly before this one (excluding itself), at most COVIS_SPAN."""
    out: list[str] = []
    for h in recent:
        near = abs(update.ts - h.ts) <= COVIS_WINDOW_MS
        if near and h.item_id != update.item_id and h.item_id not in out:
            out.append(h.item_id)
        if len(out) >= COVIS_SPAN:
            break
    return out


def _distinct_items(history: Sequence[HistoryEntry], n: int) -> list[str]:
    out: list[str] = []
    for h in history:
        if h.item_id not in out:
            out.append(h.item_id)
            if len(out) == n:
                break
    return out
