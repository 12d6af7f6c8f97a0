"""Attribution: which list a click, cart or purchase came from, and each user's arm.

Two scripts, both on one user's keys only (their hash tag ``{u:<id>}``, one Redis Cluster
slot), each called once per user per micro-batch in one pipeline (``ScriptRunner``: one
round trip, one per primary on a cluster):

* ``attribute.lua`` (:meth:`AttributionStore.observe`), after the batch is in user state:
  the user's arm (the stored one, or the proposed one for a user new to the experiment)
  and, for each click, cart or purchase, the list it is credited to: the most recently
  shown list of this experiment, shown within the window before the event, that holds the
  item; the position of the item in it; whether it is the list's first such outcome.
  Exactly once per event id (its own dedupe set, so an event whose state was written by a
  worker that died before attributing it is still credited when it is redelivered).
* ``show_lists.lua`` (:meth:`AttributionStore.show`), when the batch's lists are made:
  remembers them (id, arm, trigger time, items), once per list id and arm.

Per user, ``{u:<id>}:xp`` holds what the report needs: ``exp``, ``arm``, ``buys`` and
``spend`` (every purchase, credited or not: the holdout's baseline), and per arm
``<arm>:lists``, ``<arm>:<outcome>`` (credited events), ``<arm>:<outcome>_lists`` (lists
with at least one), ``<arm>:revenue``.  The report reads these (:meth:`AttributionStore.users`),
so its counts are exactly what the scripts credited.

An experiment's counters per arm (``exp:<name>:totals``, no user ids) are bumped from the
scripts' answers with single-key commands, joined to the next batch's pipeline; the bandit
reads them.  A worker that dies between a script and that bump loses the bump (the per-user
records keep the credit): good enough to steer traffic, not to report from.

:class:`MemoryAttribution` is the same in dictionaries, for the offline simulation; the
integration test ``test_attribution_store.py`` holds the two equal on real events.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol, cast

import orjson
from redis.asyncio import Redis

from features import keys
from features.connection import ScriptCall, ScriptRunner
from features.forget import parse_user_key
from shoprec.experiments import Outcome

EXPERIMENT_TTL_S = 90 * 86_400
"""How long an experiment's counters and allocations outlive its last update."""
LISTS_KEPT = 100
RECORDS_KEPT = 100
DEDUPE_WINDOW = 128  # as the update script's: more than Kafka redelivers of one user
ALLOCATIONS_KEPT = 10_000

_TOTALS = """
for i = 2, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""
# First writer wins: every worker asks for the same period's allocation and uses the one
# stored first, so all of them assign new users alike.
_ALLOCATE = """
local have = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1])
if #have > 0 then
  return have[1]
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[3]) + 1))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return ARGV[2]
"""


@dataclass(frozen=True, slots=True)
class Attributable:
    """An event that can be credited to a list."""

    event_id: str
    outcome: Outcome
    item_id: str
    ts: int
    revenue: float = 0.0


@dataclass(frozen=True, slots=True)
class ShownList:
    """A list as attribution keeps it: its id, arm, the trigger's event time, its items."""

    list_id: str
    experiment: str
    arm: str
    ts: int
    items: tuple[str, ...]
    shadow: bool = False

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.list_id,
                "x": self.experiment,
                "arm": self.arm,
                "ts": self.ts,
                "sh": int(self.shadow),
                "items": list(self.items),
            }
        )


@dataclass(frozen=True, slots=True)
class Credit:
    """One event credited to one list."""

    event: Attributable
    arm: str
    list_id: str
    position: int  # 1 = the list's first item
    first: bool  # the list's first credit of this outcome
    shadow: bool


@dataclass(slots=True)
class Observed:
    """One user's answer from :meth:`AttributionStore.observe`."""

    arm: str
    new: bool
    fresh: list[Attributable] = field(default_factory=list)  # counted now (not duplicates)
    credits: list[Credit] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AttributionPolicy:
    experiment: str
    live_arms: tuple[str, ...]
    window_ms: int
    ttl_s: int
    dedupe_window: int = DEDUPE_WINDOW
    records_kept: int = RECORDS_KEPT
    lists_kept: int = LISTS_KEPT


