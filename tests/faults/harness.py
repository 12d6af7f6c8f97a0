"""What every fault test does: a private stack, a catalogue, a worker, a stream, the books.

``Scenario.started`` (the ``scenario`` fixture) sets all of it up for one test and
tears it down whatever the test did, so a test only arranges its fault, injects it
and checks the invariant.

The books close the same way in every test: each input record is counted once
in the worker's final counters, read from its metrics endpoint (``events_in`` =
recommended + dead-lettered + duplicates + rate-limited + coalesced), records seen
twice (redelivered after a fault) are exactly the ``duplicates``, and Redis holds
each good event exactly once: the per-user event counts add up to the good events sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord

from features import keys
from features.catalog import upsert_items
from features.connection import open_redis
from infra.stack import Endpoints, Stack
from ranking.client import RankerClient
from shoprec.events import CatalogItem, Limits, parse_catalog_item
from shoprec.settings import Settings
from streams.lag import LagProbe, group_lag
from streams.topics import TopicNames, ensure_topics, kafka_options
from tests.worker import WorkerProcess

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "rees46-sample"
BUCKETS = ("recommended", "dead_lettered", "duplicates", "rate_limited", "coalesced")

T = TypeVar("T")
Action = Callable[[], Awaitable[object]]


# --- the real data ----------------------------------------------------------------


def load_events(n: int) -> list[dict[str, Any]]:
    """The first ``n`` real rees46 events (views, carts, purchases)."""
    with gzip.open(DATA / "events.jsonl.gz", "rb") as fh:
        return [orjson.loads(line) for _, line in zip(range(n), fh, strict=False)]


def load_items(item_ids: set[str]) -> list[CatalogItem]:
    with gzip.open(DATA / "items.jsonl.gz", "rb") as fh:
        raw = [orjson.loads(line) for line in fh]
    limits = Limits()
    return [
        parse_catalog_item(r["item_id"].encode(), orjson.dumps(r), limits=limits)
        for r in raw
        if r["item_id"] in item_ids
    ]


@dataclass
class Catalogue:
    """Items embedded once by the real BERT on Triton; written to Redis again after a wipe."""

    items: list[CatalogItem]
    vectors: list[Any]

    @classmethod
    async def embed(cls, triton_url: str, items: list[CatalogItem]) -> Catalogue:
        texts = sorted({i.text() for i in items if i.text()})
        by_text: dict[str, Any] = {}
        async with RankerClient(triton_url, timeout_s=60.0) as ranker:
            # A few requests at a time: thousands at once would queue past the timeout.
            for start in range(0, len(texts), 256):
                chunk = texts[start : start + 256]
                by_text |= dict(zip(chunk, await ranker.encode(chunk), strict=True))
        # As the catalogue agent does: one vector per distinct text, none without text.
        return cls(items, [by_text.get(i.text()) for i in items])

    async def ensure_in(self, redis_url: str, cluster: bool = False) -> None:
        redis = open_redis(redis_url, cluster=cluster)
        try:
            if await redis.xlen(keys.ITEM_LOG) < len(self.items):
                await upsert_items(redis, self.items, self.vectors)
        finally:
            await redis.aclose()


# --- one scenario: isolated topics and state, a worker, a stream --------------------


@dataclass
class FaultStack:
    stack: Stack
    endpoints: Endpoints
    catalogue: Catalogue
    logs: Path

    def healthy(self) -> dict[str, bool]:
        return {role: entry["healthy"] for role, entry in self.stack.status().items()}

    def restore(self) -> None:
        """Start whatever a test left stopped (so the next test finds the whole stack)."""
        for role, ok in self.healthy().items():
            if not ok:
                with contextlib.suppress(Exception):
                    self.stack.stop_component(role)
                self.stack.start_component(role, timeout_s=300)
        asyncio.run(
            self.catalogue.ensure_in(self.endpoints.redis_url, self.endpoints.redis_cluster)
        )


def scenario_settings(endpoints: Endpoints, **overrides: Any) -> Settings:
    """Fresh topics, consumer group and Redis state prefix; every event emits (no interval)."""
    tag = uuid.uuid4().hex[:8]
    base: dict[str, Any] = {
        "kafka_bootstrap": endpoints.kafka_bootstrap,
        "redis_url": endpoints.redis_url,
        "triton_url": endpoints.triton_url,
        "redis_cluster": endpoints.redis_cluster,
        "kafka_replication_factor": endpoints.kafka_replication_factor,
        "topic_prefix": f"f{tag}.",
        "app_id": f"shoprec-fault-{tag}",
        "state_prefix": f"f{tag}:",
        "min_emit_interval_ms": 0,
        "topic_partitions": 4,
        "metrics_port": 0,
    }
    return Settings(_env_file=None, **(base | overrides))  # type: ignore[call-arg]


def live(events: Sequence[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    """The events with unique ids for this run (ts is stamped at send time)."""
    return [dict(e, event_id=f"{tag}-{i}") for i, e in enumerate(events)]


@dataclass
class Sent:
    good: int = 0
    bad: int = 0
    failed_sends: int = 0  # producer deliveries that failed and were sent again


async def start_producer(settings: Settings) -> AIOKafkaProducer:
    # Not idempotent, like most shop producers: a send retried across a broker restart
    # may be written twice, and the worker must count the copy as a duplicate.
    producer = AIOKafkaProducer(
        **kafka_options(settings), acks="all", linger_ms=2, request_timeout_ms=10_000
    )
    await producer.start()
    return producer


async def send_paced(
    producer: AIOKafkaProducer,
    names: TopicNames,
    events: Sequence[dict[str, Any]],
    rate: float,
    sent: Sent,
    *,
    on_sent: Callable[[int], Any] | None = None,
) -> None:
    """Send ``events`` at ``rate`` events/s, stamping each with the current time;
    deliveries that fail (broker away) are sent again until they land."""
    start = time.monotonic()
    pending: list[tuple[dict[str, Any], asyncio.Future[Any]]] = []
    for i, event in enumerate(events):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        event["ts"] = int(time.time() * 1000)
        pending.append((event, await _send(producer, names, event)))
        if on_sent is not None:
            await on_sent(i + 1)
    deadline = time.monotonic() + 180
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} events could not be delivered"
        retry = []
        for event, fut in pending:
            try:
                await fut
            except Exception:
                sent.failed_sends += 1
                retry.append(event)
        pending = []
        for event in retry:
            await asyncio.sleep(0.5)
            pending.append((event, await _send(producer, names, event)))
    sent.good += len(events)


async def _send(
    producer: AIOKafkaProducer, names: TopicNames, event: dict[str, Any]
) -> asyncio.Future[Any]:
    deadline = time.monotonic() + 180
    while True:
        assert time.monotonic() < deadline, "the producer could not send for 3 minutes"
        try:
            fut: asyncio.Future[Any] = await producer.send(
                names.event_topic(event["type"]),
                orjson.dumps(event),
                key=str(event["user_id"]).encode(),
            )
            return fut
        except Exception:  # buffer full or no metadata while the broker is away
            await asyncio.sleep(0.5)


class Collector:
    """Reads ``recs.out`` and ``recs.dlq`` from the beginning, in the background."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = TopicNames.from_settings(settings)
        self.recs: list[dict[str, Any]] = []
        self.dead: list[ConsumerRecord[bytes, bytes]] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def __aenter__(self) -> Collector:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            consumer = AIOKafkaConsumer(
                self.names.recs_out,
                self.names.dlq,
                **kafka_options(self.settings),
                group_id=None,
                auto_offset_reset="earliest",
            )
            try:
                await consumer.start()
                # Positions survive reconnects inside one consumer; a new one after a
                # failure starts over, so keep what was read and skip it again.
                skip = {self.names.recs_out: len(self.recs), self.names.dlq: len(self.dead)}
                seen = {self.names.recs_out: 0, self.names.dlq: 0}
                while not self._stop.is_set():
                    batch = await consumer.getmany(timeout_ms=200)
                    for tp, records in sorted(batch.items(), key=lambda kv: kv[0].partition):
                        for r in records:
                            seen[tp.topic] += 1
                            if seen[tp.topic] <= skip[tp.topic]:
                                continue
                            if tp.topic == self.names.dlq:
                                self.dead.append(r)
                            else:
                                self.recs.append(orjson.loads(r.value or b"{}"))
            except Exception:
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()

    def trigger_ids(self) -> set[str]:
        return {r["trigger"]["event_id"] for r in self.recs}


