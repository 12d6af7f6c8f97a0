"""The feature state in process memory: the Redis store's keys, updates and reads, without Redis.

One feature implementation, two stores:

* :class:`features.store.FeatureStore` keeps the state in Redis for the live worker
  (``update_user.lua`` per event, ``bump_counts.lua`` per counter key);
* :class:`MemoryStore` (here) keeps the same state in dictionaries, under the same key
  names, for what replays history: the training replay (``ranking.data``), evaluation and
  ``shoprec rebuild-state`` (which writes a fold's final state to Redis, :func:`write_folded`).

What can be shared is shared, one home each: which events pair for co-visitation
(:func:`~features.store.covisited`), the counter increments of a batch and their caps
(:func:`~features.store.signal_bumps`), the popularity buckets written and read, the
neighbourhood read (:func:`~features.store.plan_neighbourhood`,
:func:`~features.store.fill_neighbourhood`), the embedding arithmetic
(:func:`~features.user_state.embedding_step`), behavioural item vectors
(:func:`~features.behavioural.changed_vector`).  What cannot be shared is the per-user
update itself, Lua inside Redis and :meth:`MemoryStore._apply_one` here: the property test
in ``tests/integration/test_feature_stores_agree.py`` feeds both the same random slices of the
real event streams and requires the same state, key by key (vectors to the float32 bit).

Why a store in memory at all: the script costs Redis about 200 µs per event (unpacking,
decaying and packing 384 floats in Lua) plus the counter writes; measured on
uci-online-retail, 396,337 events took 283 s through the script (1,400 events/s), and a
training replay also reads the state after every basket.  Here a batch costs Python
dictionary operations and one 384-float update per event.

Not modelled: key TTLs.  Redis expires keys by wall-clock time; a replay of history is not
live time, and neither store expires anything during one.
"""

from __future__ import annotations

import heapq
import operator
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from redis.asyncio import Redis

from features import keys
from features.behavioural import NEIGHBOURS, changed_vector
from features.connection import send_commands
from features.decay import MEMORY_HALF_LIFE_MS, forward_weight
from features.store import (
    COVIS_KEEP,
    COVIS_TTL_S,
    Context,
    Popularity,
    UpdatePolicy,
    UpdateResult,
    UserContext,
    UserUpdate,
    fill_neighbourhood,
    memory_at,
    plan_neighbourhood,
    popularity_from_replies,
    popularity_read_keys,
    signal_bumps,
)
from features.user_state import (
    HistoryEntry,
    Vector,
    by_event_time,
    embedding_step,
    encode_history_entry,
    normalise,
    vector_to_bytes,
)
from shoprec.events import EVENT_WEIGHTS, ShopEvent

F32 = np.float32
_BY_SCORE_THEN_MEMBER = operator.itemgetter(1, 0)
"""A sorted set's order for ``(member, score)`` pairs: by score, ties by member (what the
lambda would say, at C speed: the replay sorts co-visitation rows millions of times)."""
RECENT = 5  # the script returns this many history entries (LRANGE 0 4) for co-visitation


@dataclass(slots=True)
class UserFold:
    """One user's keys as the update script leaves them."""

    ref_ts: int = -1
    n: int = 0
    last_emit_ts: int = -1
    emb: npt.NDArray[np.float32] | None = None
    query: npt.NDArray[np.float32] | None = None
    history: deque[HistoryEntry] = field(default_factory=deque)  # newest arrival first
    seen: dict[str, int] = field(default_factory=dict)  # event id -> ts (dedupe window)
    heap: list[tuple[int, str]] = field(default_factory=list)  # the window, oldest on top
    pending: str | None = None  # the latest trigger not confirmed published
    memory: dict[str, float] = field(default_factory=dict)  # item -> forward-decayed count