def totals_delta(
    observed: Mapping[str, Observed], shown: Iterable[ShownList]
) -> defaultdict[str, float]:
    """What a batch adds to the experiment's counters: ``<arm>:users`` (assigned now),
    ``<arm>:lists`` (recorded now), ``<arm>:<outcome>``, ``<arm>:<outcome>_lists`` (lists
    with a first such credit) and ``<arm>:revenue``; ``<arm>:buys`` and ``<arm>:spend`` (every
    purchase, by the buyer's arm)."""
    out: defaultdict[str, float] = defaultdict(float)
    for o in observed.values():
        if o.new:
            out[f"{o.arm}:users"] += 1
        for e in o.fresh:
            if e.outcome == "purchase":
                out[f"{o.arm}:buys"] += 1
                out[f"{o.arm}:spend"] += e.revenue
        for c in o.credits:
            out[f"{c.arm}:{c.event.outcome}"] += 1
            if c.first:
                out[f"{c.arm}:{c.event.outcome}_lists"] += 1
            if c.event.outcome == "purchase":
                out[f"{c.arm}:revenue"] += c.event.revenue
    for s in shown:
        out[f"{s.arm}:lists"] += 1
    return out


def _load(name: str) -> str:
    return resources.files("features").joinpath(name).read_text()


def _live(arms: Sequence[str]) -> str:
    return "|" + "|".join(arms) + "|"


def _decode_observed(raw: bytes | str, events: Sequence[Attributable]) -> Observed:
    doc = orjson.loads(raw)
    # cjson writes an empty table as {}: no events counted, nothing credited.
    fresh = [events[int(k)] for k in doc["fresh"] or []]
    credits = [
        Credit(events[int(k)], str(arm), str(lid), int(pos), bool(first), bool(sh))
        for k, arm, lid, pos, first, sh in doc["credits"] or []
    ]
    return Observed(str(doc["arm"]), bool(doc["new"]), fresh, credits)


class Attribution(Protocol):
    """What the experiment runner needs of attribution: :class:`AttributionStore` (Redis,
    live) or :class:`MemoryAttribution` (the offline simulation)."""

    policy: AttributionPolicy

    async def observe(
        self, users: Mapping[str, tuple[str, Sequence[Attributable]]]
    ) -> dict[str, Observed]: ...

    async def show(self, lists: Mapping[str, Sequence[ShownList]]) -> list[ShownList]: ...

    def count(self, delta: Mapping[str, float]) -> None: ...

    async def totals(self) -> dict[str, float]: ...

    async def allocation(self, period: int, proposal: bytes) -> bytes: ...

    async def flush(self) -> None: ...


class AttributionStore:
    """The attribution scripts, the experiment's counters and the bandit's allocations."""

    def __init__(self, redis: Redis, policy: AttributionPolicy) -> None:
        self._redis = redis
        self.policy = policy
        self._attribute = redis.register_script(_load("attribute.lua"))
        self._show = redis.register_script(_load("show_lists.lua"))
        self._totals = redis.register_script(_TOTALS)
        self._allocate = redis.register_script(_ALLOCATE)
        self._scripts = ScriptRunner(redis)
        self._pending: defaultdict[str, float] = defaultdict(float)

    def count(self, delta: Mapping[str, float]) -> None:
        """Add to the experiment's counters with the next pipeline this store sends."""
        for name, by in delta.items():
            self._pending[name] += by

    def _with_totals(
        self, calls: list[ScriptCall]
    ) -> tuple[list[ScriptCall], defaultdict[str, float]]:
        pending, self._pending = self._pending, defaultdict(float)
        if pending:
            args: list[object] = [EXPERIMENT_TTL_S]
            for name, by in sorted(pending.items()):
                args += [name, repr(float(by))]
            calls = [*calls, (self._totals, [keys.experiment_totals(self.policy.experiment)], args)]
        return calls, pending

    async def _run(self, calls: list[ScriptCall]) -> list[Any]:
        sent, pending = self._with_totals(calls)
        try:
            replies = await self._scripts.run(sent)
        except BaseException:
            self.count(pending)  # not sent: the next pipeline carries them
            raise
        return replies[: len(calls)]

    async def observe(
        self, users: Mapping[str, tuple[str, Sequence[Attributable]]]
    ) -> dict[str, Observed]:
        """Each user's arm, and credit for their events: ``users`` maps a user id to the arm
        they would get if new and their attributable events of the batch (in order)."""
        p = self.policy
        live = _live(p.live_arms)
        order = list(users)
        calls: list[ScriptCall] = []
        for user in order:
            proposed, events = users[user]
            args: list[object] = [
                p.experiment,
                proposed,
                live,
                p.window_ms,
                p.ttl_s,
                p.dedupe_window,
                p.records_kept,
                orjson.dumps([[e.event_id, e.outcome, e.item_id, e.ts, e.revenue] for e in events]),
            ]
            calls.append(
                (
                    self._attribute,
                    [
                        keys.user_experiment(user),
                        keys.user_lists(user),
                        keys.user_attributed(user),
                        keys.user_attributions(user),
                    ],
                    args,
                )
            )
        replies = await self._run(calls)
        return {
            user: _decode_observed(raw, users[user][1])
            for user, raw in zip(order, replies, strict=True)
        }

    async def show(self, lists: Mapping[str, Sequence[ShownList]]) -> list[ShownList]:
        """Remember each user's lists; returns those recorded now (not seen before)."""
        p = self.policy
        order = [u for u in lists if lists[u]]
        calls: list[ScriptCall] = [
            (
                self._show,
                [keys.user_lists(user), keys.user_experiment(user)],
                [p.window_ms, p.ttl_s, p.lists_kept, *(s.to_json() for s in lists[user])],
            )
            for user in order
        ]
        replies = await self._run(calls)
        return [
            s
            for user, flags in zip(order, replies, strict=True)
            for s, new in zip(lists[user], flags, strict=True)
            if int(new)
        ]

    async def flush(self) -> None:
        """Send the counters still pending (a worker stopping)."""
        await self._run([])

    async def totals(self) -> dict[str, float]:
        """The experiment's counters: ``<arm>:<counter>`` -> value."""
        raw = await self._redis.hgetall(keys.experiment_totals(self.policy.experiment))
        return {_text(k): float(v) for k, v in cast(dict[bytes, bytes], raw).items()}

    async def allocation(self, period: int, proposal: bytes) -> bytes:
        """The bandit's allocation for ``period``: ``proposal`` if none was stored yet, else
        the one stored first (by any worker)."""
        raw = await self._allocate(
            keys=[keys.experiment_allocations(self.policy.experiment)],
            args=[period, proposal, ALLOCATIONS_KEPT, EXPERIMENT_TTL_S],
        )
        return cast(bytes, raw)


