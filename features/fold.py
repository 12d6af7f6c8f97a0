"""The user-state update of ``features/update_user.lua``, folded in Python for a whole history.

Why a second implementation: the script costs Redis about 200 µs per event
(unpacking, decaying and packing 384 floats in Lua) and the co-visitation and
popularity writes about ten ``ZINCRBY`` more (measured on uci-online-retail:
396,337 events took 283 s through the script, 1,400 events/s, with Redis the
bottleneck).  Rebuilding from history does not need per-event atomicity: each
user's events are folded here in arrival order, exactly as the script would
(dedupe window, decayed sum rounded to float32 after every event, capped
history, flood-control timestamp), counters are summed per key and member,
and the final state is written with a few commands per key.

Keeping the two in step is the job of ``shoprec rebuild-state``'s verification
(:func:`ops.rebuild.compare_state`) and of the integration test that
compares a folded state with one the worker built event by event.
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import hiredis
import numpy as np
import numpy.typing as npt
from redis.asyncio import Redis

from features import keys
from features.decay import DAY_MS, HOUR_MS, forward_weight
from features.store import (
    ALWAYS_EMIT,
    COVIS_KEEP,
    COVIS_TTL_S,
    UpdatePolicy,
    covisited,
    popularity_keys,
)
from features.user_state import (
    HistoryEntry,
    Vector,
    encode_history_entry,
    vector_to_bytes,
)
from shoprec.events import EVENT_WEIGHTS, ShopEvent

F32 = np.float32
RECENT = 5  # the script returns this many history entries for co-visitation


@dataclass(slots=True)
class UserFold:
    """One user's state as the script would leave it."""

    ref_ts: int = -1
    n: int = 0
    last_emit_ts: int = -1
    emb: npt.NDArray[np.float32] | None = None
    query: bytes | None = None
    history: deque[HistoryEntry] = field(default_factory=deque)  # newest first
    seen: dict[str, int] = field(default_factory=dict)  # event id -> ts (dedupe window)
    heap: list[tuple[int, str]] = field(default_factory=list)  # the window, oldest on top