class MemoryStore:
    """:class:`~features.store.FeatureStore`'s state and operations, in this process."""

    def __init__(
        self,
        policy: UpdatePolicy,
        category_of: Callable[[str], str | None] = lambda _: None,
        query_categories: Callable[[Vector], list[str]] = lambda _: [],
        dim: int = keys.EMB_DIM,
    ) -> None:
        self.policy = policy
        self._category_of = category_of
        self._query_categories = query_categories
        self._dim = dim
        self.users: dict[str, UserFold] = {}
        self.counters: dict[str, dict[str, float]] = {}
        """Sorted sets by key name (co-visitation, popularity): member -> score."""
        self.ttls: dict[str, int] = {}
        self.behavioural: dict[str, Vector] = {}
        """``bemb`` of the item hashes: behavioural vectors of items without text."""
        self.applied = 0
        self.duplicates = 0

    # --- the write path ------------------------------------------------------------------

    def apply_events(self, updates: Sequence[UserUpdate]) -> list[UpdateResult]:
        """:meth:`FeatureStore.apply_events <features.store.FeatureStore.apply_events>`:
        each event in order, then the batch's counter increments, then the caps."""
        results = [self._apply_one(u) for u in updates]
        for key, bump in signal_bumps(updates, results, self._category_of).items():
            row = self.counters.get(key)
            if row is None:
                row = self.counters[key] = {}
            for member, by in bump.members.items():
                row[member] = row.get(member, 0.0) + by
            self.ttls[key] = bump.ttl_s
            if bump.keep and len(row) > bump.keep:
                # ZREMRANGEBYRANK 0 -(keep+1): the lowest by (score, member) go.
                for member, _ in heapq.nsmallest(
                    len(row) - bump.keep, row.items(), key=_BY_SCORE_THEN_MEMBER
                ):
                    del row[member]
        return results

    def _apply_one(self, u: UserUpdate) -> UpdateResult:
        """update_user.lua, step by step (see the script for why each step is there)."""
        p = self.policy
        user = self.users.get(u.user_id)
        if user is None:
            user = self.users[u.user_id] = UserFold(history=deque(maxlen=p.history_len))
        # Dedupe: a seen id, or one older than a full window, changes nothing.
        if u.event_id in user.seen:
            self.duplicates += 1
            return UpdateResult(False, user.pending == u.event_id, [])
        if len(user.heap) >= p.dedupe_window and u.ts < user.heap[0][0]:
            self.duplicates += 1
            return UpdateResult(False, False, [])
        user.seen[u.event_id] = u.ts
        heapq.heappush(user.heap, (u.ts, u.event_id))
        while len(user.heap) > p.dedupe_window:
            _, old = heapq.heappop(user.heap)
            del user.seen[old]
        recent = [user.history[i] for i in range(min(RECENT, len(user.history)))]
        if u.vector is not None:
            vec = u.vector.astype(np.float64)
            total = None if user.emb is None else user.emb.astype(np.float64)
            weight = EVENT_WEIGHTS[u.type]
            user.emb = embedding_step(total, user.ref_ts, u.ts, weight, vec, p.half_life_ms).astype(
                F32
            )
            if u.type == "search":
                user.query = u.vector.astype(F32)
        user.ref_ts = max(user.ref_ts, u.ts)
        user.n += 1
        if u.item_id is not None:
            user.history.appendleft(HistoryEntry(u.item_id, u.type, u.ts))
            if p.memory_len:
                mem = user.memory
                mem[u.item_id] = mem.get(u.item_id, 0.0) + forward_weight(u.ts, MEMORY_HALF_LIFE_MS)
                if len(mem) > p.memory_len:  # ZREMRANGEBYRANK: the lowest (score, member)
                    del mem[min(mem.items(), key=_BY_SCORE_THEN_MEMBER)[0]]
        emit = False
        last = user.last_emit_ts
        if u.always_emit or last < 0 or u.ts - last >= p.min_emit_interval_ms:
            emit = True
            if u.ts > last:
                user.last_emit_ts = u.ts
            user.pending = u.event_id
        self.applied += 1
        return UpdateResult(True, emit, recent)

    def confirm_published(self, triggers: Iterable[tuple[str, str]]) -> int:
        """Clear these ``(user, event id)`` pending triggers (compare-and-delete)."""
        cleared = 0
        for user_id, event_id in triggers:
            user = self.users.get(user_id)
            if user is not None and user.pending == event_id:
                user.pending = None
                cleared += 1
        return cleared

    # --- the read path --------------------------------------------------------------------

    def top(self, key: str, n: int) -> list[tuple[str, float]]:
        """``ZREVRANGE key 0 n-1 WITHSCORES``: highest scores first, ties by member, highest
        first (str order is UTF-8 byte order, as Redis compares members)."""
        row = self.counters.get(key)
        if not row:
            return []
        return heapq.nlargest(n, row.items(), key=_BY_SCORE_THEN_MEMBER)

    def popularity(self, now_ms: int, category: str | None = None, n: int = 50) -> Popularity:
        names, weights = popularity_read_keys(now_ms, category)
        return popularity_from_replies([self.top(k, n) for k in names], weights)

    def user_context(self, user_id: str, ts_ms: int) -> UserContext:
        """A user's embedding, query, history and memory (decayed to ``ts_ms``), as the
        first read of ``read_context``."""
        user = self.users.get(user_id)
        if user is None:
            zeros = np.zeros(self._dim, F32)
            return UserContext(embedding=zeros, query=zeros.copy(), history=[])
        strongest = heapq.nlargest(
            self.policy.memory_len, user.memory.items(), key=_BY_SCORE_THEN_MEMBER
        )
        return UserContext(
            embedding=normalise(user.emb, self._dim),
            query=normalise(user.query, self._dim),
            history=by_event_time(list(user.history)),
            memory=memory_at(strongest, ts_ms),
        )

    def read_context(
        self,
        user_ids: Iterable[str],
        trigger_ts: dict[str, int],
        covis_per_item: int = 20,
        trending_n: int = 50,
    ) -> Context:
        """:meth:`FeatureStore.read_context <features.store.FeatureStore.read_context>`."""
        return self.read_contexts(user_ids, trigger_ts, (covis_per_item,), trending_n)[0]

    def read_contexts(
        self,
        user_ids: Iterable[str],
        trigger_ts: dict[str, int],
        covis_per_item: Sequence[int],
        trending_n: int = 50,
    ) -> list[Context]:
        """:meth:`read_context` once per co-visitation width, the state read once (the
        training replay wants the worker's 20 neighbours and the baseline's 200)."""
        users = list(dict.fromkeys(user_ids))
        now = max(trigger_ts.values(), default=0)
        trending = self.popularity(now, None, trending_n).trending()
        base = {u: self.user_context(u, trigger_ts.get(u, now)) for u in users}
        plan = plan_neighbourhood(base, self._category_of, self._query_categories)
        widest = max(covis_per_item)
        rows = {item: self.top(keys.item_covis(item), widest) for item in plan.items}
        bought = {item: self.top(keys.item_cobought(item), widest) for item in plan.bought}
        cat_pop = {c: self.popularity(now, c, trending_n).trending() for c in plan.categories}
        out = []
        for width in covis_per_item:
            contexts = {
                u: UserContext(c.embedding, c.query, c.history, memory=c.memory)
                for u, c in base.items()
            }
            cut = {item: row[:width] for item, row in rows.items()}
            cut_bought = {item: row[:width] for item, row in bought.items()}
            fill_neighbourhood(contexts, plan, cut, cat_pop, trigger_ts, now, cut_bought)
            out.append(Context(users=contexts, trending=trending))
        return out

    # --- behavioural item vectors -------------------------------------------------------

    def refresh_behavioural(
        self,
        item_ids: Sequence[str],
        text_vector: Callable[[str], Vector | None],
        exists: Callable[[str], bool],
        neighbours: int = NEIGHBOURS,
    ) -> int:
        """:func:`features.behavioural.refresh_behavioural` on this store: recompute the
        behavioural vectors of ``item_ids`` (those in the catalogue); returns how many changed."""
        changed = 0
        for item_id in item_ids:
            if not exists(item_id):
                continue
            rows = self.top(keys.item_covis(item_id), neighbours)
            vec = changed_vector(rows, self.behavioural.get(item_id), text_vector)
            if vec is not None:
                self.behavioural[item_id] = vec
                changed += 1
        return changed

    # --- comparing with Redis -----------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """Every key this store holds, as a Redis dump of the same state reads back: strings
        as bytes, hashes as ``{field: str}``, lists as ``[str]``, sorted sets as
        ``{member: score}`` (the property test compares the two)."""
        out: dict[str, Any] = {}
        for user_id, u in self.users.items():
            meta = {"ref_ts": str(u.ref_ts), "n": str(u.n)}
            if u.last_emit_ts >= 0:
                meta["last_emit_ts"] = str(u.last_emit_ts)
            out[keys.user_meta(user_id)] = meta
            out[keys.user_events(user_id)] = {e: float(ts) for e, ts in u.seen.items()}
            if u.history:
                out[keys.user_hist(user_id)] = [encode_history_entry(h) for h in u.history]
            if u.emb is not None:
                out[keys.user_emb(user_id)] = vector_to_bytes(u.emb)
            if u.query is not None:
                out[keys.user_query(user_id)] = vector_to_bytes(u.query)
            if u.pending is not None:
                out[keys.user_pending(user_id)] = u.pending.encode()
            if u.memory:
                out[keys.user_memory(user_id)] = dict(u.memory)
        for key, row in self.counters.items():
            out[key] = dict(row)
        return out


class StateFolder:
    """Folds validated events (in arrival order per user) into a :class:`MemoryStore`, for
    ``shoprec rebuild-state``: each item's vector is looked up once."""

    def __init__(
        self,
        policy: UpdatePolicy,
        vector_of: Callable[[str], Vector | None],
        category_of: Callable[[str], str | None],
    ) -> None:
        self._vector_of = vector_of
        self._vectors: dict[str, Vector | None] = {}
        self.out = MemoryStore(policy, category_of)

    def _item_vector(self, item_id: str) -> Vector | None:
        if item_id not in self._vectors:
            self._vectors[item_id] = self._vector_of(item_id)
        return self._vectors[item_id]

    def fold(self, events: Iterable[ShopEvent], queries: dict[str, Vector]) -> None:
        """``queries``: event id -> the query embedding of a search (BERT, computed once)."""
        updates = [
            UserUpdate.of(
                e,
                queries.get(e.event_id)
                if e.type == "search"
                else (None if e.item_id is None else self._item_vector(e.item_id)),
            )
            for e in events
        ]
        self.out.apply_events(updates)


