"""Hostile input at the real worker: every bad record ends on recs.dlq with its reason (header
and body) and its original bytes, good events in between are still served, the worker never
crashes, its memory stays bounded, and its log names no user.

Hypothesis builds the bad records: malformed JSON, wrong types, unknown event types,
oversized fields and records, hostile unicode, timestamps far in the past and future;
then a burst of thousands of bad records at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from infra import procs
from shoprec.dlq import original_bytes
from shoprec.events import EVENT_TYPES, MIN_TS_MS
from shoprec.settings import Settings
from streams.topics import TopicNames, kafka_options
from tests.faults.harness import (
    FaultStack,
    load_events,
    prepare,
    scenario_settings,
    start_producer,
)
from tests.worker import WorkerProcess

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

ANY = "*"  # a record hypothesis made that is bad for a reason we do not predict
HOSTILE = "\u202e\u2066\u200b\u200d\ufeff\u0301\U0001f4a9\u0000\uffff"
REAL = load_events(600)
MAX_FIELD, MAX_BYTES = 512, 16_384


def base_event() -> dict[str, Any]:
    return {
        "event_id": "e",
        "type": "view",
        "user_id": "u",
        "item_id": "i",
        "ts": int(time.time() * 1000),
    }


def with_field(name: str, value: Any, reason: str) -> tuple[bytes, str]:
    return orjson.dumps(base_event() | {name: value}), reason


ids = st.sampled_from(["event_id", "user_id", "item_id"])
wrong_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
hostile_text = st.text(alphabet=st.sampled_from(list(HOSTILE) + list("ab")), min_size=1)


def not_json(raw: bytes) -> bool:
    try:
        return not isinstance(orjson.loads(raw), dict)
    except orjson.JSONDecodeError:
        return True


bad_records = st.one_of(
    # Malformed JSON and non-objects, including invalid UTF-8 and lone surrogates.
    st.binary(max_size=300).filter(not_json).map(lambda b: (b, ANY)),
    st.sampled_from(
        [
            (b'{"event_id":"\xff\xfe","type":"view"}', "not_json"),
            (b'"\\ud800"', "not_json"),
            (b'{"ts":1e400}', "not_json"),
            (b"[" * 5000, "not_json"),
            (orjson.dumps(list(range(2000))), "not_object"),
            (b"null", "not_object"),
        ]
    ),
    # Wrong types.
    st.tuples(ids, wrong_values).map(lambda fv: with_field(fv[0], fv[1], "wrong_type")),
    st.sampled_from([1.5, "1732540800123", True, [1]]).map(
        lambda v: with_field("ts", v, "wrong_type")
    ),
    # Unknown event types.
    st.text(max_size=20)
    .filter(lambda t: t not in EVENT_TYPES)
    .map(lambda t: with_field("type", t, "unknown_type")),
    # Oversized fields (hostile unicode among them) and oversized records.
    st.tuples(ids, st.integers(MAX_FIELD + 1, 4000)).map(
        lambda fn: with_field(fn[0], "x" * fn[1], "field_too_long")
    ),
    st.tuples(ids, hostile_text.map(lambda t: (t * (MAX_FIELD // len(t) + 2))[:3000])).map(
        lambda fv: with_field(fv[0], fv[1], "field_too_long")
    ),
    st.tuples(ids, hostile_text).map(
        lambda fv: with_field(fv[0], f"a\x00{fv[1]}"[:500], "bad_text")
    ),
    st.integers(MAX_BYTES + 1, 200_000).map(lambda n: with_field("note", "y" * n, "too_large")),
    # Timestamps far in the past (or seconds for ms) and far in the future.
    st.integers(-(2**63), MIN_TS_MS - 1).map(lambda ts: with_field("ts", ts, "ts_too_old")),
    st.integers(int(time.time() * 1000) + 86_400_000, 2**63 - 1).map(
        lambda ts: with_field("ts", ts, "ts_in_future")
    ),
    # Missing fields and absurd numbers.
    st.sampled_from(["event_id", "user_id", "item_id", "ts"]).map(
        lambda f: (orjson.dumps({k: v for k, v in base_event().items() if k != f}), "missing_field")
    ),
    st.floats(1e13, 1e300).map(lambda p: with_field("price", p, "out_of_range")),
)
hostile_keys = st.one_of(st.none(), st.binary(max_size=64), hostile_text.map(str.encode))


class Probe:
    """Sends a mix of good and bad records and reads what the worker made of them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = TopicNames.from_settings(settings)
        self.good_sent = 0
        self.bad_sent: Counter[str] = Counter()
        self.good_users: set[str] = set()
        self._cursor = 0

    def good_events(self, n: int, tag: str) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            e = dict(REAL[self._cursor % len(REAL)])
            self._cursor += 1
            # Unique users, so nothing coalesces and each good event must be answered.
            e |= {"event_id": f"fz-{tag}-{self._cursor}", "user_id": f"fz{tag}x{self._cursor}"}
            e["ts"] = int(time.time() * 1000)
            out.append(e)
        return out

    async def run(
        self, bad: Sequence[tuple[bytes, str, bytes | None]], n_good: int, timeout_s: float = 60
    ) -> None:
        tag = uuid.uuid4().hex[:6]
        good = self.good_events(n_good, tag)
        topics = [self.names.event_topic(t) for t in EVENT_TYPES]
        consumer = AIOKafkaConsumer(**kafka_options(self.settings), group_id=None)
        await consumer.start()
        producer = await start_producer(self.settings)
        try:
            parts = [
                TopicPartition(t, p)
                for t in (self.names.dlq, self.names.recs_out)
                for p in range(self.settings.topic_partitions)
            ]
            consumer.assign(parts)
            for tp, end in (await consumer.end_offsets(parts)).items():
                consumer.seek(tp, end)
            expected: dict[tuple[str, int, int], tuple[str, bytes]] = {}
            futures = []
            # Good events spread evenly between the bad records.
            every = max(1, len(bad) // max(1, n_good))
            pending_good = list(good)
            for i, (raw, reason, key) in enumerate(bad):
                topic = topics[i % len(topics)]
                futures.append((await producer.send(topic, raw, key=key), reason, raw))
                if i % every == 0 and pending_good:
                    await self._send_good(producer, pending_good.pop())
            for e in pending_good:
                await self._send_good(producer, e)
            for fut, reason, raw in futures:
                md = await fut
                expected[(md.topic, md.partition, md.offset)] = (reason, raw)
            await producer.flush()
        finally:
            await producer.stop()
        self.bad_sent.update(r for _, r, _ in bad)
        try:
            dead, recs = await self._read(consumer, len(expected), good, timeout_s)
        finally:
            await consumer.stop()
        self._check(expected, dead, recs, good)

    async def _send_good(self, producer: Any, e: dict[str, Any]) -> None:
        topic = self.names.event_topic(e["type"])
        await producer.send(topic, orjson.dumps(e), key=e["user_id"].encode())

    async def _read(
        self,
        consumer: AIOKafkaConsumer,
        n_dead: int,
        good: list[dict[str, Any]],
        timeout_s: float,
    ) -> tuple[list[ConsumerRecord[bytes, bytes]], list[dict[str, Any]]]:
        dead: list[ConsumerRecord[bytes, bytes]] = []
        recs: list[dict[str, Any]] = []
        wanted = {e["event_id"] for e in good}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = {r["trigger"]["event_id"] for r in recs}
            if len(dead) >= n_dead and wanted <= got:
                break
            for tp, records in (await consumer.getmany(timeout_ms=300)).items():
                if tp.topic == self.names.dlq:
                    dead.extend(records)
                else:
                    recs.extend(orjson.loads(r.value or b"{}") for r in records)
        return dead, recs

    def _check(
        self,
        expected: dict[tuple[str, int, int], tuple[str, bytes]],
        dead: list[ConsumerRecord[bytes, bytes]],
        recs: list[dict[str, Any]],
        good: list[dict[str, Any]],
    ) -> None:
        seen = {}
        for r in dead:
            h = {k: v.decode() for k, v in r.headers}
            body = orjson.loads(r.value or b"{}")
            origin = (
                h["shoprec-source-topic"],
                int(h["shoprec-source-partition"]),
                int(h["shoprec-source-offset"]),
            )
            assert h["shoprec-reason"] == body["reason"] and body["detail"], body
            assert (
                body["source"]["topic"],
                body["source"]["partition"],
                body["source"]["offset"],
            ) == origin
            seen[origin] = (body["reason"], original_bytes(r.value or b"{}"))
        assert set(seen) == set(expected), (len(seen), len(expected))
        for origin, (reason, raw) in expected.items():
            got_reason, got_raw = seen[origin]
            assert got_raw == raw
            assert reason in (ANY, got_reason), (reason, got_reason, raw[:200])
        answered = {r["trigger"]["event_id"] for r in recs}
        assert {e["event_id"] for e in good} <= answered
        self.good_users |= {e["user_id"] for e in good}
        self.good_sent += len(good)


def rss_mb(pid: int) -> float:
    resident = procs.memory_mb(pid)
    assert resident is not None, f"the worker (pid {pid}) is running"
    return resident


def test_hostile_input_is_dead_lettered_and_good_events_served(
    faults: FaultStack, logs: Path
) -> None:
    settings = scenario_settings(faults.endpoints, batch_max=256)
    asyncio.run(prepare(settings))
    worker = WorkerProcess(settings, logs / "worker.log")
    probe = Probe(settings)
    try:
        asyncio.run(worker.ready())
        asyncio.run(probe.run([], 5))  # warm: the first answers pay for lazy set-up
        rss_start = rss_mb(worker.proc.pid)

        @hsettings(
            max_examples=15,
            deadline=None,
            database=None,
            suppress_health_check=[
                HealthCheck.function_scoped_fixture,
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
            ],
        )
        @given(
            bad=st.lists(st.tuples(bad_records, hostile_keys), min_size=1, max_size=25),
            n_good=st.integers(1, 4),
        )
        def hostile_batch(bad: list[tuple[tuple[bytes, str], bytes | None]], n_good: int) -> None:
            assert worker.proc.poll() is None, worker.tail()
            asyncio.run(probe.run([(raw, reason, key) for (raw, reason), key in bad], n_good))

        hostile_batch()

        # A huge burst: thousands of oversized and malformed records at once.
        burst = [
            (orjson.dumps(base_event() | {"note": "z" * 20_000}), "too_large", b"k")
            if i % 3 == 0
            else (orjson.dumps(base_event() | {"user_id": "w" * 600}), "field_too_long", None)
            if i % 3 == 1
            else (b"{" + b"x" * 2000, "not_json", None)
            for i in range(3000)
        ]
        asyncio.run(probe.run(burst, 20, timeout_s=180))
        rss_end = rss_mb(worker.proc.pid)
        stats = worker.stop()
    finally:
        if worker.proc.poll() is None:
            worker.kill()

    n_bad = sum(probe.bad_sent.values())
    assert stats["dead_lettered"] == n_bad, (stats, probe.bad_sent)
    assert stats["events_in"] == n_bad + probe.good_sent, stats
    assert stats["recommended"] == probe.good_sent
    print(
        f"fuzz: {n_bad} bad records {dict(probe.bad_sent)}, {probe.good_sent} good; "
        f"worker RSS {rss_start:.0f} -> {rss_end:.0f} MB"
    )
    # Bounded memory: the burst alone was over 20 MB of input.
    assert rss_end - rss_start < 150, (rss_start, rss_end)
    # No raw user ids in the log (only u#<hash> references).
    log = worker.log()
    leaked = [u for u in probe.good_users if u in log]
    assert not leaked, leaked[:5]
    assert "key u#" in log
