"""Offset ranges of retained topics, and reading them back in a reproducible order.

The operator tools (replay, rebuild-state, diff, dlq, inspect) read fixed
ranges with a plain aiokafka consumer, manually assigned, never a consumer
group: reading history must not move the live worker's offsets.

* :func:`plan_ranges` turns "these topics, from this time or offset to that
  one" into ``[start, end)`` per partition, looking times up in the broker's
  time index (``ListOffsets`` by timestamp).  Brokers without one (Tansu) are
  refused with the offset form to use instead.
* :class:`MergedReader` yields the records of several partitions merged by
  record timestamp (ties by topic, partition, offset), in batches of a fixed
  size: the same range always gives the same batches, so two replays of it
  make the same decisions.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from shoprec.errors import ConfigError, DependencyUnavailable, ReplayError, describe
from shoprec.settings import Settings
from streams.topics import kafka_options, partitions_of

FETCH_MAX_RECORDS = 5000


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """Offsets ``[start, end)`` of one partition."""

    topic: str
    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


# --- parsing what the operator typed --------------------------------------------------------

_RELATIVE = re.compile(r"^(?:now)?\s*-\s*(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_time(text: str, now_ms: int) -> int:
    """Milliseconds since the epoch from ``2026-11-25T14:00``, ``2026-11-25 14:00:00+01:00``
    (no zone = UTC), ``1764079200000`` (epoch ms), ``now`` or ``-2h`` / ``now-30m``."""
    t = text.strip().lower()
    if t == "now":
        return now_ms
    if m := _RELATIVE.match(t):
        return now_ms - int(float(m.group(1)) * _UNIT_MS[m.group(2)])
    if t.isdigit():
        return int(t)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"cannot read time {text!r}: use ISO 8601 (2026-11-25T14:00, UTC unless a zone "
            "is given), epoch milliseconds, 'now' or a relative '-2h' (s, m, h, d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def parse_offsets(text: str) -> dict[tuple[str | None, int], int]:
    """``0:100,1:250`` (partition:offset, for every topic) or ``shop.views:0:100``."""
    out: dict[tuple[str | None, int], int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        *topic, partition, offset = ["", "", *part.rsplit(":", 2)][-3:]
        if not (partition.isdigit() and offset.isdigit()):
            raise ConfigError(
                f"cannot read offset {part!r}: use PARTITION:OFFSET or TOPIC:PARTITION:OFFSET, "
                "comma-separated (e.g. 0:1200,1:1180)"
            )
        out[(topic[0] or None, int(partition))] = int(offset)
    return out


@dataclass(frozen=True, slots=True)
class RangeSpec:
    """What to read: topics (full names) and either a time window or offsets."""

    topics: tuple[str, ...]
    from_ms: int | None = None
    to_ms: int | None = None
    from_offsets: Mapping[tuple[str | None, int], int] | None = None
    to_offsets: Mapping[tuple[str | None, int], int] | None = None

    def __post_init__(self) -> None:
        if not self.topics:
            raise ConfigError("name at least one topic (--topic)")
        by_time = self.from_ms is not None or self.to_ms is not None
        by_offset = self.from_offsets is not None or self.to_offsets is not None
        if by_time and by_offset:
            raise ConfigError("give a time range (--from/--to) or offsets, not both")

    @property
    def by_time(self) -> bool:
        return self.from_ms is not None or self.to_ms is not None


def _lookup(offsets: Mapping[tuple[str | None, int], int], tp: TopicPartition) -> int | None:
    hit = offsets.get((tp.topic, tp.partition))
    return offsets.get((None, tp.partition)) if hit is None else hit


# --- planning -------------------------------------------------------------------------------


async def open_reader(settings: Settings) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        **kafka_options(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=FETCH_MAX_RECORDS,
        fetch_max_bytes=16 * 1024 * 1024,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    try:
        await consumer.start()
    except Exception as exc:
        await consumer.stop()
        raise DependencyUnavailable(
            f"cannot reach Kafka at {settings.kafka_bootstrap}: {describe(exc)} "
            "(SHOPREC_KAFKA_BOOTSTRAP)"
        ) from exc
    return consumer


async def plan_ranges(consumer: AIOKafkaConsumer, spec: RangeSpec) -> list[PartitionRange]:
    """``[start, end)`` per partition; the end is fixed now, so a replay always terminates."""
    tps = await partitions_of(consumer, spec.topics)
    begin = await consumer.beginning_offsets(tps)
    end = await consumer.end_offsets(tps)
    starts, ends = dict(begin), dict(end)
    if spec.by_time:
        if spec.from_ms is not None:
            starts = await _offsets_at(consumer, tps, spec.from_ms, end)
        if spec.to_ms is not None:
            ends = await _offsets_at(consumer, tps, spec.to_ms, end)
    else:
        chosen = tps
        if spec.from_offsets is not None:
            chosen = [tp for tp in tps if _lookup(spec.from_offsets, tp) is not None]
            if not chosen:
                raise ReplayError(f"--from-offset names no partition of {', '.join(spec.topics)}")
            starts |= {tp: _lookup(spec.from_offsets, tp) or 0 for tp in chosen}
        if spec.to_offsets is not None:
            ends |= {tp: o for tp in tps if (o := _lookup(spec.to_offsets, tp)) is not None}
        tps = chosen
    return [
        PartitionRange(
            tp.topic,
            tp.partition,
            max(starts[tp], begin[tp]),
            min(ends[tp], end[tp]),
        )
        for tp in tps
    ]


async def _offsets_at(
    consumer: AIOKafkaConsumer,
    tps: Sequence[TopicPartition],
    ts_ms: int,
    end: Mapping[TopicPartition, int],
) -> dict[TopicPartition, int]:
    """The first offset at or after ``ts_ms`` per partition (the end when there is none)."""
    try:
        found = await consumer.offsets_for_times({tp: ts_ms for tp in tps})
    except Exception as exc:
        raise ReplayError(
            f"the broker cannot look offsets up by time ({type(exc).__name__}: {exc}); "
            "Tansu keeps no time index. Give offsets instead: --from-offset P:O "
            "[--to-offset P:O] (`shoprec recs tail` and `shoprec dlq list` show offsets)"
        ) from exc
    offsets = {tp: end[tp] if found.get(tp) is None else found[tp].offset for tp in tps}
    await _check_time_index(consumer, offsets, ts_ms, end)
    return offsets


async def _check_time_index(
    consumer: AIOKafkaConsumer,
    offsets: Mapping[TopicPartition, int],
    ts_ms: int,
    end: Mapping[TopicPartition, int],
) -> None:
    """Refuse an answer the records contradict: a broker without a time index (Tansu)
    answers ListOffsets-by-time with some offset anyway, and a replay of the wrong range
    is worse than none."""
    for tp, offset in offsets.items():
        at = await _record_ts(consumer, tp, offset) if offset < end[tp] else None
        before = await _record_ts(consumer, tp, offset - 1) if offset > 0 else None
        if (at is not None and at < ts_ms) or (before is not None and before >= ts_ms):
            raise ReplayError(
                f"the broker answered offset {offset} of {tp.topic}[{tp.partition}] for time "
                f"{ts_ms}, but the records there say otherwise (record times {before}, {at}): "
                "it keeps no usable time index (Tansu does not). Give offsets instead: "
                "--from-offset P:O [--to-offset P:O]"
            )


async def _record_ts(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> int | None:
    """The timestamp of the record at ``offset`` (None when it is gone: retention, compaction)."""
    consumer.assign([tp])
    consumer.seek(tp, offset)
    data = await consumer.getmany(tp, timeout_ms=5000, max_records=1)
    records = data.get(tp, [])
    return int(records[0].timestamp) if records and records[0].offset == offset else None


# --- reading --------------------------------------------------------------------------------


class MergedReader:
    """The records of ``ranges`` from ``positions`` on, merged by timestamp, in fixed batches."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        ranges: Sequence[PartitionRange],
        positions: Mapping[TopicPartition, int] | None = None,
    ) -> None:
        self._consumer = consumer
        self._end = {r.tp: r.end for r in ranges}
        pos = dict(positions or {})
        self._next = {r.tp: max(r.start, pos.get(r.tp, r.start)) for r in ranges}
        self._buffers: dict[TopicPartition, deque[ConsumerRecord[Any, Any]]] = {
            r.tp: deque() for r in ranges
        }
        self._active = {tp for tp, n in self._next.items() if n < self._end[tp]}

    @property
    def positions(self) -> dict[TopicPartition, int]:
        """Next offset to process per partition (everything before it was handed out)."""
        return dict(self._next)

    @property
    def remaining(self) -> int:
        return sum(max(0, self._end[tp] - n) for tp, n in self._next.items())

    async def start(self) -> None:
        self._consumer.assign(list(self._buffers))
        for tp, offset in self._next.items():
            self._consumer.seek(tp, offset)

    async def batches(self, size: int) -> AsyncIterator[list[ConsumerRecord[Any, Any]]]:
        batch: list[ConsumerRecord[Any, Any]] = []
        while (record := await self._pop()) is not None:
            batch.append(record)
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch

    async def _pop(self) -> ConsumerRecord[Any, Any] | None:
        # Only when every unfinished partition has a record buffered is the smallest head
        # the true next record: that is what makes the order independent of fetch timing.
        while starved := [tp for tp in self._active if not self._buffers[tp]]:
            await self._fill(starved)
        heads = [tp for tp, buf in self._buffers.items() if buf]
        if not heads:
            return None
        tp = min(heads, key=lambda t: (self._buffers[t][0].timestamp, t.topic, t.partition))
        record = self._buffers[tp].popleft()
        self._next[tp] = record.offset + 1
        if not self._buffers[tp] and tp not in self._active:
            self._next[tp] = max(self._next[tp], self._end[tp])
        return record

    async def _fill(self, tps: Sequence[TopicPartition]) -> None:
        data = await self._consumer.getmany(*tps, timeout_ms=1000)
        for tp in tps:
            end = self._end[tp]
            for record in data.get(tp, ()):
                if record.offset < end:
                    self._buffers[tp].append(record)
            # Offsets may have gaps (compaction, transaction markers): the position says
            # whether anything below the end is left.
            if await self._consumer.position(tp) >= end:
                self._active.discard(tp)
                if not self._buffers[tp]:
                    self._next[tp] = max(self._next[tp], end)


async def read_topic(
    settings: Settings, topic: str, keys: frozenset[bytes] | None = None
) -> list[ConsumerRecord[Any, Any]]:
    """Every retained record of ``topic`` up to its end now (optionally only ``keys``)."""
    consumer = await open_reader(settings)
    try:
        ranges = await plan_ranges(consumer, RangeSpec((topic,)))
        reader = MergedReader(consumer, ranges)
        await reader.start()
        out: list[ConsumerRecord[Any, Any]] = []
        async for batch in reader.batches(FETCH_MAX_RECORDS):
            out.extend(r for r in batch if keys is None or r.key in keys)
        return out
    finally:
        await consumer.stop()