async def worker_group_lag(settings: Settings) -> int:
    """Input records the worker group has not committed yet, over every partition."""
    return await group_lag(settings, settings.app_id, TopicNames.from_settings(settings).events)


async def worker_group_committed(settings: Settings) -> int:
    """Input records the worker group has committed, over every partition (the private
    stack's topics start empty, so a committed offset is a count)."""
    admin = AIOKafkaAdminClient(**kafka_options(settings))
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(settings.app_id)
    finally:
        await admin.close()
    events = set(TopicNames.from_settings(settings).events)
    return sum(max(0, m.offset) for tp, m in offsets.items() if tp.topic in events)


async def wait_caught_up(
    settings: Settings, worker: WorkerProcess, collector: Collector, timeout_s: float = 180.0
) -> float:
    """Seconds until the group has committed every input record and the output is quiet."""
    start = time.monotonic()
    quiet_since, last = time.monotonic(), -1
    topics = TopicNames.from_settings(settings).events
    lag: dict[tuple[str, int], int] = {}
    while time.monotonic() - start < timeout_s:
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited ({worker.proc.returncode}):\n{worker.tail()}")
        n = len(collector.recs) + len(collector.dead)
        if n != last:
            quiet_since, last = time.monotonic(), n
        with contextlib.suppress(Exception):
            async with LagProbe(settings, settings.app_id, topics) as probe:
                lag = await probe.per_partition()
            if sum(lag.values()) == 0 and time.monotonic() - quiet_since > 2.0:
                return time.monotonic() - start
        await asyncio.sleep(0.5)
    # Which partitions stopped, and by how much: one partition whose commit waits (the
    # worker's log then says why) looks different from a worker behind everywhere.
    lagging = {f"{t}[{p}]": n for (t, p), n in sorted(lag.items()) if n}
    raise AssertionError(
        f"not caught up in {timeout_s:.0f} s; records not committed per partition "
        f"(last probe): {lagging}\n{worker.tail()}"
    )


