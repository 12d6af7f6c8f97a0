"""Each event lands in exactly one bucket, redelivered pending triggers included."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pytest

from features.store import UpdateResult, UserUpdate
from shoprec.events import Limits
from streams.ingest import Ingestor, RawRecord

T0 = 1_764_000_000_000

# (event id, user, ts offset, applied, emit): applied False + emit True is a trigger
# redelivered after a crash before its recommendation was published.
SCRIPT = [
    ("e1", "u1", 1, False, True),  # redelivered, then superseded by e2: a duplicate only
    ("e2", "u1", 2, True, True),
    ("e3", "u2", 5, True, True),
    ("e4", "u2", 3, False, True),  # redelivered but older than e3: a duplicate only
    ("e5", "u3", 1, False, True),  # redelivered alone: recommends again
    ("e6", "u4", 1, True, True),  # superseded by e7: coalesced
    ("e7", "u4", 2, True, True),
    ("e8", "u5", 1, True, False),  # rate-limited
    ("e9", "u5", 2, False, False),  # a plain duplicate
]


class ScriptedStore:
    async def apply_events(self, updates: Sequence[UserUpdate]) -> list[UpdateResult]:
        by_id = {s[0]: s for s in SCRIPT}
        return [UpdateResult(by_id[u.event_id][3], by_id[u.event_id][4], []) for u in updates]


def views(rows: Sequence[tuple[str, str, int]]) -> list[RawRecord]:
    """One view record per (event id, user, ts offset), in order."""
    return [
        RawRecord(
            "shop.views",
            0,
            n,
            user.encode(),
            orjson.dumps(
                {"event_id": eid, "type": "view", "user_id": user, "ts": T0 + dt, "item_id": "i"}
            ),
        )
        for n, (eid, user, dt) in enumerate(rows)
    ]


class NoVectors:
    def vector(self, item_id: str) -> None:
        return None


class NoEncoder:
    async def encode(self, texts: Sequence[str]) -> list[list[float]]:
        raise AssertionError("no searches here")


async def test_redelivered_triggers_recommend_once_and_every_event_is_counted_once() -> None:
    records = views([(eid, user, dt) for eid, user, dt, _, _ in SCRIPT])
    ingestor = Ingestor(ScriptedStore(), NoVectors(), NoEncoder(), Limits(), lambda: T0)  # type: ignore[arg-type]
    out = await ingestor.ingest(records)
    assert sorted(e.event_id for e in out.triggers) == ["e2", "e3", "e5", "e7"]
    assert out.redelivered == {"e5"}
    assert (out.duplicates, out.rate_limited, out.coalesced) == (4, 1, 1)
    # The worker's books: a re-emitted recommendation is not counted as recommended.
    recommended = len(out.triggers) - len(out.redelivered)
    assert out.duplicates + out.rate_limited + out.coalesced + recommended == len(SCRIPT)


async def test_a_copy_of_an_event_in_the_same_batch_is_a_duplicate_and_the_first_triggers() -> None:
    """A producer that retried a send during a broker failure wrote the event twice; both
    copies land in one batch: the first applies (and is pending), the second finds it
    pending. Found on the cluster (a Kafka broker killed): the first copy was in no bucket."""

    class Store:
        async def apply_events(self, updates: Sequence[UserUpdate]) -> list[UpdateResult]:
            seen: set[str] = set()
            out = []
            for u in updates:
                out.append(UpdateResult(u.event_id not in seen, True, []))
                seen.add(u.event_id)
            return out

    value = orjson.dumps(
        {"event_id": "c1", "type": "view", "user_id": "u1", "ts": T0, "item_id": "i"}
    )
    records = [RawRecord("shop.views", 0, n, b"u1", value) for n in range(2)]
    ingestor = Ingestor(Store(), NoVectors(), NoEncoder(), Limits(), lambda: T0)  # type: ignore[arg-type]
    out = await ingestor.ingest(records)
    assert [e.event_id for e in out.triggers] == ["c1"] and out.redelivered == set()
    assert (out.applied, out.duplicates, out.coalesced) == (1, 1, 0)
    recommended = len(out.triggers) - len(out.redelivered)
    assert out.duplicates + out.rate_limited + out.coalesced + recommended == len(records)


async def test_a_batch_retried_after_its_write_ran_counts_events_applied_not_duplicate() -> None:
    """Redis ran the batch's state write and the reply was lost (found in CI: Redis
    restarted, "Connection closed by server"): the worker retries the batch, the write
    finds every event applied.  They are this worker's own events, not a redelivery:
    counted as applied and recommended, as if the first attempt had answered."""

    class LosesFirstReply:
        def __init__(self) -> None:
            self.seen: set[str] = set()
            self.calls = 0

        async def apply_events(self, updates: Sequence[UserUpdate]) -> list[UpdateResult]:
            self.calls += 1
            out = []
            for u in updates:
                # A user's newest event is their pending trigger (the write's rule).
                out.append(UpdateResult(u.event_id not in self.seen, True, []))
                self.seen.add(u.event_id)
            if self.calls == 1:
                raise ConnectionError("Connection closed by server.")
            return out

    records = views([("r1", "u1", 1), ("r2", "u2", 1), ("r3", "u3", 1)])
    store = LosesFirstReply()
    ingestor = Ingestor(store, NoVectors(), NoEncoder(), Limits(), lambda: T0)  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        await ingestor.ingest(records)
    out = await ingestor.ingest(records)
    assert (out.applied, out.duplicates, out.redelivered) == (3, 0, set())
    assert sorted(e.event_id for e in out.triggers) == ["r1", "r2", "r3"]
    # Forgotten once answered: the same records delivered again later are duplicates.
    again = await ingestor.ingest(records)
    assert (again.applied, again.duplicates, again.redelivered) == (0, 3, {"r1", "r2", "r3"})
