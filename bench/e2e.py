"""`shoprec bench`: event-to-recommendation latency on the real stack, next to its floor.

For each offered rate the benchmark runs two phases on the same broker:

1. the floor: a pass-through relay (``bench/relay.py``) forwards the events
   unchanged from input topics to an output topic;
2. shoprec: one or more ``shoprec worker`` processes in one consumer group turn
   the same kind of events into recommendations on ``recs.out``.

The load is open loop: event ``i`` is due at ``start + i / rate`` and carries
that due time as its event time, whether or not the system keeps up, so a
slow system shows as latency instead of as a slower generator (no coordinated
omission).  Latency is measured from that due time to the moment the
benchmark's consumer reads the output record.  The events are the real ones
of a dataset, cycled with fresh event ids when a run needs more of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import SecretStr

from bench.report import say, write_results
from bench.stackwatch import StackWatch
from infra import procs
from infra.stack import STATE_FILE
from ops.produce import (
    dataset_files,
    produce_catalog_and_wait,
    read_jsonl,
    start_producer,
)
from shoprec.errors import StackError
from shoprec.settings import Settings, load_settings
from streams.lag import group_lag, lag_is_known
from streams.observability import scrape
from streams.topics import TopicNames, ensure_topics, kafka_options

PERCENTILES = (50, 95, 99)
PROBE_TIMEOUT_S = 120.0
STALL_S = 60.0  # no progress for this long ends a drain where lag cannot be read


@dataclass(frozen=True, slots=True)
class BenchOptions:
    data: Path
    rates: Sequence[float]
    duration_s: float = 30.0
    warmup_s: float = 3.0
    broker: str = "kafka"
    workers: Sequence[int] = (1,)
    json_out: Path | None = None
    drain_timeout_s: float = 600.0  # an overloaded worker works off its backlog
    skip_floor: bool = False
    min_emit_interval_ms: int = 0
    # The cluster profile (3 Kafka nodes, Redis Cluster 3+3, 2 Tritons) instead of one of each.
    cluster: bool = False
    # Catalogue sizes: before its rates, each grows the catalogue to that many items
    # (bench/catalog_scale.py); empty: the dataset's catalogue alone.
    items: Sequence[int] = ()
    # Items (with descriptions, from load_data) sent to the catalogue topic while events
    # stream, after a baseline of duration_s (bench/catalog_scale.py); 0: no load.
    catalog_load: int = 0
    load_data: Path | None = None
    load_timeout_s: float = 3600.0  # 10,000 long texts at 5 items/s take 33 minutes
    load_tail_s: float = 5.0  # events go on this long after the load is stored


@dataclass(slots=True)
class Offered:
    """What the load generator did."""

    sent: int = 0
    measured_from_ms: int = 0  # events due before this are warm-up
    seconds: float = 0.0
    behind_max_ms: float = 0.0  # how late the generator itself ran (its own CPU share)


@dataclass(slots=True)
class Received:
    latencies_ms: list[float] = field(default_factory=list)
    publish_ms: list[float] = field(default_factory=list)
    due_ms: list[float] = field(default_factory=list)  # beside latencies_ms
    records: int = 0
    degraded: int = 0
    degraded_due_ms: list[float] = field(default_factory=list)
    last_at: float = field(default_factory=time.monotonic)


# --- the event plan ---------------------------------------------------------------


class EventSource:
    """The dataset's events in order, cycled; each pass gets fresh event ids."""

    def __init__(self, data: Path) -> None:
        _, events = dataset_files(data)
        self._events = [e for e in read_jsonl(events) if e.get("type") != "search"]
        if not self._events:
            raise StackError(f"{events} holds no events")
        self._cursor = 0

    def take(self, n: int, tag: str) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            i = self._cursor
            event = dict(self._events[i % len(self._events)])
            event["event_id"] = f"{event['event_id']}~{tag}{i // len(self._events)}"
            out.append(event)
            self._cursor += 1
        return out

    def stream(self, tag: str) -> Iterator[dict[str, Any]]:
        """Events without end (``offer`` stops them)."""
        while True:
            yield from self.take(100, tag)