async def state_event_counts(settings: Settings, users: set[str]) -> dict[str, int]:
    """Events folded into each user's state (the ``n`` of ``{u:<id>}:meta``)."""
    redis = open_redis(settings.redis_url, cluster=settings.redis_cluster)
    token = keys.STATE_PREFIX.set(settings.state_prefix)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for u in sorted(users):
                pipe.hget(keys.user_meta(u), "n")
            counts = await pipe.execute()
    finally:
        keys.STATE_PREFIX.reset(token)
        await redis.aclose()
    return {u: int(c or 0) for u, c in zip(sorted(users), counts, strict=True)}


def assert_books_balance(stats: dict[str, Any], records_in: int) -> None:
    """Every record in one bucket; anything counted beyond the input is a redelivery."""
    assert stats["events_in"] == sum(stats[b] for b in BUCKETS), stats
    assert stats["events_in"] - stats["duplicates"] == records_in, (stats, records_in)


async def prepare(settings: Settings) -> TopicNames:
    await ensure_topics(settings)
    return TopicNames.from_settings(settings)


def count_users(events: Sequence[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in events:
        out[str(e["user_id"])] = out.get(str(e["user_id"]), 0) + 1
    return out


# --- a started scenario: everything a fault test needs before it breaks something ---


@dataclass
class Scenario:
    """One test's run on the private stack: its own topics, group and state prefix, the
    workers, a producer, the collected output, and the books of what was sent."""

    faults: FaultStack
    settings: Settings
    names: TopicNames
    logs: Path
    producer: AIOKafkaProducer
    out: Collector
    workers: list[WorkerProcess]
    tasks: list[asyncio.Task[Any]]
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    sent: Sent = field(default_factory=Sent)
    streamed: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    @contextlib.asynccontextmanager
    async def started(
        cls, faults: FaultStack, logs: Path, **overrides: Any
    ) -> AsyncIterator[Scenario]:
        """Topics made, one worker ready, the producer and the collector running; on the way
        out, whether the test passed or not: the collector and producer stopped, faults
        still in progress finished (so the stack can be restored), live workers killed."""
        settings = scenario_settings(faults.endpoints, **overrides)
        names = await prepare(settings)
        workers: list[WorkerProcess] = []
        tasks: list[asyncio.Task[Any]] = []
        async with contextlib.AsyncExitStack() as cleanup:
            cleanup.callback(_kill_running, workers)
            cleanup.push_async_callback(_settle, tasks)
            workers.append(WorkerProcess(settings, logs / "worker.log"))
            await workers[0].ready()
            producer = await start_producer(settings)
            cleanup.push_async_callback(producer.stop)
            out = await cleanup.enter_async_context(Collector(settings))
            yield cls(faults, settings, names, logs, producer, out, workers, tasks)

    @property
    def worker(self) -> WorkerProcess:
        """The worker the scenario started with."""
        return self.workers[0]

    def events(self, n: int) -> list[dict[str, Any]]:
        """The first ``n`` real events, with event ids unique to this scenario."""
        return live(load_events(n), self.tag)

    def start_worker(self, name: str) -> WorkerProcess:
        """Another worker in the same group, logging to ``<name>.log``; not waited for."""
        worker = WorkerProcess(self.settings, self.logs / f"{name}.log")
        self.workers.append(worker)
        return worker

    def background(self, work: Awaitable[T]) -> asyncio.Task[T]:
        """Run ``work`` beside the test; the teardown waits for it if the test does not."""
        task = asyncio.ensure_future(work)
        self.tasks.append(task)
        return task

    async def stream(
        self,
        events: Sequence[dict[str, Any]],
        rate: float,
        *,
        at: Mapping[int, Action] | None = None,
        meanwhile: Mapping[int, Action] | None = None,
    ) -> None:
        """Send ``events`` at ``rate`` events/s until each is delivered. Once the n-th is
        sent, ``at[n]`` runs with the stream paused and ``meanwhile[n]`` starts beside it;
        this returns when those have finished too."""
        started: list[asyncio.Task[object]] = []

        async def on_sent(n: int) -> None:
            if meanwhile and n in meanwhile:
                started.append(self.background(meanwhile[n]()))
            if at and n in at:
                await at[n]()

        # No callback unless asked: at hundreds of events/s each await costs.
        hook = on_sent if at or meanwhile else None
        await send_paced(self.producer, self.names, events, rate, self.sent, on_sent=hook)
        self.streamed.extend(events)
        await asyncio.gather(*started)

    async def caught_up(
        self, timeout_s: float = 180.0, worker: WorkerProcess | None = None
    ) -> float:
        """Seconds until the group committed every input record and the output went quiet;
        ``worker`` (the first by default) must stay alive meanwhile."""
        return await wait_caught_up(self.settings, worker or self.worker, self.out, timeout_s)

    async def lag(self) -> int:
        return await worker_group_lag(self.settings)

    async def applied_past_commit(self, worker: WorkerProcess) -> int:
        """Input records ``worker`` has applied that its group has not committed yet: what
        the next worker reads again if this one dies now."""
        applied = (await asyncio.to_thread(worker.counters))["events_in"]
        return int(applied) - await worker_group_committed(self.settings)

    async def stop_component(self, role: str) -> None:
        await asyncio.to_thread(self.faults.stack.stop_component, role)

    async def start_component(self, role: str, timeout_s: float) -> None:
        await asyncio.to_thread(self.faults.stack.start_component, role, timeout_s)

    async def bounce(self, role: str, away_s: float, start_timeout_s: float) -> None:
        """Stop ``role``, leave it down for ``away_s`` while events keep coming, start it."""
        await self.stop_component(role)
        await asyncio.sleep(away_s)
        await self.start_component(role, start_timeout_s)

    async def state_counts(self, events: Sequence[dict[str, Any]]) -> dict[str, int]:
        """Events folded into the state of each user of ``events``."""
        return await state_event_counts(self.settings, set(count_users(events)))

    async def assert_in_state_once(self, events: Sequence[dict[str, Any]]) -> None:
        """Each of ``events`` folded into its user's state exactly once."""
        counts, expected = await self.state_counts(events), count_users(events)
        assert counts == expected, {
            u: (counts[u], n) for u, n in expected.items() if counts[u] != n
        }


def _kill_running(workers: Sequence[WorkerProcess]) -> None:
    for worker in workers:
        if worker.proc.poll() is None:
            worker.kill()


async def _settle(tasks: Sequence[asyncio.Task[Any]]) -> None:
    # A component half way through its restart must finish before the stack is restored.
    await asyncio.gather(*tasks, return_exceptions=True)
