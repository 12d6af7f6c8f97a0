"""Forgetting customers mid-stream, on the real stack, and every key's lifetime.

A real worker streams real rees46 events (Apache Kafka, Redis, Triton with BERT); a
replay and a rebuild have put the same customers into shadow prefixes too.  While the
second half of the events streams, customer A is erased with ``shoprec forget-user`` and
customer B through the control topic's handler (the class the worker's control agent
runs); A's old events are then sent again, as a redelivery would.  Afterwards every key
in Redis is read back, value and all: neither id, nor its hash tag, nor its hash may
appear anywhere but the hashes in the suppression list.  ``recs.out`` ends each with a
tombstone; a replay, a rebuild and an exact rebuild afterwards skip all their events;
a later event of A is processed (a new relationship).  Last, every key in Redis is
checked against ``features.keys.SCHEMA``: known, and with a TTL unless it says why not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr
from redis.asyncio import Redis

from features import keys
from features.forget import ForgetList, find_user_keys
from infra.stack import Endpoints
from ops.ranges import read_topic
from streams.topics import CONTROL, TopicNames, ensure_topics, kafka_options
from tests.integration.helpers import isolated_settings, rees46_fixture
from tests.integration.ops_setup import (
    events_in_state,
    items_embedded,
    json_out,
    send,
    shoprec,
    wait_for,
)
from tests.worker import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_EVENTS = 600
HALF = N_EVENTS // 2
BUCKETS = ("recommended", "dead_lettered", "duplicates", "rate_limited", "coalesced", "suppressed")


def pick_two(events: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """The two customers with the most events among those active in both halves."""
    first: dict[str, int] = {}
    second: dict[str, int] = {}
    for n, e in enumerate(events):
        side = first if n < HALF else second
        side[e["user_id"]] = side.get(e["user_id"], 0) + 1
    both = sorted((u for u in first if u in second), key=lambda u: (-first[u] - second[u], u))
    return both[0], both[1]


async def values_of(redis: Redis, key: bytes) -> list[bytes]:
    """Everything a key holds, as Redis renders it (integers encoded compactly included)."""
    kind = cast(bytes, await redis.type(key)).decode()
    if kind == "string":
        return [cast(bytes, await redis.get(key))]
    if kind == "hash":
        pairs = cast(dict[bytes, bytes], await redis.hgetall(key))
        return [*pairs.keys(), *pairs.values()]
    if kind == "list":
        return cast(list[bytes], await redis.lrange(key, 0, -1))
    if kind == "set":
        return list(cast(set[bytes], await redis.smembers(key)))
    if kind == "zset":
        return [
            m
            for m, _ in cast(
                list[tuple[bytes, float]], await redis.zrange(key, 0, -1, withscores=True)
            )
        ]
    if kind == "stream":
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(key))
        return [b for _, fields in entries for kv in fields.items() for b in kv]
    return []  # gone since the scan


async def traces(redis: Redis, needles: Sequence[bytes]) -> tuple[int, list[str]]:
    """Keys scanned, and where any needle appears in a key name or a value."""
    found: list[str] = []
    scanned = 0
    async for key in redis.scan_iter(count=10_000):
        scanned += 1
        name = cast(bytes, key)
        for needle in needles:
            if needle in name:
                found.append(f"key name {name!r} holds {needle!r}")
        for value in await values_of(redis, name):
            for needle in needles:
                if value is not None and needle in value:
                    found.append(f"a value of {name!r} holds {needle!r}")
    return scanned, found


def counts_by_prefix(found: dict[str, list[Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for user, user_keys in found.items():
        per: dict[str, int] = {}
        for k in user_keys:
            per[k.prefix] = per.get(k.prefix, 0) + 1
        out[user] = per
    return out


async def records_for(settings: Any, topic: str, user: str) -> list[Any]:
    return await read_topic(settings, topic, keys=frozenset({user.encode()}))


async def test_customers_forgotten_mid_stream_leave_nothing_and_stay_forgotten(
    stack: Endpoints, data_dir: Path, tmp_path: Path, redis: Redis
) -> None:
    s = isolated_settings(
        stack,
        min_emit_interval_ms=0,
        topic_partitions=2,
        triton_timeout_s=30.0,
        agent_concurrency=1,
        forget_hash_key=SecretStr("integration-test-key"),
    )
    tag = s.state_prefix.rstrip(":")
    events, items = rees46_fixture(data_dir, N_EVENTS)
    a, b = pick_two(events)
    a_first = [e for e in events[:HALF] if e["user_id"] == a]
    names = TopicNames.from_settings(s)
    views = names.event_topic("view")
    await ensure_topics(s)
    summary: dict[str, Any] = {"users": {"A": a, "B": b}}

    def record(e: dict[str, Any]) -> tuple[str, bytes, bytes]:
        return (views, str(e["user_id"]).encode(), orjson.dumps(e))

    worker = WorkerProcess(s, tmp_path / "worker.log")
    try:
        # --- the first half, live, and the same customers in two shadow prefixes -------
        await send(s, [(names.catalog, i["item_id"].encode(), orjson.dumps(i)) for i in items])
        await wait_for(lambda: items_embedded(redis, items), worker, 240)
        await send(s, [record(e) for e in events[:HALF]])

        async def first_half_in() -> bool:
            return await events_in_state(redis, s.state_prefix) >= HALF

        await wait_for(first_half_in, worker, 240)
        whole = ("--topic", "shop.views", "--from-offset", "0:0,1:0")
        json_out(shoprec(s, "replay", *whole, "--state-prefix", f"replay1{tag}:", "--json"))
        json_out(
            shoprec(
                s,
                "rebuild-state",
                *whole,
                "--state-prefix",
                f"rebuild1{tag}:",
                "--no-verify",
                "--json",
            )
        )
        before = await find_user_keys(redis, [a, b])
        summary["keys_before"] = counts_by_prefix(before)
        for user in (a, b):
            assert {k.prefix for k in before[user]} >= {
                s.state_prefix,
                f"replay1{tag}:",
                f"rebuild1{tag}:",
            }, before[user]

        # --- a dry run changes nothing ----------------------------------------------------
        dry = json_out(shoprec(s, "forget-user", a, "--dry-run", "--json"))
        assert dry["dry_run"] and dry["tombstone"] is None
        assert sum(map(len, dry["removed"].values())) == len(before[a])
        assert await find_user_keys(redis, [a]) == {a: before[a]}
        assert not await redis.exists(keys.forgotten_users(s.topic_prefix))

        # --- mid-stream: the second half flows while A and B are erased ------------------
        streamed = [0]

        async def stream_second_half() -> None:
            # About 15 s of events, while the erases run.
            producer = AIOKafkaProducer(**kafka_options(s), acks="all")
            await producer.start()
            try:
                for e in events[HALF:]:
                    topic, key, value = record(e)
                    await producer.send_and_wait(topic, value, key=key)
                    streamed[0] += 1
                    await asyncio.sleep(0.05)
            finally:
                await producer.stop()

        streaming = asyncio.create_task(stream_second_half())
        await asyncio.sleep(2.0)
        summary["second_half_sent_when_erase_began"] = streamed[0]
        assert 0 < streamed[0] < len(events) - HALF, "the erase starts mid-stream"

        b_erase_ts = int(time.time() * 1000) + 1000

        async def forget_b_through_the_control_topic() -> None:
            # The worker's control agent does the erase (streams/control.py, wired in
            # streams/app.py); a record of an unknown type goes to the dead-letter topic.
            control = s.topic(CONTROL)
            request = orjson.dumps({"type": "forget_user", "user_id": b, "ts": b_erase_ts})
            await send(
                s, [(control, b.encode(), request), (control, b"x", b'{"type":"forget_all"}')]
            )

            async def b_erased() -> bool:
                forgotten = ForgetList.from_settings(redis, s)
                return b in await forgotten.erased_at([b])

            await wait_for(b_erased, worker, 120)

        erased_a, _ = await asyncio.gather(
            asyncio.to_thread(shoprec, s, "forget-user", a, "--settle", "3", "--json"),
            forget_b_through_the_control_topic(),
        )
        report = json_out(erased_a)
        summary["second_half_sent_when_erase_ended"] = streamed[0]
        control_dead: list[Any] = []

        async def bad_control_record_dead_lettered() -> bool:
            # B's record and the bad one may sit in two partitions of the control topic:
            # B erased says nothing about when the other was read.
            control_dead[:] = [
                r
                for r in await read_topic(s, names.dlq)
                if dict(r.headers).get("shoprec-source-topic") == s.topic(CONTROL).encode()
            ]
            return bool(control_dead)

        await wait_for(bad_control_record_dead_lettered, worker, 60)
        assert [dict(r.headers)["shoprec-reason"] for r in control_dead] == [b"unknown_type"]
        await streaming
        # A's old events again, as a redelivery after a crash would bring them, and a bad
        # record for the dead-letter part at the end.
        await send(s, [record(e) for e in a_first] + [(views, b"bad", b"{not json")])
        sent = N_EVENTS + len(a_first) + 1

        async def all_counted() -> bool:
            return int(worker.counters().get("events_in", 0)) >= sent

        await wait_for(all_counted, worker, 240)
        await asyncio.sleep(3)  # the last publishes acknowledged and confirmed
        counters = worker.counters()
        assert counters["events_in"] == sent == sum(counters[k] for k in BUCKETS), counters
        # At least the redelivered ones; A's and B's second-half events processed before
        # the erase landed were applied, then swept.
        n_a_b = sum(e["user_id"] in (a, b) for e in events)
        assert len(a_first) <= counters["suppressed"] <= n_a_b + len(a_first), counters
        summary["worker_suppressed"] = counters["suppressed"]
        summary["report_a"] = {
            k: report[k]
            for k in ("removed", "removed_late", "tombstone", "keys_removed", "seconds")
        }
        assert report["keys_removed"] >= len(before[a])
        assert report["tombstone"]["topic"] == names.recs_out

        # --- nothing about them remains in Redis -----------------------------------------
        forgotten = ForgetList.from_settings(redis, s)
        hashes = [forgotten.hash(a).encode(), forgotten.hash(b).encode()]
        ids = [a.encode(), b.encode()]
        scanned, found = await traces(redis, [*ids, *hashes])
        suppression_key = keys.forgotten_users(s.topic_prefix).encode()
        allowed = {f"a value of {suppression_key!r} holds {h!r}" for h in hashes}
        assert set(found) == allowed, found
        assert await forgotten.erased_at([a, b]) == {a: report["erase_ts"], b: b_erase_ts}
        ttl = await redis.ttl(suppression_key)
        assert s.topic_retention_s - 60 < ttl <= s.topic_retention_s
        summary["keys_scanned_after_erase"] = scanned
        summary["keys_after"] = counts_by_prefix(await find_user_keys(redis, [a, b]))
        assert summary["keys_after"] == {a: {}, b: {}}

        # recs.out ends each customer with a tombstone, and A's is where the report said.
        for user in (a, b):
            recs = await records_for(s, names.recs_out, user)
            assert recs and recs[-1].value is None, user
        tomb = report["tombstone"]
        tombstones_a = [r for r in await records_for(s, names.recs_out, a) if r.value is None]
        assert (tombstones_a[-1].partition, tombstones_a[-1].offset) == (
            tomb["partition"],
            tomb["offset"],
        )

        # --- a replay and two rebuilds afterwards skip all their events -------------------
        expected = sum(e["user_id"] in (a, b) for e in events) + len(a_first)
        replay = json_out(
            shoprec(
                s,
                "replay",
                *whole,
                "--state-prefix",
                f"replay2{tag}:",
                "--into",
                "recs.replay2",
                "--json",
            )
        )
        fold = json_out(
            shoprec(
                s,
                "rebuild-state",
                *whole,
                "--state-prefix",
                f"rebuild2{tag}:",
                "--no-verify",
                "--json",
            )
        )
        exact = json_out(
            shoprec(
                s,
                "rebuild-state",
                *whole,
                "--state-prefix",
                f"rebuild3{tag}:",
                "--exact",
                "--no-verify",
                "--json",
            )
        )
        summary["suppressed"] = {
            "expected": expected,
            "replay": replay["suppressed"],
            "rebuild": fold["suppressed"],
            "rebuild_exact": exact["suppressed"],
        }
        assert replay["suppressed"] == fold["suppressed"] == exact["suppressed"] == expected
        assert replay["complete"] and replay["processed"] == sent
        for user in (a, b):
            assert not await records_for(s, s.topic("recs.replay2"), user)
        scanned, found = await traces(redis, [*ids, *hashes])
        assert set(found) == allowed, found

        inspected = json_out(shoprec(s, "inspect", "user", a, "--json"))
        assert not inspected["known"] and inspected["erased_at"] is not None
        assert set(inspected["key_ttls_s"].values()) == {None}
        assert inspected["last_recommendations"] == []

        # --- a later event is a new relationship ------------------------------------------
        fresh = {
            "event_id": f"after-erase-{tag}",
            "type": "view",
            "user_id": a,
            "item_id": a_first[0]["item_id"],
            "ts": int(time.time() * 1000),
        }
        await send(s, [record(fresh)])

        async def fresh_in() -> bool:
            return int(worker.counters().get("events_in", 0)) >= sent + 1

        await wait_for(fresh_in, worker, 60)
        await asyncio.sleep(2)
        meta = cast(dict[bytes, bytes], await redis.hgetall(f"{s.state_prefix}{{u:{a}}}:meta"))
        assert int(meta[b"n"]) == 1, "only the event after the erase"
        after_tomb = await records_for(s, names.recs_out, a)
        last_tomb = max(i for i, r in enumerate(after_tomb) if r.value is None)
        new_recs = [orjson.loads(r.value) for r in after_tomb[last_tomb + 1 :]]
        assert [r["trigger"]["event_id"] for r in new_recs] == [fresh["event_id"]]
        counters = worker.stop()
    finally:
        worker.close()

    # --- every key has a TTL or a documented reason not to --------------------------------
    json_out(shoprec(s, "dlq", "replay", "--json"))  # writes dlq:reinjected
    ttls: dict[str, list[int]] = {}
    unknown: list[bytes] = []
    wrong: list[str] = []
    async for key in redis.scan_iter(count=10_000):
        spec = keys.spec_of(cast(bytes, key).decode("utf-8", "surrogateescape"))
        if spec is None:
            unknown.append(cast(bytes, key))
            continue
        ttl = await redis.ttl(key)
        ttls.setdefault(spec.pattern, []).append(ttl)
        if (ttl > 0) != spec.expires and ttl != -2:
            wrong.append(f"{key!r}: TTL {ttl}, spec says {spec.ttl}")
    assert unknown == [] and wrong == [], (unknown[:10], wrong[:10])
    assert {keys.DLQ_REINJECTED, "{u:<user>}:emb", "ckpt:replay:<run>", "forget:users"} <= set(ttls)
    summary["key_kinds"] = {p: len(t) for p, t in sorted(ttls.items())}
    print("forget-user integration summary:", orjson.dumps(summary).decode())