async def offer(
    producer: AIOKafkaProducer,
    events: Iterable[dict[str, Any]],
    rate: float,
    wall_start_ms: float,
    topic_of: dict[str, str],
    headers: Callable[[], list[tuple[str, bytes]]] | None = None,
    stop: asyncio.Event | None = None,
) -> Offered:
    """Send ``events`` open loop at ``rate`` from ``wall_start_ms``, each stamped with
    its due time (and with ``headers()`` made at its send, where given), until they run
    out or ``stop`` is set."""
    report = Offered()
    start = time.monotonic() + (wall_start_ms - time.time() * 1000) / 1000
    for i, event in enumerate(events):
        if stop is not None and stop.is_set():
            break
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            report.behind_max_ms = max(report.behind_max_ms, -delay * 1000)
        event["ts"] = int(wall_start_ms + i * 1000 / rate)
        await producer.send(
            topic_of[event["type"]],
            orjson.dumps(event),
            key=str(event["user_id"]).encode(),
            headers=None if headers is None else headers(),
        )
        report.sent += 1
    await producer.flush()
    report.seconds = time.monotonic() - start
    return report


# --- consuming the output ---------------------------------------------------------


def relayed_event(value: bytes) -> tuple[int, int | None, bool]:
    """(due time, emitted time, degraded) of a relayed event."""
    return orjson.loads(value)["ts"], None, False


def recommendation(value: bytes) -> tuple[int, int | None, bool]:
    """(trigger's due time, emitted time, degraded) of a recommendation."""
    rec = orjson.loads(value)
    return rec["trigger"]["ts"], rec["emitted_ts"], bool(rec["degraded"])


Reader = Callable[[bytes], tuple[int, "int | None", bool]]


async def start_output_consumer(settings: Settings, topic: str) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        topic,
        **kafka_options(settings),
        group_id=None,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
    )
    await consumer.start()
    await consumer.seek_to_end()
    await consumer.getmany(timeout_ms=100)  # hold the position before anything is sent
    return consumer


async def receive(
    consumer: AIOKafkaConsumer, read: Reader, since_ms: int, got: Received, stop: asyncio.Event
) -> None:
    """Read the output until ``stop``; latency counts from each record's due time."""
    while not stop.is_set():
        batch = await consumer.getmany(timeout_ms=100)
        recv_ms = time.time() * 1000
        for records in batch.values():
            for r in records:
                got.records += 1
                got.last_at = time.monotonic()
                due_ms, emitted_ms, degraded = read(r.value or b"{}")
                if due_ms < since_ms:
                    continue  # warm-up
                got.latencies_ms.append(recv_ms - due_ms)
                got.due_ms.append(due_ms)
                if emitted_ms is not None:
                    got.publish_ms.append(recv_ms - emitted_ms)
                if degraded:
                    got.degraded += 1
                    got.degraded_due_ms.append(due_ms)


# --- lag --------------------------------------------------------------------------


async def sample_lag(
    settings: Settings, group: str, topics: Sequence[str], stop: asyncio.Event, out: list[int]
) -> None:
    while lag_is_known(settings) and not stop.is_set():
        with contextlib.suppress(Exception):  # a sample missed while the group rebalances
            out.append(await group_lag(settings, group, topics))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


# --- one phase: offer, receive, drain ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Phase:
    settings: Settings
    input_topics: dict[str, str]  # event type → topic
    output_topic: str
    group: str
    read: Reader
    # Input events the system under test has accounted for so far; where the broker
    # cannot report lag (Tansu), the drain waits for this to reach what was sent.
    counted: Callable[[Received], int]


@dataclass(slots=True)
class PhaseResult:
    offered: Offered
    received: Received
    lags: list[int]
    drain_s: float
    drained: bool  # False: the backlog was not worked off within the drain timeout

    def raise_unless_drained(self, phase: Phase, timeout_s: float) -> PhaseResult:
        if not self.drained:
            raise StackError(f"{phase.group} did not catch up within {timeout_s:.0f} s")
        return self