async def write_folded(
    redis: Redis, folded: MemoryStore, ttl_s: int, per_round: int = 20_000
) -> int:
    """Write a fold's final state (under the current ``keys.STATE_PREFIX``); returns commands.

    The target holds no state for these keys (``rebuild-state`` checks), so a counter is
    written whole with one ``ZADD`` rather than replayed increment by increment.  Commands
    are packed by hiredis in C: redis-py's pure-Python packer, not Redis, was the slowest
    part of writing millions of co-visitation members.  Pending triggers are not written:
    rebuilt history has nothing left to publish.
    """
    commands: list[tuple[Any, ...]] = []
    for user_id, u in folded.users.items():
        commands += _user_commands(user_id, u, ttl_s)
    for key, members in folded.counters.items():
        flat: list[Any] = []
        if folded.ttls[key] == COVIS_TTL_S and len(members) > COVIS_KEEP:
            members = dict(heapq.nlargest(COVIS_KEEP, members.items(), key=lambda kv: kv[1]))
        for member, score in members.items():
            flat += (score, member)
        commands.append(("ZADD", key, *flat))
        commands.append(("EXPIRE", key, folded.ttls[key]))
    for start in range(0, len(commands), per_round):
        await _send(redis, commands[start : start + per_round])
    return len(commands)


