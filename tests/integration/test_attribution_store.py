"""Attribution's Lua scripts against a real redis-server, held equal to the in-memory mirror.

Real rees46 events (views count as clicks there: the shop logs product page views, no
clicks), fed in micro-batches to both ``AttributionStore`` (``attribute.lua``,
``show_lists.lua``) and ``MemoryAttribution``; the lists are real items, some of them the
user's own next items so that credit happens often.  The two must answer alike batch for
batch and leave the same per-user records; a redelivered batch credits nothing again.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from redis.asyncio import Redis

from features import keys
from features.attribution import (
    Attributable,
    AttributionPolicy,
    AttributionStore,
    MemoryAttribution,
    Observed,
    ShownList,
    totals_delta,
    user_records,
)
from shoprec.events import ShopEvent
from shoprec.experiments import Experiment, assign, list_id
from streams.experiment import attributable

pytestmark = pytest.mark.integration

EXPERIMENT = Experiment.model_validate(
    {
        "name": "ab-test",
        "arms": [
            {"name": "ranker", "share": 0.4},
            {"name": "covis", "kind": "covisitation", "share": 0.4},
            {"name": "holdout", "kind": "holdout", "share": 0.2},
            {"name": "shadow", "kind": "retrieval", "shadow": True},
        ],
        "click_types": ["click", "view"],
    }
)
WINDOW_MS = 30 * 60_000
POLICY = AttributionPolicy(
    EXPERIMENT.name, tuple(a.name for a in EXPERIMENT.live_arms), WINDOW_MS, 3600
)
N_EVENTS = 6000
BATCH = 64
K = 10


@pytest.fixture
def redis(private_redis_client: Redis) -> Redis:
    return private_redis_client  # a server of this module's own, not the stack's


def rees46(data_dir: Path) -> list[ShopEvent]:
    with gzip.open(data_dir / "rees46-sample" / "events.jsonl.gz", "rb") as fh:
        rows = [orjson.loads(line) for _, line in zip(range(N_EVENTS), fh, strict=False)]
    return [
        ShopEvent(
            r["event_id"], r["type"], r["user_id"], r["ts"], r["item_id"], price=r.get("price")
        )
        for r in rows
    ]


def lists_for(
    batch: list[ShopEvent], events: list[ShopEvent], start: int, rng: np.random.Generator
) -> dict[str, list[ShownList]]:
    """A list for every third event: half the user's own next items, half other real items,
    from the user's arm; and a shadow list beside it."""
    items = sorted({e.item_id for e in events if e.item_id})
    out: dict[str, list[ShownList]] = {}
    for n, t in enumerate(batch):
        if (start + n) % 3:
            continue
        ahead = [e.item_id for e in events[start + n + 1 :] if e.user_id == t.user_id][:5]
        picked = list(dict.fromkeys([*ahead, *rng.choice(items, K, replace=False)]))[:K]
        arm = assign(t.user_id, EXPERIMENT.name, list(EXPERIMENT.shares().items()))
        lid = list_id(t.user_id, t.event_id)
        mine = out.setdefault(t.user_id, [])
        if arm != "holdout":
            mine.append(ShownList(lid, EXPERIMENT.name, arm, t.ts, tuple(str(i) for i in picked)))
        shadow = tuple(str(i) for i in rng.permutation(picked))
        mine.append(ShownList(lid, EXPERIMENT.name, "shadow", t.ts, shadow, shadow=True))
    return out


def observation(batch: list[ShopEvent]) -> dict[str, tuple[str, list[Attributable]]]:
    shares = list(EXPERIMENT.shares().items())
    out: dict[str, tuple[str, list[Attributable]]] = {}
    for e in batch:
        found = attributable(EXPERIMENT, e)
        _, mine = out.setdefault(e.user_id, (assign(e.user_id, "ab-test", shares), []))
        if found is not None:
            mine.append(found)
    return out


def plain(observed: dict[str, Observed]) -> dict[str, Any]:
    return {
        u: (
            o.arm,
            o.new,
            [e.event_id for e in o.fresh],
            [
                (c.event.event_id, c.arm, c.list_id, c.position, c.first, c.shadow)
                for c in o.credits
            ],
        )
        for u, o in observed.items()
    }


async def test_lua_and_memory_attribute_alike_exactly_once(redis: Redis, data_dir: Path) -> None:
    events = rees46(data_dir)
    store = AttributionStore(redis, POLICY)
    memory = MemoryAttribution(POLICY)
    rng = np.random.default_rng(7)
    credits = 0
    for start in range(0, len(events), BATCH):
        batch = events[start : start + BATCH]
        seen = observation(batch)
        live, mem = await store.observe(seen), await memory.observe(seen)
        assert plain(live) == plain(mem), f"batch at {start}"
        credits += sum(len(o.credits) for o in live.values())
        shown = lists_for(batch, events, start, rng)
        assert await store.show(shown) == await memory.show(shown)
        if start == 40 * BATCH:  # a redelivery: the same events again credit nothing
            again = await store.observe(seen)
            assert all(not o.fresh and not o.credits and not o.new for o in again.values())
    assert credits > 300  # the test means something: attribution happened often
    from_redis = dict([r async for r in user_records(redis, EXPERIMENT.name)])
    from_memory = dict(memory.records())
    assert from_redis.keys() == from_memory.keys() == {e.user_id for e in events}
    for user, want in from_memory.items():
        got = from_redis[user]
        assert got.keys() == want.keys(), user
        assert (got["exp"], got["arm"]) == (want["exp"], want["arm"])
        for name in want.keys() - {"exp", "arm"}:
            # Redis adds revenue in long double, Python in double.
            assert float(got[name]) == pytest.approx(float(want[name]), rel=1e-9), (user, name)


async def test_every_script_stays_in_one_slot_and_every_key_expires(
    redis: Redis, data_dir: Path
) -> None:
    from redis.crc import key_slot

    events = rees46(data_dir)[:600]
    store = AttributionStore(redis, POLICY)
    rng = np.random.default_rng(1)
    for start in range(0, len(events), BATCH):
        batch = events[start : start + BATCH]
        observed = await store.observe(observation(batch))
        recorded = await store.show(lists_for(batch, events, start, rng))
        store.count(totals_delta(observed, recorded))
    await store.flush()
    totals = await store.totals()
    assert totals["ranker:lists"] > 0 and totals["shadow:lists"] > totals["ranker:lists"]
    names = [k async for k in redis.scan_iter(count=10_000)]
    kinds = set()
    for name in names:
        text = name.decode()
        spec = keys.spec_of(text)
        assert spec is not None, text
        kinds.add(spec.pattern)
        assert await redis.ttl(name) > 0, text
    assert kinds == {
        "{u:<user>}:xp",
        "{u:<user>}:xl",
        "{u:<user>}:xe",
        "{u:<user>}:xr",
        "exp:<name>:totals",
    }
    for user in {e.user_id for e in events}:
        slots = {
            key_slot(k.encode())
            for k in (
                keys.user_experiment(user),
                keys.user_lists(user),
                keys.user_attributed(user),
                keys.user_attributions(user),
            )
        }
        assert len(slots) == 1