async def run_phase(
    phase: Phase, events: Sequence[dict[str, Any]], rate: float, opts: BenchOptions
) -> PhaseResult:
    consumer = await start_output_consumer(phase.settings, phase.output_topic)
    producer = await start_producer(phase.settings)
    wall_start_ms = time.time() * 1000 + 100
    since_ms = int(wall_start_ms + opts.warmup_s * 1000)
    got, stop, lags = Received(), asyncio.Event(), list[int]()
    topics = sorted(set(phase.input_topics.values()))
    receiver = asyncio.create_task(receive(consumer, phase.read, since_ms, got, stop))
    sampler = asyncio.create_task(sample_lag(phase.settings, phase.group, topics, stop, lags))
    try:
        offered = await offer(producer, events, rate, wall_start_ms, phase.input_topics)
        drain_s = await drain(phase, topics, got, offered.sent, opts.drain_timeout_s)
    finally:
        stop.set()
        await asyncio.gather(receiver, sampler, return_exceptions=True)
        await producer.stop()
        await consumer.stop()
    if drain_s is None:
        return PhaseResult(offered, got, lags, opts.drain_timeout_s, drained=False)
    return PhaseResult(offered, got, lags, drain_s, drained=True)


async def run_load_phase(
    phase: Phase,
    source: EventSource,
    tag: str,
    rate: float,
    opts: BenchOptions,
    records: Sequence[dict[str, Any]],
    stored: Callable[[], int],
) -> tuple[PhaseResult, dict[str, Any]]:
    """Events open loop at ``rate``: ``duration_s`` without a load, then ``records`` sent to
    the catalogue topic; events go on until ``stored()`` counts them all, and
    ``load_tail_s`` more (bench/catalog_scale.py).  Returns the phase and the load's report
    with latency, degraded and ranked per window."""
    from bench.catalog_scale import send_and_watch, windows_of

    consumer = await start_output_consumer(phase.settings, phase.output_topic)
    producer = await start_producer(phase.settings)
    loader = await start_producer(phase.settings)
    wall_start_ms = time.time() * 1000 + 100
    since_ms = int(wall_start_ms + opts.warmup_s * 1000)
    got, stop, lags = Received(), asyncio.Event(), list[int]()
    no_more = asyncio.Event()
    topics = sorted(set(phase.input_topics.values()))
    receiver = asyncio.create_task(receive(consumer, phase.read, since_ms, got, stop))
    sampler = asyncio.create_task(sample_lag(phase.settings, phase.group, topics, stop, lags))
    events = source.stream(tag)
    sender = asyncio.create_task(
        offer(producer, events, rate, wall_start_ms, phase.input_topics, stop=no_more)
    )
    try:
        await asyncio.sleep(max(0.0, (since_ms + opts.duration_s * 1000) / 1000 - time.time()))
        say(f"  sending {len(records)} catalogue items while events stream ...")
        catalog = TopicNames.from_settings(phase.settings).catalog
        load = await send_and_watch(loader, catalog, records, stored, opts.load_timeout_s)
        await asyncio.sleep(opts.load_tail_s)
        no_more.set()
        offered = await sender
        end_ms = wall_start_ms + offered.sent * 1000 / rate
        drain_s = await drain(phase, topics, got, offered.sent, opts.drain_timeout_s)
    finally:
        no_more.set()
        stop.set()
        await asyncio.gather(receiver, sampler, sender, return_exceptions=True)
        await producer.stop()
        await loader.stop()
        await consumer.stop()
    done_ms = load.done_at_ms if load.done_at_ms is not None else end_ms
    bounds = {
        "before": (float(since_ms), load.sent_at_ms),
        "during": (load.sent_at_ms, done_ms),
        "after": (done_ms, end_ms + 1),
    }
    latency = windows_of(got.due_ms, got.latencies_ms, bounds)
    degraded = windows_of(got.degraded_due_ms, got.degraded_due_ms, bounds)
    report = load.summary() | {
        "windows_s": {k: round((hi - lo) / 1000, 1) for k, (lo, hi) in bounds.items()},
        "latency_ms": {k: percentiles_of(v) for k, v in latency.items()},
        "ranked": {k: len(v) for k, v in latency.items()},
        "degraded": {k: len(v) for k, v in degraded.items()},
    }
    took = opts.drain_timeout_s if drain_s is None else drain_s
    result = PhaseResult(offered, got, lags, took, drained=drain_s is not None)
    return result, report


