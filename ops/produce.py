"""Stream a dataset in the canonical format of ``../shared/data`` onto the input topics.

The catalogue goes first (``items.jsonl.gz`` → ``catalog.items``, key item id),
then the events (``events.jsonl.gz``, already sorted by event time) to the topic
of their type, key user id; events of one timestamp go in the order of a hash of
their id (:func:`shoprec.events.tie_break`), never the file's (the amazon data lists
one user's same-day events by item id).  Pacing: ``rate`` events/s, or the recorded gaps
divided by ``speedup``, or as fast as the broker takes them.  By default each
event is re-timed to the moment it is sent, so the stream looks live: latency
is then measured from a real send time and the worker's future-time guard
holds.  ``retime=False`` keeps the recorded event times (replays of history).
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from features import keys
from features.connection import open_redis
from shoprec.errors import DatasetError, StackError
from shoprec.events import tie_break
from shoprec.settings import Settings
from streams.topics import TopicNames, kafka_options

log = logging.getLogger("shoprec.produce")


@dataclass(frozen=True, slots=True)
class Pacing:
    rate: float | None = None  # events per second, open loop
    speedup: float | None = None  # recorded gaps divided by this
    limit: int | None = None  # stop after this many events
    retime: bool = True


@dataclass(slots=True)
class ProduceReport:
    items: int = 0
    events: int = 0
    seconds: float = 0.0
    users: int = 0


def dataset_files(folder: Path) -> tuple[Path, Path]:
    items, events = folder / "items.jsonl.gz", folder / "events.jsonl.gz"
    missing = [p.name for p in (items, events) if not p.is_file()]
    if missing:
        raise DatasetError(
            f"{folder} lacks {', '.join(missing)}: a dataset folder holds the canonical "
            "items.jsonl.gz and events.jsonl.gz (see ../shared/data/README.md)"
        )
    return items, events


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{n}: not JSON ({exc})") from None


async def start_producer(settings: Settings) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(**kafka_options(settings), linger_ms=2, acks="all")
    await producer.start()
    return producer


async def produce_catalog(
    producer: AIOKafkaProducer, topics: TopicNames, folder: Path, limit: int | None = None
) -> int:
    items_path, _ = dataset_files(folder)
    count = 0
    for item in read_jsonl(items_path):
        key = str(item["item_id"]).encode()
        await producer.send(topics.catalog, orjson.dumps(item), key=key)
        count += 1
        if limit is not None and count >= limit:
            break
    await producer.flush()
    return count


async def produce_events(
    producer: AIOKafkaProducer,
    topics: TopicNames,
    folder: Path,
    pacing: Pacing,
    progress: Callable[[int], None] | None = None,
) -> ProduceReport:
    _, events_path = dataset_files(folder)
    report = ProduceReport()
    users: set[str] = set()
    start = time.monotonic()
    first_ts: int | None = None
    for n, event in enumerate(in_event_order(read_jsonl(events_path))):
        if pacing.limit is not None and n >= pacing.limit:
            break
        first_ts = event["ts"] if first_ts is None else first_ts
        await asyncio.sleep(
            max(0.0, start + _send_offset(n, event["ts"] - first_ts, pacing) - time.monotonic())
        )
        if pacing.retime:
            event["ts"] = int(time.time() * 1000)
        users.add(str(event["user_id"]))
        await producer.send(
            topics.event_topic(event["type"]),
            orjson.dumps(event),
            key=str(event["user_id"]).encode(),
        )
        report.events += 1
        if progress is not None:
            progress(report.events)
    await producer.flush()
    report.seconds = time.monotonic() - start
    report.users = len(users)
    return report


def in_event_order(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A time-sorted event stream with each run of equal timestamps reordered by
    :func:`~shoprec.events.tie_break` of the event id (one run is held in memory)."""
    run: list[dict[str, Any]] = []
    for event in events:
        if run and event["ts"] != run[0]["ts"]:
            yield from sorted(run, key=lambda e: tie_break(str(e["event_id"])))
            run = []
        run.append(event)
    yield from sorted(run, key=lambda e: tie_break(str(e["event_id"])))


def _send_offset(n: int, recorded_gap_ms: int, pacing: Pacing) -> float:
    """Seconds after the start at which event ``n`` is due (0 = now)."""
    if pacing.rate:
        return n / pacing.rate
    if pacing.speedup:
        return recorded_gap_ms / 1000.0 / pacing.speedup
    return 0.0


async def produce_dataset(
    settings: Settings,
    folder: Path,
    pacing: Pacing,
    with_catalog: bool = True,
    progress: Callable[[int], None] | None = None,
) -> ProduceReport:
    """Catalogue first, then the events; returns what was sent."""
    topics = TopicNames.from_settings(settings)
    producer = await start_producer(settings)
    try:
        items = await produce_catalog(producer, topics, folder) if with_catalog else 0
        report = await produce_events(producer, topics, folder, pacing, progress)
    finally:
        await producer.stop()
    report.items = items
    return report


async def wait_for_catalog(
    settings: Settings, expected: int, timeout_s: float, worker_alive: Callable[[], bool]
) -> float:
    """Seconds until the worker has embedded and stored ``expected`` catalogue changes
    (the demo and the benchmarks wait so before they send events); progress on stderr."""
    redis = open_redis(settings.redis_url, cluster=settings.redis_cluster)
    start = time.monotonic()
    try:
        while True:
            done = await redis.xlen(keys.ITEM_LOG)
            print(
                f"\r  catalogue: {done}/{expected} items embedded and stored",
                file=sys.stderr,
                flush=True,
            )
            if done >= expected:
                return time.monotonic() - start
            if not worker_alive():
                raise StackError("the worker exited while loading the catalogue (see its log)")
            if time.monotonic() - start > timeout_s:
                raise StackError(
                    f"catalogue not loaded after {timeout_s:.0f} s ({done}/{expected})"
                )
            await asyncio.sleep(1.0)
    finally:
        await redis.aclose()


async def produce_catalog_and_wait(
    settings: Settings,
    folder: Path,
    n_items: int,
    worker_alive: Callable[[], bool],
    timeout_s: float = 900.0,
) -> float:
    """Produce the dataset's catalogue and wait until the worker has embedded and stored
    its ``n_items`` items; returns the seconds the wait took."""
    producer = await start_producer(settings)
    try:
        await produce_catalog(producer, TopicNames.from_settings(settings), folder)
    finally:
        await producer.stop()
    return await wait_for_catalog(settings, n_items, timeout_s, worker_alive)