@dataclass(slots=True)
class Folded:
    users: dict[str, UserFold] = field(default_factory=dict)
    counters: dict[str, dict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    ttls: dict[str, int] = field(default_factory=dict)
    applied: int = 0
    duplicates: int = 0


class StateFolder:
    """Folds events (already validated, in arrival order per user) into :class:`Folded`."""

    def __init__(
        self,
        policy: UpdatePolicy,
        vector_of: Callable[[str], Vector | None],
        category_of: Callable[[str], str | None],
    ) -> None:
        self._p = policy
        self._vector_of = vector_of
        self._category_of = category_of
        self._vectors: dict[str, npt.NDArray[np.float64] | None] = {}
        self._pop_keys: dict[tuple[int, int, str | None], list[tuple[str, int]]] = {}
        self._covis_keys: dict[str, str] = {}
        self._pair_weights: dict[int, float] = {}
        self.out = Folded()

    def _item_vector(self, item_id: str) -> npt.NDArray[np.float64] | None:
        if item_id not in self._vectors:
            vec = self._vector_of(item_id)
            self._vectors[item_id] = None if vec is None else vec.astype(np.float64)
        return self._vectors[item_id]

    def fold(self, events: Iterable[ShopEvent], queries: dict[str, Vector]) -> None:
        """``queries``: event id -> the query embedding of a search (BERT, computed once)."""
        users = self.out.users
        for e in events:
            u = users.get(e.user_id)
            if u is None:
                u = users[e.user_id] = UserFold(history=deque(maxlen=self._p.history_len))
            if e.event_id in u.seen:
                self.out.duplicates += 1
                continue
            self._remember(u, e)
            if e.type == "search":
                q = queries.get(e.event_id)
                vec = None if q is None else q.astype(np.float64)
            else:
                vec = None if e.item_id is None else self._item_vector(e.item_id)
            recent = list(islice(u.history, RECENT)) if e.item_id is not None else []
            self._apply(u, e, vec)
            self.out.applied += 1
            if e.item_id is not None:
                self._count(e, recent)

    def _remember(self, u: UserFold, e: ShopEvent) -> None:
        # ZADD NX then ZREMRANGEBYRANK 0 -(window+1): keep the newest ids by (ts, id).
        u.seen[e.event_id] = e.ts
        heapq.heappush(u.heap, (e.ts, e.event_id))
        if len(u.heap) > self._p.dedupe_window:
            _, old = heapq.heappop(u.heap)
            del u.seen[old]

    def _apply(self, u: UserFold, e: ShopEvent, vec: npt.NDArray[np.float64] | None) -> None:
        weight, half_life = EVENT_WEIGHTS[e.type], self._p.half_life_ms
        if vec is not None:
            if u.emb is not None and u.ref_ts >= 0:
                cur = u.emb.astype(np.float64)
                if e.ts >= u.ref_ts:
                    out = cur * 2.0 ** (-(e.ts - u.ref_ts) / half_life) + vec * weight
                else:
                    out = cur + vec * (weight * 2.0 ** (-(u.ref_ts - e.ts) / half_life))
            else:
                out = vec * weight
            u.emb = out.astype(F32)
            if e.type == "search":
                u.query = vector_to_bytes(vec.astype(F32))
        u.ref_ts = max(u.ref_ts, e.ts)
        u.n += 1
        if e.item_id is not None:
            u.history.appendleft(HistoryEntry(e.item_id, e.type, e.ts))
        last = u.last_emit_ts
        if e.type in ALWAYS_EMIT or last < 0 or e.ts - last >= self._p.min_emit_interval_ms:
            u.last_emit_ts = max(last, e.ts)

    def _popularity_keys(self, ts: int, category: str | None) -> list[tuple[str, int]]:
        # Many events share an hour and a category: build their key names once.
        slot = (ts // HOUR_MS, ts // DAY_MS, category)
        found = self._pop_keys.get(slot)
        if found is None:
            found = self._pop_keys[slot] = popularity_keys(ts, category)
        return found

    def _covis_key(self, item_id: str) -> str:
        key = self._covis_keys.get(item_id)
        if key is None:
            key = self._covis_keys[item_id] = keys.item_covis(item_id)
        return key

    def _count(self, e: ShopEvent, recent: list[HistoryEntry]) -> None:
        item = e.item_id
        if item is None:
            return
        counters, ttls = self.out.counters, self.out.ttls
        weight = EVENT_WEIGHTS[e.type]
        for key, ttl in self._popularity_keys(e.ts, self._category_of(item)):
            counters[key][item] += weight
            ttls[key] = ttl
        others = covisited(item, e.ts, recent)
        if not others:
            return
        pair = self._pair_weights.get(e.ts)
        if pair is None:
            pair = self._pair_weights[e.ts] = forward_weight(e.ts)
        mine = self._covis_key(item)
        ttls[mine] = COVIS_TTL_S
        a = counters[mine]
        for other in others:
            theirs = self._covis_key(other)
            a[other] += pair
            counters[theirs][item] += pair
            ttls[theirs] = COVIS_TTL_S


async def write_folded(redis: Redis, folded: Folded, ttl_s: int, per_round: int = 20_000) -> int:
    """Write a fold's final state (under the current ``keys.STATE_PREFIX``); returns commands.

    The target holds no state for these keys (``rebuild-state`` checks), so a counter is
    written whole with one ``ZADD`` rather than replayed increment by increment.  Commands
    are packed by hiredis in C: redis-py's pure-Python packer, not Redis, was the slowest
    part of writing millions of co-visitation members.
    """
    commands: list[tuple[Any, ...]] = []
    for user_id, u in folded.users.items():
        commands += _user_commands(user_id, u, ttl_s)
    for key, members in folded.counters.items():
        flat: list[Any] = []
        if folded.ttls[key] == COVIS_TTL_S and len(members) > COVIS_KEEP:
            # The worker trims each neighbour set to its strongest COVIS_KEEP after every
            # batch; trimming once at the end keeps the same members unless one was trimmed
            # live and came back later (then live holds it with a smaller score).
            members = dict(heapq.nlargest(COVIS_KEEP, members.items(), key=lambda kv: kv[1]))
        for member, score in members.items():
            flat += (score, member)
        commands.append(("ZADD", key, *flat))
        commands.append(("EXPIRE", key, folded.ttls[key]))
    for start in range(0, len(commands), per_round):
        await _send(redis, commands[start : start + per_round])
    return len(commands)


async def _send(redis: Redis, commands: Sequence[tuple[Any, ...]]) -> None:
    """One round trip for many commands; the first error reply is raised."""
    payload = b"".join(hiredis.pack_command(c) for c in commands)
    conn = await redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.send_packed_command(payload)
        replies = [await conn.read_response(disable_decoding=True) for _ in commands]
    finally:
        await redis.connection_pool.release(conn)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


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
        out.append(("SET", keys.user_query(user_id), u.query, "EX", ttl_s))
    return out
