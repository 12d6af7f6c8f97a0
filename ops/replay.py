"""Replay: re-read a retained range of the event topics through the live pipeline.

The range goes through :meth:`streams.runtime.Runtime.handle_events`, the very code
the ingest agent runs, driven by a plain consumer over fixed offsets
(:mod:`ops.ranges`).  What it writes is kept away from production by
default: recommendations go to a replay topic (``recs.replay``), never
``recs.out``, so the push service is not flooded; state goes under a shadow
key prefix (``replay:``), never the live keys, so live users are not
disturbed.  Writing to either live target needs ``allow_live``.

Safe to interrupt: after each batch is processed and its recommendations are
acknowledged by the broker, the next offsets are checkpointed in Redis (under
the shadow prefix, keyed by what was asked); running the same request again
resumes there.  A batch cut off half-way is processed again, which changes
nothing: user updates are idempotent per event id.  For the same reason a
second replay of the same range into the same prefix leaves the state as it
was (and emits nothing: every event is a duplicate); use a fresh prefix, or
``restart`` after deleting it, to recompute.

Users erased by ``shoprec forget-user`` stay erased: the runtime's ingest skips their
events from before the erase (``features.forget``; counted in ``suppressed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import orjson
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from redis.asyncio import Redis

from features import keys
from features.connection import open_redis
from ops.ranges import MergedReader, PartitionRange, RangeSpec, open_reader, plan_ranges
from shoprec.errors import ReplayError
from shoprec.settings import Settings
from streams.ingest import RawRecord
from streams.runtime import Runtime
from streams.topics import RECS_OUT, kafka_options

log = logging.getLogger("shoprec.replay")

DEFAULT_STATE_PREFIX = "replay:"
CHECKPOINT_TTL_S = 7 * 86_400
TOPIC_EXISTS = 36


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    spec: RangeSpec
    into: str  # full topic name for the recommendations
    state_prefix: str = DEFAULT_STATE_PREFIX
    rate: float | None = None  # events per second at most
    users: frozenset[str] | None = None  # only these users' events
    limit: int | None = None  # stop after this many records (resume later)
    restart: bool = False  # ignore a checkpoint of an earlier run
    allow_live: bool = False  # may write recs.out or the live state

    def run_id(self) -> str:
        """Names the request, so running it again finds its checkpoint."""
        s = self.spec
        doc = {
            "topics": sorted(s.topics),
            "from_ms": s.from_ms,
            "to_ms": s.to_ms,
            "from": sorted(map(str, (s.from_offsets or {}).items())),
            "to": sorted(map(str, (s.to_offsets or {}).items())),
            "into": self.into,
            "prefix": self.state_prefix,
            "users": sorted(self.users or ()),
        }
        return hashlib.sha1(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


@dataclass(slots=True)
class ReplayReport:
    run_id: str
    into: str
    state_prefix: str
    ranges: list[dict[str, Any]]
    planned: int  # records in the ranges
    resumed_from: int = 0  # records already done by an earlier, interrupted run
    read: int = 0
    processed: int = 0  # read minus those of other users (--users)
    recommendations: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    suppressed: int = 0  # events of erased users from before their erase: skipped
    seconds: float = 0.0
    complete: bool = False
    dry_run: bool = False
    writes: list[str] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        return self.read / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"events_per_s": round(self.events_per_s, 1)}


def check_targets(settings: Settings, req: ReplayRequest) -> None:
    """Refuse the live output or the live state unless asked for explicitly."""
    if req.allow_live:
        return
    if req.into == settings.topic(RECS_OUT):
        raise ReplayError(
            f"--into {req.into} is the live output: the push service would send every "
            "replayed recommendation again. Pick another topic, or add --live if you mean it."
        )
    if req.state_prefix == settings.state_prefix:
        raise ReplayError(
            f"--state-prefix {req.state_prefix!r} is the live state: replayed events would "
            "change what live users are recommended. Pick a shadow prefix, or add --live."
        )
    if any(c in req.state_prefix for c in "{} "):
        raise ReplayError("--state-prefix must not contain braces or spaces (hash tags)")


class Checkpoint:
    """Next offsets per partition of one replay request, plus its planned ends."""

    def __init__(self, redis: Redis, state_prefix: str, run_id: str) -> None:
        self._redis = redis
        self.key = keys.replay_checkpoint(state_prefix, run_id)

    async def load(self) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
        raw = cast(dict[bytes, bytes], await self._redis.hgetall(self.key))
        positions: dict[TopicPartition, int] = {}
        ends: dict[TopicPartition, int] = {}
        for k, v in raw.items():
            kind, topic, partition = k.decode().split("|")
            tp = TopicPartition(topic, int(partition))
            (positions if kind == "pos" else ends)[tp] = int(v)
        return positions, ends

    async def save(
        self, positions: dict[TopicPartition, int], ends: dict[TopicPartition, int] | None = None
    ) -> None:
        mapping = {f"pos|{tp.topic}|{tp.partition}": n for tp, n in positions.items()}
        mapping |= {f"end|{tp.topic}|{tp.partition}": n for tp, n in (ends or {}).items()}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key, mapping=mapping)  # type: ignore[arg-type]
            pipe.expire(self.key, CHECKPOINT_TTL_S)
            await pipe.execute()

    async def clear(self) -> None:
        await self._redis.delete(self.key)


def _raw(record: ConsumerRecord[Any, Any]) -> RawRecord:
    return RawRecord(record.topic, record.partition, record.offset, record.key, record.value)


class _Pacer:
    """Holds the average rate to ``rate`` events/s (open loop from the start)."""

    def __init__(self, rate: float | None) -> None:
        self._rate = rate
        self._start = time.monotonic()
        self._sent = 0

    async def account(self, n: int, stop: asyncio.Event | None = None) -> None:
        """Sleep until the next batch is due, or until ``stop`` is set."""
        self._sent += n
        if self._rate:
            due = self._start + self._sent / self._rate
            delay = max(0.0, due - time.monotonic())
            if stop is None:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)


async def replay(
    settings: Settings,
    req: ReplayRequest,
    *,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> ReplayReport:
    """Run (or, with ``dry_run``, only plan) one replay; see the module docstring.

    ``stop`` (set by the CLI's Ctrl-C handler) ends the run after the batch in hand is
    published and checkpointed, with :class:`KeyboardInterrupt`: the same command resumes.
    """
    check_targets(settings, req)
    shadow = settings.model_copy(update={"state_prefix": req.state_prefix})
    consumer = await open_reader(settings)
    redis = open_redis(settings.redis_url, cluster=settings.redis_cluster, timeout_s=10.0)
    try:
        ranges = await plan_ranges(consumer, req.spec)
        checkpoint = Checkpoint(redis, req.state_prefix, req.run_id())
        if req.restart and not dry_run:
            await checkpoint.clear()
        positions, ends = ({}, {}) if req.restart else await checkpoint.load()
        # A resumed run keeps the ends of the first one, so "the same range" stays the same.
        ranges = [
            PartitionRange(r.topic, r.partition, r.start, ends.get(r.tp, r.end)) for r in ranges
        ]
        reader = MergedReader(consumer, ranges, positions)
        planned = sum(r.size for r in ranges)
        report = ReplayReport(
            run_id=req.run_id(),
            into=req.into,
            state_prefix=req.state_prefix,
            ranges=[asdict(r) for r in ranges],
            planned=planned,
            resumed_from=planned - reader.remaining,
            dry_run=dry_run,
            writes=[
                f"recommendations -> topic {req.into}",
                f"state -> Redis keys {req.state_prefix}{{u:<user>}}:*, "
                f"{req.state_prefix}{{i:<item>}}:cv, {req.state_prefix}{{i:<item>}}:cb, "
                f"{req.state_prefix}pop:*",
                f"checkpoint -> Redis {checkpoint.key}",
            ],
        )
        if dry_run:
            return report
        await ensure_topic(settings, req.into)
        await checkpoint.save(reader.positions, {r.tp: r.end for r in ranges})
        await _run(shadow, req, reader, checkpoint, report, progress, stop)
        return report
    finally:
        await consumer.stop()
        await redis.aclose()


async def _run(
    shadow: Settings,
    req: ReplayRequest,
    reader: MergedReader,
    checkpoint: Checkpoint,
    report: ReplayReport,
    progress: Callable[[int, int], None] | None,
    stop: asyncio.Event | None = None,
) -> None:
    # Behavioural item embeddings are written to the live item hashes (catalogue, never
    # prefixed) from co-visitation: computed from the shadow's, they would leak into live
    # retrieval.  The live worker keeps them; a replay only reads them.
    runtime = Runtime(shadow, write_behavioural=False)
    await runtime.ensure_open()
    producer = AIOKafkaProducer(**kafka_options(shadow), acks="all", linger_ms=5)
    await producer.start()
    wanted = None if req.users is None else {u.encode() for u in req.users}
    pacer = _Pacer(req.rate)
    start = time.monotonic()
    try:
        await reader.start()
        async for batch in reader.batches(shadow.batch_max):
            records = [_raw(r) for r in batch if wanted is None or r.key in wanted]
            recs, dead = (
                await runtime.handle_events_isolating_failures(records) if records else ([], [])
            )
            sends = [
                await producer.send(req.into, r.to_json(), key=r.user_id.encode()) for r in recs
            ]
            await asyncio.gather(*sends)  # acknowledged before the checkpoint moves on
            await runtime.confirm_published(recs)
            await checkpoint.save(reader.positions)
            report.read += len(batch)
            report.processed += len(records)
            report.recommendations += len(recs)
            report.dead_letters += len(dead)
            report.seconds = time.monotonic() - start
            if progress is not None:
                progress(len(batch), reader.remaining)
            if req.limit is not None and report.read >= req.limit:
                break
            # Between batches, never inside one: what was read is published and
            # checkpointed, so a resumed run neither skips nor repeats a record.
            # (A cancellation landing inside a Triton or Redis call could be taken for
            # that call's failure and ignored: seen once in CI, the replay ran to its end.)
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt
            await pacer.account(len(batch), stop)
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt
        report.complete = reader.remaining == 0
        report.duplicates = runtime.stats.duplicates
        report.suppressed = runtime.stats.suppressed
    finally:
        report.seconds = time.monotonic() - start
        await producer.stop()
        await runtime.close()
    log.info("replay %s: %s", report.run_id, report.to_dict() | {"ranges": len(report.ranges)})


async def ensure_topic(settings: Settings, topic: str) -> None:
    """Create the output topic when missing, partitioned like shoprec's own."""
    admin = AIOKafkaAdminClient(**kafka_options(settings), request_timeout_ms=15_000)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(topic, settings.topic_partitions, settings.kafka_replication_factor)]
        )
        for name, code, *_ in response.topic_errors:
            if code not in (0, TOPIC_EXISTS):
                raise ReplayError(f"cannot create topic {name}: Kafka error code {code}")
    finally:
        await admin.close()
