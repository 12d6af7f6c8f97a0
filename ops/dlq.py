"""``shoprec dlq list|show|replay``: read dead letters, and re-inject them once fixed.

A dead letter keeps the rejected record's bytes, key and origin
(:mod:`shoprec.dlq`).  Re-injection sends those exact bytes, with the same
key, back to the topic they came from (or ``--into``), with headers naming
the dead letter they came from.  Every re-injected dead letter is remembered
in Redis (``dlq:reinjected``, kept ``SHOPREC_TOPIC_RETENTION_S`` after the latest
re-injection), so running the same command twice does not send it twice; the
worker's per-event-id dedupe is the second guard for records that were partly applied
before they failed.
"""

from __future__ import annotations

import base64
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, ConsumerRecord

from features import keys
from features.connection import open_redis
from ops.ranges import read_topic
from shoprec.dlq import event_id_of
from shoprec.errors import ReplayError, describe
from shoprec.settings import Settings
from streams.topics import DLQ, kafka_options

log = logging.getLogger("shoprec.dlq")

REINJECTED_KEY = keys.DLQ_REINJECTED


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead letter as read back from the DLQ topic."""

    partition: int
    offset: int
    reason: str
    detail: str
    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None
    original: bytes | None
    dead_lettered_ts: int
    event_id: str | None

    @property
    def ref(self) -> str:
        """Where the letter sits on the DLQ: ``partition:offset``."""
        return f"{self.partition}:{self.offset}"

    def summary(self) -> dict[str, Any]:
        return {
            "dlq": self.ref,
            "reason": self.reason,
            "detail": self.detail[:160],
            "source": f"{self.source_topic}[{self.source_partition}]@{self.source_offset}",
            "key": None if self.key is None else self.key.decode("utf-8", "replace"),
            "event_id": self.event_id,
            "dead_lettered_ts": self.dead_lettered_ts,
        }


def parse_letter(record: ConsumerRecord[Any, Any]) -> Letter | None:
    try:
        doc = orjson.loads(record.value)
        src = doc["source"]
        b64 = doc.get("original_b64")
        original = None if b64 is None else base64.b64decode(b64)
        key = doc.get("key")
        return Letter(
            record.partition,
            record.offset,
            str(doc["reason"]),
            str(doc.get("detail", "")),
            str(src["topic"]),
            int(src["partition"]),
            int(src["offset"]),
            record.key if record.key is not None else (None if key is None else key.encode()),
            original,
            int(doc.get("dead_lettered_ts", record.timestamp)),
            event_id_of(original),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        log.warning("unreadable dead letter at %d:%d", record.partition, record.offset)
        return None


async def read_letters(settings: Settings) -> list[Letter]:
    records = await read_topic(settings, settings.topic(DLQ))
    return [x for r in records if (x := parse_letter(r)) is not None]


def select(
    letters: Sequence[Letter],
    reasons: Sequence[str] = (),
    refs: Sequence[str] = (),
    source_topic: str | None = None,
) -> list[Letter]:
    return [
        x
        for x in letters
        if (not reasons or x.reason in reasons)
        and (not refs or x.ref in refs)
        and (source_topic is None or x.source_topic == source_topic)
    ]


@dataclass(slots=True)
class DlqSummary:
    total: int
    by_reason: dict[str, int]
    by_source_topic: dict[str, int]
    latest: list[dict[str, Any]]


def summarise(letters: Sequence[Letter], latest: int = 20) -> DlqSummary:
    return DlqSummary(
        total=len(letters),
        by_reason=dict(Counter(x.reason for x in letters).most_common()),
        by_source_topic=dict(Counter(x.source_topic for x in letters).most_common()),
        latest=[x.summary() for x in letters[-latest:]],
    )


def show(letter: Letter) -> dict[str, Any]:
    """Everything about one dead letter, the original as text where it is text."""
    try:
        text = None if letter.original is None else letter.original.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return letter.summary() | {
        "detail": letter.detail,
        "original_text": text,
        "original_b64": None
        if letter.original is None
        else base64.b64encode(letter.original).decode(),
        "bytes": None if letter.original is None else len(letter.original),
    }


@dataclass(slots=True)
class ReinjectReport:
    selected: int = 0
    sent: int = 0
    skipped_already_sent: int = 0
    skipped_no_original: int = 0
    dry_run: bool = False
    targets: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def reinject(
    settings: Settings,
    letters: Sequence[Letter],
    into: str | None = None,
    dry_run: bool = False,
    again: bool = False,
) -> ReinjectReport:
    """Send each letter's original record back to its source topic (or ``into``)."""
    report = ReinjectReport(selected=len(letters), dry_run=dry_run)
    redis = open_redis(settings.redis_url, cluster=settings.redis_cluster, timeout_s=10.0)
    producer: AIOKafkaProducer | None = None
    try:
        for letter in letters:
            if letter.original is None:
                report.skipped_no_original += 1
                continue
            marker = f"{settings.topic(DLQ)}:{letter.ref}"
            if not again and await redis.sismember(REINJECTED_KEY, marker):
                report.skipped_already_sent += 1
                continue
            target = into or letter.source_topic
            report.targets[target] = report.targets.get(target, 0) + 1
            if dry_run:
                continue
            if producer is None:
                producer = AIOKafkaProducer(**kafka_options(settings), acks="all")
                await producer.start()
            await producer.send_and_wait(
                target,
                letter.original,
                key=letter.key,
                headers=[("shoprec-reinjected-from", marker.encode())],
            )
            async with redis.pipeline(transaction=False) as pipe:
                pipe.sadd(REINJECTED_KEY, marker)
                # A marker need only outlive its dead letter, which leaves the topic with
                # the retention: then nobody can re-inject it again anyway.
                pipe.expire(REINJECTED_KEY, settings.topic_retention_s)
                await pipe.execute()
            report.sent += 1
            log.info(
                "re-injected dead letter %s to %s",
                letter.ref,
                target,
                extra={"event_id": letter.event_id, "reason": letter.reason},
            )
    except OSError as exc:
        raise ReplayError(
            f"re-injection stopped after {report.sent} records: {describe(exc)}"
        ) from exc
    finally:
        if producer is not None:
            await producer.stop()
        await redis.aclose()
    return report