async def allocations(redis: Redis, experiment: str) -> list[dict[str, Any]]:
    """Every stored bandit allocation of ``experiment``, oldest first."""
    raw = await redis.zrange(keys.experiment_allocations(experiment), 0, -1)
    return [orjson.loads(r) for r in cast(list[bytes], raw)]


async def experiment_totals(redis: Redis, experiment: str) -> dict[str, float]:
    raw = await redis.hgetall(keys.experiment_totals(experiment))
    return {_text(k): float(v) for k, v in cast(dict[bytes, bytes], raw).items()}


async def user_records(
    redis: Redis, experiment: str, *, chunk: int = 1000
) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """Every user's ``{u:<id>}:xp`` record of ``experiment`` under the current state prefix,
    as (user id, record): one SCAN of the keyspace (every node of a cluster), then one
    pipeline of reads per ``chunk`` keys."""
    prefix = keys.STATE_PREFIX.get()
    pattern = f"{keys.glob_escape(prefix)}*{{u:*}}:xp"
    batch: list[tuple[str, bytes]] = []

    async def read(names: list[tuple[str, bytes]]) -> list[tuple[str, dict[str, str]]]:
        async with redis.pipeline(transaction=False) as pipe:
            for _, name in names:
                pipe.hgetall(name)
            rows = await pipe.execute()
        out = []
        for (user, _), row in zip(names, rows, strict=True):
            rec = {_text(k): _text(v) for k, v in cast(dict[bytes, bytes], row).items()}
            if rec.get("exp") == experiment:
                out.append((user, rec))
        return out

    async for name in redis.scan_iter(match=pattern, count=10_000):
        parsed = parse_user_key(cast(bytes, name))
        # Another prefix that starts like this one ("replay:" beside "") matches the glob.
        if parsed is None or parsed.prefix != prefix or parsed.suffix != "xp":
            continue
        batch.append((parsed.user, parsed.key))
        if len(batch) >= chunk:
            for found in await read(batch):
                yield found
            batch = []
    if batch:
        for found in await read(batch):
            yield found


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw


# --- the same, in memory (the offline simulation) ---------------------------------------------


@dataclass(slots=True)
class _UserMemory:
    record: dict[str, float | str] = field(default_factory=dict)
    lists: list[dict[str, Any]] = field(default_factory=list)  # newest first
    seen: dict[str, int] = field(default_factory=dict)


_FLAG = {"click": "c", "cart": "a", "purchase": "p"}


