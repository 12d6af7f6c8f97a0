"""A shop event becomes a recommendation on recs.out: real Kafka, Faust, Redis, Triton, BERT.

Uses the first real events of the rees46 sample (views, carts, purchases of a
multi-category shop) and the catalogue records of the items they touch, with
malformed records interleaved between the good ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from redis.asyncio import Redis

from features import keys
from infra.stack import Endpoints
from shoprec.dlq import original_bytes
from shoprec.settings import Settings
from streams.topics import TopicNames, ensure_topics, kafka_options
from tests.integration.helpers import isolated_settings, rees46_fixture
from tests.integration.ops_setup import load_catalogue
from tests.worker import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_EVENTS = 400
BAD_RECORDS: list[tuple[bytes, str]] = [
    (b"{this is not json", "not_json"),
    (b'{"event_id":"bad-1","type":"like","user_id":"u","item_id":"i","ts":1}', "unknown_type"),
    (b'{"event_id":"bad-2","type":"view","item_id":"i","ts":1764000000000}', "missing_field"),
    (
        b'{"event_id":"bad-3","type":"view","user_id":"u","item_id":"i","ts":99999999999999}',
        "ts_in_future",
    ),
    (
        b'{"event_id":"bad-4","type":"view","user_id":"u","item_id":"'
        + b"x" * 20_000
        + b'","ts":1}',
        "too_large",
    ),
    (b"\xff\xfe\x00garbage", "not_json"),
]


async def consume_all(settings: Settings, topic: str, until: Any, timeout_s: float) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic, **kafka_options(settings), group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not until(records):
            batch = await consumer.getmany(timeout_ms=500)
            for rs in batch.values():
                records.extend(rs)
    finally:
        await consumer.stop()
    return records


@pytest.fixture
async def settings(stack: Endpoints) -> AsyncIterator[Settings]:
    s = isolated_settings(stack, min_emit_interval_ms=0, topic_partitions=2)
    await ensure_topics(s)
    yield s


async def test_events_become_recommendations_and_bad_input_is_dead_lettered(
    settings: Settings, data_dir: Path, tmp_path: Path
) -> None:
    events, items = rees46_fixture(data_dir, N_EVENTS)
    names = TopicNames.from_settings(settings)
    # The session's Redis is shared and Triton's item table follows it: never empty it
    # under a running Triton (the table would keep numbers Redis then gives to other items).
    redis = Redis.from_url(settings.redis_url.get_secret_value())
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    producer = AIOKafkaProducer(**kafka_options(settings), acks="all")
    await producer.start()
    try:
        await load_catalogue(settings, redis, worker, items, timeout_s=240)
        assert await redis.hexists(keys.item(items[0]["item_id"]), "emb")

        # Live, in recorded order, and never in the future: the producer sends faster than
        # one event per millisecond, and the worker may answer before a future ts arrives.
        start = int(time.time() * 1000) - len(events)
        bad_every = N_EVENTS // len(BAD_RECORDS)
        for n, event in enumerate(events):
            event["ts"] = start + n
            await producer.send(
                names.event_topic(event["type"]), orjson.dumps(event), key=event["user_id"].encode()
            )
            if n % bad_every == 0 and n // bad_every < len(BAD_RECORDS):
                raw, _ = BAD_RECORDS[n // bad_every]
                await producer.send(names.event_topic("click"), raw, key=b"bad")
        await producer.flush()
    finally:
        await producer.stop()

    users = {e["user_id"] for e in events}
    try:
        recs = await consume_all(
            settings,
            names.recs_out,
            lambda rs: {r.key.decode() for r in rs} >= users,
            timeout_s=180,
        )
        dead = await consume_all(
            settings, names.dlq, lambda rs: len(rs) >= len(BAD_RECORDS), timeout_s=30
        )
        # A clean shutdown, with the final counters on the worker's metrics endpoint.
        stats = worker.stop()
    finally:
        worker.close()
        await redis.aclose()

    # Every record accounted for in exactly one bucket.
    buckets = ("recommended", "dead_lettered", "duplicates", "rate_limited", "coalesced")
    assert stats["events_in"] == len(events) + len(BAD_RECORDS) == sum(stats[b] for b in buckets)

    # Every user who acted got recommendations (no per-user interval in this test).
    got = [orjson.loads(r.value) for r in recs]
    assert {g["user_id"] for g in got} == users, worker.tail()

    # Per-user order: recs.out is keyed by user, so one user's recommendations are read in
    # the order they were published, and their triggers of one event type (one topic,
    # one partition per user) come in the order they were sent.
    triggers: dict[tuple[str, str], list[int]] = {}
    for g in got:
        trigger = g["trigger"]
        triggers.setdefault((g["user_id"], trigger["type"]), []).append(trigger["ts"])
    assert all(ts == sorted(ts) for ts in triggers.values()), triggers

    # The output contract.
    purchases_by_user: dict[str, list[tuple[int, str]]] = {}
    for e in events:
        if e["type"] == "purchase":
            purchases_by_user.setdefault(e["user_id"], []).append((e["ts"], e["item_id"]))
    for rec, raw in zip(got, recs, strict=True):
        assert raw.key.decode() == rec["user_id"]
        assert set(rec) == {
            "schema",
            "user_id",
            "items",
            "model",
            "trigger",
            "emitted_ts",
            "latency_ms",
            "degraded",
            "list_id",
            "experiment",
            "arm",
        }
        # No experiment configured: every user in the one arm, the served ranker.
        assert (rec["experiment"], rec["arm"]) == ("live", "ranker")
        assert len(rec["list_id"]) == 16
        assert rec["schema"] == 1 and rec["degraded"] is False
        assert rec["model"].startswith("fused_ranker@")
        assert rec["latency_ms"] == rec["emitted_ts"] - rec["trigger"]["ts"] >= 0
        assert 0 < len(rec["items"]) <= settings.top_k, rec
        ids = [i["item_id"] for i in rec["items"]]
        assert len(ids) == len(set(ids))
        assert all(i["reasons"] and isinstance(i["score"], float) for i in rec["items"])
        # Never the item just bought, nor the one in view.
        bought = {
            i for ts, i in purchases_by_user.get(rec["user_id"], []) if ts <= rec["trigger"]["ts"]
        }
        assert not bought & set(ids), (rec, bought)
        trigger = next(e for e in events if e["event_id"] == rec["trigger"]["event_id"])
        assert trigger["item_id"] not in ids

    # Every malformed record is on the DLQ with its reason and original bytes.
    letters = [orjson.loads(r.value) for r in dead]
    assert sorted(d["reason"] for d in letters) == sorted(reason for _, reason in BAD_RECORDS)
    originals = {original_bytes(r.value) for r in dead}
    assert originals == {raw for raw, _ in BAD_RECORDS}
    for r in dead:
        assert dict(r.headers)["shoprec-reason"].decode() in {reason for _, reason in BAD_RECORDS}


async def test_catalog_updates_tombstones_and_bad_records(
    settings: Settings, data_dir: Path, tmp_path: Path
) -> None:
    _, items = rees46_fixture(data_dir, N_EVENTS)
    items = items[:5]
    names = TopicNames.from_settings(settings)
    redis = Redis.from_url(settings.redis_url.get_secret_value())
    start_len = await redis.xlen(keys.ITEM_LOG)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    producer = AIOKafkaProducer(**kafka_options(settings), acks="all")
    await producer.start()
    gone, sold_out = items[0]["item_id"], items[1]["item_id"]
    try:
        for item in items:
            await producer.send(names.catalog, orjson.dumps(item), key=item["item_id"].encode())
        await producer.send(names.catalog, b"{broken", key=b"x1")
        await producer.send(names.catalog, b'{"item_id": "x2", "in_stock": "yes"}', key=b"x2")
        await producer.send(names.catalog, None, key=gone.encode())  # tombstone
        await producer.send(
            names.catalog, orjson.dumps(items[1] | {"in_stock": False}), key=sold_out.encode()
        )
        await producer.flush()
        dead = await consume_all(settings, names.dlq, lambda rs: len(rs) >= 2, timeout_s=120)
        deadline = time.monotonic() + 60
        while await redis.xlen(keys.ITEM_LOG) < start_len + len(items) + 2:
            assert time.monotonic() < deadline, worker.tail()
            await asyncio.sleep(0.5)
        assert not await redis.exists(keys.item(gone))
        assert await redis.hget(keys.item(sold_out), "in_stock") == b"0"
        assert await redis.hexists(keys.item(items[2]["item_id"]), "emb")
    finally:
        await producer.stop()
        worker.close()
        await redis.aclose()
    assert sorted(orjson.loads(r.value)["reason"] for r in dead) == ["not_json", "wrong_type"]
    assert {dict(r.headers)["shoprec-source-topic"] for r in dead} == {names.catalog.encode()}