async def drain(
    phase: Phase, topics: Sequence[str], got: Received, sent: int, timeout_s: float
) -> float | None:
    """Seconds until the group has committed everything and the output has gone quiet;
    None when that did not happen within ``timeout_s``."""
    start = time.monotonic()
    shown = start
    progress = (-1, start)  # (events counted, when that count last moved)
    while time.monotonic() - start < timeout_s:
        if not lag_is_known(phase.settings):
            # No lag to read: wait until every sent event is accounted for (a quiet
            # output alone once ended a drain while a stalled worker had 16k to go),
            # or until nothing has moved for a minute: the counters then show the loss.
            counted, now = phase.counted(got), time.monotonic()
            if counted != progress[0]:
                progress = (counted, now)
            quiet = now - got.last_at > 1.0
            if quiet and (counted >= sent or now - max(progress[1], got.last_at) > STALL_S):
                return now - start
            if time.monotonic() - shown > 5:
                say(f"  draining: {sent - counted} events not yet counted")
                shown = time.monotonic()
            await asyncio.sleep(0.5)
            continue
        lag = await group_lag(phase.settings, phase.group, topics)
        if lag == 0 and time.monotonic() - got.last_at > 1.0:
            return time.monotonic() - start
        if time.monotonic() - shown > 5:
            say(f"  draining: {lag} events behind")
            shown = time.monotonic()
        await asyncio.sleep(0.5)
    return None


# --- the processes under test -----------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    peak = procs.memory_mb(pid, "VmHWM")
    return float("nan") if peak is None else peak


def wait_for_line(proc: procs.Proc, text: str, since: int, timeout_s: float) -> None:
    def seen() -> bool:
        with open(proc.log_path, "rb") as fh:
            fh.seek(since)
            return text.encode() in fh.read()

    procs.wait_until(seen, timeout_s, f"{proc.name} to log {text!r}", proc=proc)


@dataclass(slots=True)
class Started:
    proc: procs.Proc
    log_offset: int
    cpu_at_start: float = 0.0
    metrics_url: str = ""  # a worker's Prometheus endpoint, where its counters are read

    def counters(self) -> dict[str, Any]:
        """The worker's counters now, from its metrics endpoint."""
        try:
            return scrape(self.metrics_url)
        except OSError as exc:
            raise StackError(
                f"{self.proc.name}'s metrics endpoint {self.metrics_url} did not answer ({exc}); "
                f"see {self.proc.log_path}"
            ) from exc


def start_process(name: str, argv: Sequence[str], log: Path, env: dict[str, str]) -> Started:
    offset = log.stat().st_size if log.exists() else 0
    proc = procs.start(name, argv, log, env={**os.environ, **env})
    return Started(proc, offset)


def start_workers(
    settings: Settings, n: int, logs: Path, ready_timeout_s: float = PROBE_TIMEOUT_S
) -> list[Started]:
    """``n`` workers, each with a metrics endpoint on a free port of its own; each loads
    the whole catalogue before it reports ready."""
    argv = [sys.executable, "-m", "cli.main", "worker"]
    workers = []
    for i, port in enumerate(procs.free_ports(n)):
        env = settings.model_copy(update={"metrics_port": port}).as_env()
        worker = start_process(f"worker-{i}", argv, logs / f"worker-{i}.log", env)
        worker.metrics_url = f"http://{settings.metrics_host}:{port}/metrics"
        workers.append(worker)
    for w in workers:
        wait_for_line(w.proc, "Worker ready", w.log_offset, ready_timeout_s)
    return workers


def events_counted(w: Started) -> int:
    """Input records the worker has counted so far (0 while its endpoint is not up)."""
    try:
        return int(w.counters()["events_in"])
    except StackError:
        return 0


def worker_phase(settings: Settings, workers: Sequence[Started]) -> Phase:
    """shoprec's workers under test: shop topics in, recs.out out, counted by their metrics."""
    names = TopicNames.from_settings(settings)
    return Phase(
        settings,
        _topic_of(names),
        names.recs_out,
        settings.app_id,
        recommendation,
        counted=lambda _: sum(events_counted(w) for w in workers),
    )