class MemoryAttribution:
    """:class:`AttributionStore` on dictionaries: ``attribute.lua`` and ``show_lists.lua``
    event for event, the counters and the allocations (no TTLs: a replay of history is not
    wall-clock time)."""

    def __init__(self, policy: AttributionPolicy) -> None:
        self.policy = policy
        self.users: dict[str, _UserMemory] = {}
        self.counters: defaultdict[str, float] = defaultdict(float)
        self.allocations: dict[int, bytes] = {}

    async def observe(
        self, users: Mapping[str, tuple[str, Sequence[Attributable]]]
    ) -> dict[str, Observed]:
        return {u: self._observe_one(u, *users[u]) for u in users}

    def count(self, delta: Mapping[str, float]) -> None:
        for name, by in delta.items():
            self.counters[name] += by

    async def totals(self) -> dict[str, float]:
        return dict(self.counters)

    async def allocation(self, period: int, proposal: bytes) -> bytes:
        return self.allocations.setdefault(period, proposal)

    async def flush(self) -> None:
        return None

    def _observe_one(self, user: str, proposed: str, events: Sequence[Attributable]) -> Observed:
        p = self.policy
        m = self.users.setdefault(user, _UserMemory())
        rec = m.record
        if rec.get("exp") != p.experiment:
            rec.clear()
            rec["exp"] = p.experiment
        arm = rec.get("arm")
        new = not isinstance(arm, str) or arm not in p.live_arms
        if new:
            arm = rec["arm"] = proposed
        out = Observed(str(arm), new)
        for e in events:
            seen = e.event_id in m.seen
            if not seen and len(m.seen) >= p.dedupe_window:
                seen = e.ts < min(m.seen.values())
            if seen:
                continue
            m.seen[e.event_id] = e.ts
            if len(m.seen) > p.dedupe_window:
                # ZREMRANGEBYRANK 0 -(window+1): the lowest score, ties by id.
                del m.seen[min(m.seen, key=lambda k: (m.seen[k], k))]
            out.fresh.append(e)
            if e.outcome == "purchase":
                _add(rec, "buys", 1)
                _add(rec, "spend", e.revenue)
            live_done, shadow_done = False, set()
            for lst in m.lists:
                shadow = bool(lst["sh"])
                if (shadow and lst["arm"] in shadow_done) or (not shadow and live_done):
                    continue
                if lst["x"] != p.experiment or not lst["ts"] < e.ts <= lst["ts"] + p.window_ms:
                    continue
                if e.item_id not in lst["items"]:
                    continue
                if shadow:
                    shadow_done.add(lst["arm"])
                else:
                    live_done = True
                flag = _FLAG[e.outcome]
                first = not lst.get(flag)
                lst[flag] = 1
                _add(rec, f"{lst['arm']}:{e.outcome}", 1)
                if first:
                    _add(rec, f"{lst['arm']}:{e.outcome}_lists", 1)
                if e.outcome == "purchase":
                    _add(rec, f"{lst['arm']}:revenue", e.revenue)
                position = lst["items"].index(e.item_id) + 1
                out.credits.append(Credit(e, lst["arm"], lst["id"], position, first, shadow))
        return out

    async def show(self, lists: Mapping[str, Sequence[ShownList]]) -> list[ShownList]:
        p = self.policy
        recorded = []
        for user, shown in lists.items():
            if not shown:
                continue
            m = self.users.setdefault(user, _UserMemory())
            have = {(x["id"], x["arm"]) for x in m.lists}
            for s in shown:
                if (s.list_id, s.arm) in have:
                    continue
                have.add((s.list_id, s.arm))
                m.lists.insert(0, orjson.loads(s.to_json()))
                _add(m.record, f"{s.arm}:lists", 1)
                recorded.append(s)
            del m.lists[p.lists_kept :]
            newest = m.lists[0]["ts"]
            while m.lists and m.lists[-1]["ts"] < newest - p.window_ms:
                m.lists.pop()
        return recorded

    def records(self) -> list[tuple[str, dict[str, str]]]:
        """Every user's record as :func:`user_records` reads it from Redis (text values)."""
        return [
            (user, {k: _number_text(v) for k, v in m.record.items()})
            for user, m in self.users.items()
            if m.record.get("exp") == self.policy.experiment
        ]


def _add(rec: dict[str, float | str], name: str, by: float) -> None:
    rec[name] = float(rec.get(name, 0.0)) + by


def _number_text(v: float | str) -> str:
    return v if isinstance(v, str) else repr(v)