async def _send(redis: Redis, commands: Sequence[tuple[Any, ...]]) -> None:
    """One round trip for many commands (one per node on a Redis Cluster); the first
    error reply is raised."""
    await send_commands(redis, commands)


def _user_commands(user_id: str, u: UserFold, ttl_s: int) -> list[tuple[Any, ...]]:
    meta, hist, ev = keys.user_meta(user_id), keys.user_hist(user_id), keys.user_events(user_id)
    fields: list[Any] = ["ref_ts", u.ref_ts, "n", u.n]
    if u.last_emit_ts >= 0:
        fields += ["last_emit_ts", u.last_emit_ts]
    ids: list[Any] = []
    for event_id, ts in u.seen.items():
        ids += (ts, event_id)
    out: list[tuple[Any, ...]] = [
        ("HSET", meta, *fields),
        ("EXPIRE", meta, ttl_s),
        ("ZADD", ev, *ids),
        ("EXPIRE", ev, ttl_s),
    ]
    if u.history:
        out += [("RPUSH", hist, *map(encode_history_entry, u.history)), ("EXPIRE", hist, ttl_s)]
    if u.emb is not None:
        out.append(("SET", keys.user_emb(user_id), vector_to_bytes(u.emb), "EX", ttl_s))
    if u.query is not None:
        out.append(("SET", keys.user_query(user_id), vector_to_bytes(u.query), "EX", ttl_s))
    if u.memory:
        flat: list[Any] = []
        for item, score in u.memory.items():
            flat += (score, item)
        mem = keys.user_memory(user_id)
        out += [("ZADD", mem, *flat), ("EXPIRE", mem, ttl_s)]
    return out