# --- one offered rate -------------------------------------------------------------


def percentiles_of(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    out = {f"p{q}": round(float(np.percentile(arr, q)), 1) for q in PERCENTILES}
    return out | {"max": round(float(arr.max()), 1)}


def measure_floor(
    settings: Settings, source: EventSource, rate: float, opts: BenchOptions, tag: str
) -> dict[str, Any]:
    """The pass-through relay at the same rate on the same broker."""
    relay_settings = replace_prefix(settings, f"relay-{tag}.")
    names = TopicNames.from_settings(relay_settings)
    asyncio.run(ensure_topics(relay_settings))
    group = f"relay-{tag}"
    argv = [sys.executable, "-m", "bench.relay", "--bootstrap", settings.kafka_bootstrap]
    argv += ["--out", names.recs_out, "--group", group]
    argv += ["--fetch-max-wait-ms", str(settings.fetch_max_wait_ms), *names.events]
    relay = start_process("relay", argv, settings.stack_dir / "logs" / "relay.log", {})
    try:
        wait_for_line(relay.proc, "relay ready", relay.log_offset, 60)
        phase = Phase(
            relay_settings,
            _topic_of(names),
            names.recs_out,
            group,
            relayed_event,
            counted=lambda got: got.records,  # one output per input
        )
        events = source.take(_n_events(rate, opts), tag)
        result = asyncio.run(run_phase(phase, events, rate, opts))
        result.raise_unless_drained(phase, opts.drain_timeout_s)
    finally:
        procs.stop(relay.proc)
    lost = result.offered.sent - result.received.records
    return {"floor_ms": percentiles_of(result.received.latencies_ms), "floor_lost": lost}


def measure_shoprec(
    settings: Settings,
    source: EventSource,
    rate: float,
    n_workers: int,
    opts: BenchOptions,
    tag: str,
    watch: StackWatch | None = None,
) -> dict[str, Any]:
    """``watch``: also what every process of the stack spent per event (``stack``);
    ``opts.catalog_load``: a catalogue load while the events stream (``catalog_load``)."""
    ready_s = PROBE_TIMEOUT_S + max(opts.items, default=0) / 2000  # 1M items: about 10 min
    workers = start_workers(settings, n_workers, settings.stack_dir / "logs", ready_s)
    load: dict[str, Any] | None = None
    pids = {w.proc.name: w.proc.pid for w in workers}
    try:
        for w in workers:
            w.cpu_at_start = cpu_seconds(w.proc.pid)
        before = watch.sample(pids) if watch is not None else None
        phase = worker_phase(settings, workers)
        began = time.monotonic()
        if opts.catalog_load:
            from bench.catalog_scale import read_load_records

            records = read_load_records(opts.load_data or opts.data, opts.catalog_load)

            def stored() -> int:
                return sum(int(w.counters()["catalog_items"]) for w in workers)

            result, load = asyncio.run(
                run_load_phase(phase, source, tag, rate, opts, records, stored)
            )
        else:
            events = source.take(_n_events(rate, opts), tag)
            result = asyncio.run(run_phase(phase, events, rate, opts))
        result.raise_unless_drained(phase, opts.drain_timeout_s)
        busy_s = result.received.last_at - began
        cpu = [cpu_seconds(w.proc.pid) - w.cpu_at_start for w in workers]
        rss = [peak_rss_mb(w.proc.pid) for w in workers]
        after = watch.sample(pids) if watch is not None else None
        # Drained: every input record is committed, so the counters are final.
        stats = [w.counters() for w in workers]
    finally:
        for w in workers:
            procs.stop(w.proc)
    run = summarise_run(result, stats, busy_s, cpu, rss) | {"workers": n_workers}
    if load is not None:
        run["catalog_load"] = load
    if watch is not None and before is not None and after is not None:
        events_in = run["counters"]["events_in"]
        run["stack"] = watch.per_event(before, after, events_in, run["counters"]["recommended"])
    return run


def summarise_run(
    result: PhaseResult,
    stats: Sequence[dict[str, Any]],
    busy_s: float,
    cpu_s: Sequence[float],
    rss_mb: Sequence[float],
) -> dict[str, Any]:
    got, offered = result.received, result.offered
    total = {k: sum(int(s[k]) for s in stats) for k in _COUNTERS}
    # Lost: sent but never counted by a worker, or counted as recommended but never seen.
    lost = max(0, offered.sent - total["events_in"]) + max(0, total["recommended"] - got.records)
    stages = _mean_stage_percentiles(stats)
    stages["publish"] = percentiles_of(got.publish_ms)
    return {
        "events_sent": offered.sent,
        "events_per_s": round(total["events_in"] / busy_s, 1),
        "recs_per_s": round(got.records / busy_s, 1),
        "latency_ms": percentiles_of(got.latencies_ms),
        "stages_ms": stages,
        "lost": lost,
        "counters": total,
        "dlq": total["dead_lettered"],
        "degraded": got.degraded,
        "lag_max": max(result.lags) if result.lags else None,
        "drain_s": round(result.drain_s, 1),
        "batch_size": _mean_percentiles([s.get("batch_size", {}) for s in stats]),
        "worker_cpu_pct": [round(100 * c / busy_s, 1) for c in cpu_s],
        "worker_cpu_ms_per_event": round(1000 * sum(cpu_s) / max(1, total["events_in"]), 3),
        "worker_peak_rss_mb": [round(r, 1) for r in rss_mb],
        "generator_behind_max_ms": round(offered.behind_max_ms, 1),
    }


_COUNTERS = ("events_in", "recommended", "dead_lettered", "duplicates", "rate_limited", "coalesced")


def _mean_percentiles(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: round(float(np.mean([r[k] for r in rows if k in r])), 2) for k in keys}


def _mean_stage_percentiles(stats: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each stage's percentiles as each worker measured them, averaged over workers."""
    names = sorted({n for s in stats for n in s.get("stages_ms", {})})
    return {n: _mean_percentiles([s["stages_ms"].get(n, {}) for s in stats]) for n in names}


def _n_events(rate: float, opts: BenchOptions) -> int:
    return int(rate * (opts.warmup_s + opts.duration_s))


def _topic_of(names: TopicNames) -> dict[str, str]:
    return {t: names.event_topic(t) for t in ("view", "click", "cart", "purchase", "search")}


def replace_prefix(settings: Settings, prefix: str) -> Settings:
    return settings.model_copy(update={"topic_prefix": prefix})


# --- the whole benchmark ----------------------------------------------------------


@contextlib.contextmanager
def bench_stack(
    broker: str,
    model_repo: Path,
    min_emit_interval_ms: int,
    cluster: bool = False,
    services: tuple[str, ...] = ("broker", "redis", "triton"),
) -> Iterator[Settings]:
    """A private stack of ``services`` on free ports (``cluster``: the cluster profile),
    removed afterwards, and settings that point at it."""
    from infra.stack import Stack

    with tempfile.TemporaryDirectory(prefix="shoprec-bench-") as tmp:
        base = load_settings(
            broker=broker,
            stack_dir=Path(tmp),
            kafka_port=0,
            redis_port=0,
            triton_http_port=0,
            triton_grpc_port=0,
            triton_metrics_port=0,
        )
        stack = Stack(base, model_repo=model_repo)
        what = "a cluster: 3 Kafka, Redis Cluster 3+3, 2 Tritons" if cluster else broker
        say(f"starting the stack ({what}) in {tmp} ...")
        endpoints = stack.up(services, timeout_s=400, cluster=cluster)
        try:
            yield base.model_copy(
                update={
                    "kafka_bootstrap": endpoints.kafka_bootstrap,
                    "redis_url": SecretStr(endpoints.redis_url),
                    "triton_url": endpoints.triton_url,
                    "redis_cluster": endpoints.redis_cluster,
                    "kafka_replication_factor": endpoints.kafka_replication_factor,
                    "topic_prefix": "bench.",
                    "app_id": "shoprec-bench",
                    # 0: every event may trigger, the heaviest load the worker can get.
                    "min_emit_interval_ms": min_emit_interval_ms,
                    # Several workers share the host: each gets a free port when it starts.
                    "metrics_port": 0,
                }
            )
        finally:
            stack.down(wipe=True)


def load_catalogue(settings: Settings, data: Path) -> int:
    asyncio.run(ensure_topics(settings))
    n_items = sum(1 for _ in read_jsonl(data / "items.jsonl.gz"))
    [worker] = start_workers(settings, 1, settings.stack_dir / "logs")
    try:
        alive = functools.partial(procs.is_alive, worker.proc)
        took = asyncio.run(produce_catalog_and_wait(settings, data, n_items, alive))
    finally:
        procs.stop(worker.proc)
    say(f"\ncatalogue of {n_items} items embedded in {took:.1f} s")
    return n_items


def run_bench(
    opts: BenchOptions,
    model_repo: Path,
    inspect: Callable[[Settings], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The sweep; ``inspect(settings)``, run on the stack after the last run, adds to the
    result (what only the stack can still tell: its memory, say)."""
    # SIGTERM unwinds like Ctrl-C, so the private stack and the workers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    source = EventSource(opts.data)
    runs: list[dict[str, Any]] = []
    sizes: list[dict[str, Any]] = []
    stack = bench_stack(opts.broker, model_repo, opts.min_emit_interval_ms, opts.cluster)
    with stack as settings:
        n_items = load_catalogue(settings, opts.data)
        for s, size in enumerate(sorted(opts.items) or [0]):  # a catalogue only grows
            catalogue: dict[str, Any] = {}
            if size:
                catalogue = grow_catalogue(settings, opts.data, model_repo, size)
            # After a grown catalogue Triton runs anew: the watch reads its new pids.
            watch = StackWatch.of_stack(settings.stack_dir / STATE_FILE)
            say("the stack's own CPU use with no events (10 s) ...")
            watch.measure_idle(10.0)
            first = len(runs)
            for n, rate in enumerate(opts.rates):
                key = f"s{s}" if size else ""
                floor: dict[str, Any] = {}
                if not opts.skip_floor:
                    say(f"[{rate:.0f}/s] floor: pass-through relay ...")
                    floor = measure_floor(settings, source, rate, opts, f"{key}f{n}")
                for workers in opts.workers:
                    say(f"[{rate:.0f}/s] shoprec with {workers} worker(s) ...")
                    tag = f"{key}w{n}x{workers}"
                    run = measure_shoprec(settings, source, rate, workers, opts, tag, watch)
                    run = {"offered_rate": rate, "broker": opts.broker} | run | floor
                    run["ratio_to_floor"] = _ratios(run)
                    if "catalog_load" in run:
                        loaded: dict[str, Any] = run["catalog_load"]  # type: ignore[assignment]
                        loaded["ratio_to_floor"] = {
                            w: _ratios({"latency_ms": lat} | floor)
                            for w, lat in loaded["latency_ms"].items()
                        }
                    if size:
                        run["items"] = catalogue["items"]
                    say(_one_line(run))
                    runs.append(run)
            if size:
                catalogue |= after_size(settings, runs[first:])
                sizes.append(catalogue)
                say(f"  {size:,} items: {_size_line(catalogue)}")
        inspected = inspect(settings) if inspect is not None else {}
    result: dict[str, Any] = {
        "dataset": opts.data.name,
        "broker": opts.broker,
        "cluster": opts.cluster,
        "catalogue_items": n_items,
        "duration_s": opts.duration_s,
        "warmup_s": opts.warmup_s,
        "min_emit_interval_ms": opts.min_emit_interval_ms,
        "machine": machine(),
        "runs": runs,
    }
    if sizes:
        result["catalogue_sizes"] = sizes
    if len(runs) == 1:
        result |= runs[0]
    result |= inspected
    if opts.json_out is not None:
        write_results(result, opts.json_out, plot)
        if sizes:
            from bench.catalog_scale import plot_sizes

            png = opts.json_out.with_name(f"{opts.json_out.stem}-catalogue.png")
            plot_sizes(sizes, runs, png)
            say(f"wrote {png}")
    return result


def grow_catalogue(settings: Settings, data: Path, model_repo: Path, n: int) -> dict[str, Any]:
    """The catalogue grown to ``n`` items in Redis and Triton restarted on it
    (bench/catalog_scale.py)."""
    from bench import catalog_scale as cs

    say(f"growing the catalogue to {n:,} items ...")
    real = asyncio.run(cs.read_real(settings, data))
    grown = asyncio.run(cs.grow(settings, real, n))
    say(
        f"  wrote {grown['copies_written']:,} copies in {grown['write_s']} s; restarting Triton ..."
    )
    restarted = cs.restart_triton(settings, model_repo, timeout_s=300 + n / 1000)
    return {
        "items": n,
        "real_items": len(real.items),
        "real_items_embedded": sum(v is not None for v in real.vectors),
        **grown,
        "triton_restart": restarted,
        # What fused_ranker logged: changes applied (an item logged twice counts twice).
        "triton_log_changes_loaded": sum(r["items_loaded"] or 0 for r in restarted.values()),
        **{f"{k}_after_load": v for k, v in cs.triton_memory(settings).items()},
    }


def after_size(settings: Settings, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Memory after a size's runs, and the retrieval index's recall at this size."""
    from bench import catalog_scale as cs

    say("  memory, and IVF's recall@100 against exact on real users' vectors ...")
    peaks = [r for run in runs for r in run["worker_peak_rss_mb"]]
    return {
        **cs.triton_memory(settings),
        "worker_peak_rss_mb": max(peaks, default=None),
        "redis_used_memory_mb": asyncio.run(cs.redis_memory_mb(settings)),
        "retrieval": cs.retrieval_recall(settings),
    }


def _size_line(c: dict[str, Any]) -> str:
    r = c["retrieval"]
    return (
        f"table {r['table_items']:,} items "
        f"({r['index_in_triton']}), Triton RSS {c['triton_rss_mb']:.0f} MiB, worker peak "
        f"{c['worker_peak_rss_mb']} MiB, Redis {c['redis_used_memory_mb']} MiB, "
        f"IVF recall@100 {r['ivf_recall_at_100']}"
    )


def _ratios(run: dict[str, Any]) -> dict[str, float]:
    lat, floor = run.get("latency_ms", {}), run.get("floor_ms", {})
    return {q: round(lat[q] / floor[q], 2) for q in ("p50", "p99") if floor.get(q) and q in lat}


def _one_line(run: dict[str, Any]) -> str:
    lat, floor = run["latency_ms"], run.get("floor_ms", {})
    return (
        f"  {run['offered_rate']:.0f}/s x{run['workers']}: p50 {lat.get('p50')} p99 "
        f"{lat.get('p99')} ms (floor p50 {floor.get('p50')} p99 {floor.get('p99')}), "
        f"{run['events_per_s']} ev/s, lost {run['lost']}, cpu {run['worker_cpu_pct']}%"
    )


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "gpu": None, "python": sys.version.split()[0]}


def plot(result: dict[str, Any], path: Path) -> None:
    """Latency percentiles against the offered rate, one line per worker count."""
    plot_latency(result["runs"], path, result["broker"])


def plot_latency(runs: Sequence[dict[str, Any]], path: Path, broker: str) -> None:
    """Latency percentiles against offered rate, shoprec next to the relay floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for workers in sorted({r["workers"] for r in runs}):
        mine = sorted((r for r in runs if r["workers"] == workers), key=lambda r: r["offered_rate"])
        rates = [r["offered_rate"] for r in mine]
        for q, style in (("p50", "-o"), ("p99", "--o")):
            ys = [r["latency_ms"].get(q, np.nan) for r in mine]
            ax.plot(rates, ys, style, label=f"shoprec x{workers} {q}")
    floors = sorted((r for r in runs if r.get("floor_ms")), key=lambda r: r["offered_rate"])
    floor_rates = sorted({r["offered_rate"] for r in floors})
    for q, style in (("p50", ":s"), ("p99", ":^")):
        ys = [next(r["floor_ms"][q] for r in floors if r["offered_rate"] == x) for x in floor_rates]
        ax.plot(floor_rates, ys, style, color="grey", label=f"relay floor {q}")
    ax.set_xlabel("offered events/s")
    ax.set_ylabel("event → output latency, ms")
    ax.set_yscale("log")
    ax.set_title(f"shoprec end to end on {broker} (2 cores, Triton on CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
