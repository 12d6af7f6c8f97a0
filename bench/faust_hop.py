"""The Faust hop alone: producer send → micro-batch in a no-op agent, per configuration.

``python -m bench.faust_hop --rate 100,500 --duration 20 --json bench/results/faust-hop.json``

Starts a private Apache Kafka (nothing else), then for each offered rate and each
configuration starts one subject process and offers it the dataset's real events open
loop (``bench.e2e.offer``), each carrying its send time in a header.  A subject is

- ``relay-consumer``: the aiokafka consumer of ``bench/relay.py``, the floor of one hop;
- a Faust app built by ``streams.app.new_faust_app`` (the worker's own app and
  transport) whose agent does nothing but stamp each micro-batch, with the
  configuration's consumer thread, batching and Faust options.

Every event is stamped where it passes (ms after its send): ``fetched`` when aiokafka's
fetcher returns it to Faust (in the consumer thread, or on the loop), ``loop`` when
Faust's fetcher task on the worker's loop turns it into a message, ``stream`` when the
agent's stream takes it in, ``agent`` when its micro-batch reaches the agent.  The
stamps come from wrapping two of Faust's methods in the subject process only
(``_fetch_records``, ``_to_message``); the worker never runs them.  The subject's CPU
time is read from /proc, idle (before any event) and under load.  Configurations run in
alternating order, ``--rounds`` times, on the same broker: the machine is shared, so
compare within a round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import orjson

from bench.e2e import (
    EventSource,
    cpu_seconds,
    offer,
    percentiles_of,
    start_process,
    wait_for_line,
)
from bench.report import DATA, say, write_results
from infra import procs
from ops.produce import start_producer
from shoprec.settings import Settings, load_settings
from streams.topics import EVENT_TOPICS, TopicNames, ensure_topics

DEFAULT_DATA = DATA / "rees46-sample"
READY = "hop subject ready"
SENT_HEADER = "shoprec-bench-sent-ns"
STAMPS = ("fetched", "loop", "stream", "agent")
IDLE_S = 3.0
DRAIN_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Config:
    """One way of getting records to the agent."""

    name: str
    what: str
    faust: bool = True
    consumer_thread: bool = False
    take_events_within_s: float | None = None  # Faust's take_events; None: take_buffered
    fetch_max_wait_ms: int | None = None  # None: the worker's default for the broker
    commit_interval_s: float | None = None  # None: Faust's 2.8 s

    def settings(self, base: Settings) -> Settings:
        update: dict[str, Any] = {"consumer_thread": self.consumer_thread}
        if self.fetch_max_wait_ms is not None:
            update["consumer_fetch_max_wait_ms"] = self.fetch_max_wait_ms
        return base.model_copy(update=update)


TAKE_5MS = 0.005
CONFIGS: tuple[Config, ...] = (
    Config("relay-consumer", "aiokafka consumer of bench/relay.py: one hop, the floor", False),
    Config(
        "before",
        "Faust as the worker ran it: consumer thread, take_events(128, 5 ms)",
        consumer_thread=True,
        take_events_within_s=TAKE_5MS,
    ),
    Config("thread+buffered", "consumer thread, take_buffered", consumer_thread=True),
    Config(
        "loop+take_events",
        "consumer on the event loop, take_events(128, 5 ms)",
        take_events_within_s=TAKE_5MS,
    ),
    Config("after", "consumer on the event loop, take_buffered: the worker now"),
    Config("after+fetch_wait_5ms", "after, with a 5 ms fetch wait (500 ms)", fetch_max_wait_ms=5),
    Config("after+commit_0.25s", "after, committing every 0.25 s (2.8 s)", commit_interval_s=0.25),
)


# --- the subject process ----------------------------------------------------------


def sent_ns(headers: Any) -> int:
    for key, value in headers or ():
        if key == SENT_HEADER:
            return int(value)
    raise ValueError(f"a record without the {SENT_HEADER} header: not one of this benchmark's")


class Stamps:
    """Where each record passed, by (topic, partition, offset), as time.time_ns()."""

    def __init__(self, out: Path) -> None:
        self.fetched: dict[tuple[str, int, int], int] = {}
        self.loop: dict[tuple[str, int, int], int] = {}
        self.stream: dict[tuple[str, int, int], int] = {}
        self._out = out.open("ab", buffering=0)

    def write(self, rows: list[list[float | None]]) -> None:
        self._out.write(orjson.dumps(rows) + b"\n")

    def install(self) -> None:
        """Wrap Faust's fetch (consumer thread or loop) and message making (loop)."""
        from faust.transport.drivers import aiokafka as driver

        fetch, to_message = (
            driver.AIOKafkaConsumerThread._fetch_records,
            driver.Consumer._to_message,
        )
        fetched, looped = self.fetched, self.loop

        async def _fetch_records(self: Any, *args: Any, **kwargs: Any) -> Any:
            records = await fetch(self, *args, **kwargs)
            now = time.time_ns()
            for tp, batch in records.items():
                for r in batch:
                    fetched[(tp.topic, tp.partition, r.offset)] = now
            return records

        def _to_message(self: Any, tp: Any, record: Any) -> Any:
            looped[(tp.topic, tp.partition, record.offset)] = time.time_ns()
            return to_message(self, tp, record)

        driver.AIOKafkaConsumerThread._fetch_records = _fetch_records  # type: ignore[method-assign]
        driver.Consumer._to_message = _to_message  # type: ignore[method-assign]

    def at_agent(self, messages: Sequence[Any]) -> None:
        now = time.time_ns()
        rows: list[list[float | None]] = []
        for m in messages:
            key = (m.topic, m.partition, m.offset)
            sent = sent_ns(m.headers)
            at = [self.fetched.pop(key, None), self.loop.pop(key, None), self.stream.pop(key, None)]
            rows.append([None if t is None else (t - sent) / 1e6 for t in [*at, now]])
        self.write(rows)


def run_faust_subject(settings: Settings, config: Config, out: Path) -> None:
    import faust
    from faust.worker import Worker
    from mode.loop import use as use_event_loop

    from streams.app import micro_batches, new_faust_app

    if settings.event_loop == "uvloop":
        use_event_loop("uvloop")
    stamps = Stamps(out)
    stamps.install()
    options: dict[str, Any] = {}
    if config.commit_interval_s is not None:
        options["broker_commit_interval"] = config.commit_interval_s
    app = new_faust_app(settings, **options)
    topic = app.topic(*TopicNames.from_settings(settings).events, key_type=bytes, value_type=bytes)

    @app.agent(topic, name="hop")
    async def hop(stream: faust.StreamT[bytes]) -> None:
        def at_stream(value: bytes) -> bytes:
            m = stream.current_event.message  # type: ignore[union-attr]
            stamps.stream[(m.topic, m.partition, m.offset)] = time.time_ns()
            return value

        # Runs before the batcher's own processor, in the same pass of the stream.
        stream.add_processor(at_stream)
        if config.take_events_within_s is None:
            batches = micro_batches(stream, settings.batch_max, settings.batch_within_ms / 1000)
        else:
            batches = cast(faust.Stream[bytes], stream).take_events(
                settings.batch_max, within=config.take_events_within_s
            )
        async for events in batches:
            stamps.at_agent([e.message for e in events])

    @app.on_partitions_assigned.connect
    async def ready(sender: Any, /, *args: Any, **kwargs: Any) -> None:
        assigned = args[0] if args else kwargs.get("assigned")
        if assigned:
            print(READY, flush=True)

    Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


async def run_relay_consumer(settings: Settings, out: Path) -> None:
    from bench.relay import relay_consumer

    stamps = Stamps(out)
    consumer = relay_consumer(
        settings.kafka_bootstrap,
        list(TopicNames.from_settings(settings).events),
        settings.app_id,
        settings.fetch_max_wait_ms,
    )
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        print(READY, flush=True)
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.time_ns()
            rows: list[list[float | None]] = []
            for records in batch.values():
                for r in records:
                    ms = (now - sent_ns(r.headers)) / 1e6
                    rows.append([ms, None, None, ms])
            if rows:
                stamps.write(rows)
    finally:
        await consumer.stop()


# --- the benchmark ----------------------------------------------------------------


@dataclass(slots=True)
class Run:
    config: str
    rate: float
    round: int
    events: int = 0
    received: int = 0
    batches: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    at_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # stamp → percentiles
    cpu_ms_per_event: float = 0.0
    cpu_pct: float = 0.0
    idle_cpu_pct: float = 0.0
    load_avg: tuple[float, float] = (0.0, 0.0)  # 1-minute load before and after


def subject_env(settings: Settings, config: Config, out: Path, tag: str) -> dict[str, str]:
    s = config.settings(settings).model_copy(
        update={"topic_prefix": f"hop-{tag}.", "app_id": f"shoprec-hop-{tag}"}
    )
    return s.as_env() | {"SHOPREC_HOP_CONFIG": config.name, "SHOPREC_HOP_OUT": str(out)}


def column(rows: Sequence[Sequence[float | None]], i: int) -> list[float]:
    return [v for row in rows if (v := row[i]) is not None]


def read_rows(out: Path) -> tuple[list[list[float | None]], int]:
    rows: list[list[float | None]] = []
    batches = 0
    if out.exists():
        for line in out.read_bytes().splitlines():
            rows += orjson.loads(line)
            batches += 1
    return rows, batches


def measure(
    settings: Settings, source: EventSource, config: Config, rate: float, rnd: int, args: Any
) -> Run:
    tag = f"{config.name.replace('+', '-').replace('.', '')}-{int(rate)}-{rnd}"
    out = settings.stack_dir / f"{tag}.jsonl"
    env = subject_env(settings, config, out, tag)
    topics = settings.model_copy(update={"topic_prefix": f"hop-{tag}."})
    names = TopicNames.from_settings(topics)
    asyncio.run(ensure_topics(topics))
    argv = [sys.executable, "-m", "bench.faust_hop", "subject"]
    proc = start_process(f"hop-{tag}", argv, settings.stack_dir / "logs" / f"{tag}.log", env)
    run = Run(config.name, rate, rnd, load_avg=(round(os.getloadavg()[0], 2), 0.0))
    try:
        wait_for_line(proc.proc, READY, proc.log_offset, 120)
        idle0, t0 = cpu_seconds(proc.proc.pid), time.monotonic()
        time.sleep(IDLE_S)
        run.idle_cpu_pct = round(
            100 * (cpu_seconds(proc.proc.pid) - idle0) / (time.monotonic() - t0), 2
        )
        events = source.take(int(rate * (args.warmup + args.duration)), tag)
        topic_of = {t: names.event_topic(t) for t in EVENT_TOPICS}
        cpu0, t0 = cpu_seconds(proc.proc.pid), time.monotonic()
        asyncio.run(_offer(settings, events, rate, topic_of))
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while len(read_rows(out)[0]) < len(events) and time.monotonic() < deadline:
            time.sleep(0.5)
        cpu_s, busy_s = cpu_seconds(proc.proc.pid) - cpu0, time.monotonic() - t0
    finally:
        procs.stop(proc.proc)
    rows, run.batches = read_rows(out)
    run.events, run.received = len(events), len(rows)
    measured = rows[int(rate * args.warmup) :]
    run.at_ms = {name: percentiles_of(column(measured, i)) for i, name in enumerate(STAMPS)}
    run.latency_ms = run.at_ms["agent"]
    run.cpu_ms_per_event = round(1000 * cpu_s / max(1, len(rows)), 3)
    run.cpu_pct = round(100 * cpu_s / busy_s, 1)
    run.load_avg = (run.load_avg[0], round(os.getloadavg()[0], 2))
    return run


async def _offer(
    settings: Settings, events: list[dict[str, Any]], rate: float, topic_of: dict[str, str]
) -> None:
    producer = await start_producer(settings)
    try:
        stamp = lambda: [(SENT_HEADER, str(time.time_ns()).encode())]  # noqa: E731
        await offer(producer, events, rate, time.time() * 1000 + 100, topic_of, headers=stamp)
    finally:
        await producer.stop()


@contextlib.contextmanager
def kafka_only() -> Iterator[Settings]:
    """A private Apache Kafka on a free port, removed afterwards."""
    from infra.stack import Stack

    with tempfile.TemporaryDirectory(prefix="shoprec-hop-") as tmp:
        base = load_settings(broker="kafka", stack_dir=Path(tmp), kafka_port=0)
        stack = Stack(base)
        say(f"starting Apache Kafka in {tmp} ...")
        endpoints = stack.up(("broker",), timeout_s=180)
        try:
            (Path(tmp) / "logs").mkdir(exist_ok=True)
            yield base.model_copy(update={"kafka_bootstrap": endpoints.kafka_bootstrap})
        finally:
            stack.down(wipe=True)


def summarise(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per configuration and rate: median over rounds of each figure."""
    out = []
    for config in CONFIGS:
        for rate in sorted({r.rate for r in runs}):
            mine = [r for r in runs if r.config == config.name and r.rate == rate]
            if not mine:
                continue

            def med(values: Sequence[float]) -> float:
                return round(float(np.median(values)), 2)

            out.append(
                {
                    "config": config.name,
                    "what": config.what,
                    "rate": rate,
                    "rounds": len(mine),
                    "latency_ms": {
                        q: med([r.latency_ms[q] for r in mine]) for q in ("p50", "p95", "p99")
                    },
                    "at_ms_p50": {
                        s: med([r.at_ms[s]["p50"] for r in mine if r.at_ms.get(s)])
                        for s in STAMPS
                        if all(r.at_ms.get(s) for r in mine)
                    },
                    "batch_events": med([r.received / max(1, r.batches) for r in mine]),
                    "cpu_ms_per_event": med([r.cpu_ms_per_event for r in mine]),
                    "cpu_pct": med([r.cpu_pct for r in mine]),
                    "idle_cpu_pct": med([r.idle_cpu_pct for r in mine]),
                    "lost": sum(r.events - r.received for r in mine),
                }
            )
    return out


def line(s: dict[str, Any]) -> str:
    lat, at = s["latency_ms"], s["at_ms_p50"]
    stages = " · ".join(f"{k} {v}" for k, v in at.items())
    return (
        f"  {s['rate']:>5.0f}/s {s['config']:<22} p50 {lat['p50']:>6} p95 {lat['p95']:>6} "
        f"p99 {lat['p99']:>6} ms | at p50: {stages} | {s['batch_events']} ev/batch | "
        f"cpu {s['cpu_ms_per_event']} ms/ev ({s['cpu_pct']}%, idle {s['idle_cpu_pct']}%) "
        f"| lost {s['lost']}"
    )


def plot(summary: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({s["rate"] for s in summary})
    fig, axes = plt.subplots(1, len(rates), figsize=(6 * len(rates), 4.5), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        rows = [s for s in summary if s["rate"] == rate]
        names = [s["config"] for s in rows]
        y = np.arange(len(rows))
        for q, color in (("p99", "#f4b183"), ("p95", "#9dc3e6"), ("p50", "#2e75b6")):
            ax.barh(y, [s["latency_ms"][q] for s in rows], color=color, label=q)
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("producer send → micro-batch in the agent, ms")
        ax.set_title(f"{rate:.0f} events/s")
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("The Faust hop alone (no-op agent), Apache Kafka, 2 cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    if sys.argv[1:2] == ["subject"]:
        settings = load_settings()
        config = next(c for c in CONFIGS if c.name == os.environ["SHOPREC_HOP_CONFIG"])
        out = Path(os.environ["SHOPREC_HOP_OUT"])
        if config.faust:
            run_faust_subject(settings, config, out)
        else:
            asyncio.run(run_relay_consumer(settings, out))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", default="100,500", help="Offered events/s, comma-separated.")
    parser.add_argument("--duration", type=float, default=20.0, help="Measured seconds per run.")
    parser.add_argument("--warmup", type=float, default=3.0, help="Unmeasured seconds first.")
    parser.add_argument("--rounds", type=int, default=2, help="Each configuration this often.")
    parser.add_argument("--config", action="append", help="Only these (default: all).")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path, help="Write the results (and a .png plot) here.")
    args = parser.parse_args()
    configs = [c for c in CONFIGS if not args.config or c.name in args.config]
    rates = [float(r) for r in args.rate.split(",")]
    source = EventSource(args.data)
    runs: list[Run] = []
    with kafka_only() as settings:
        for rnd in range(args.rounds):
            for rate in rates:
                # Alternate the order, so that no configuration always runs first.
                for config in configs if rnd % 2 == 0 else configs[::-1]:
                    run = measure(settings, source, config, rate, rnd, args)
                    runs.append(run)
                    lat = run.latency_ms
                    say(
                        f"[round {rnd}] {rate:.0f}/s {config.name}: p50 {lat.get('p50')} "
                        f"p99 {lat.get('p99')} ms, cpu {run.cpu_ms_per_event} ms/event, "
                        f"load {run.load_avg}"
                    )
    summary = summarise(runs)
    print("\nmedian over rounds:")
    for s in summary:
        print(line(s))
    if args.json is not None:
        result = {
            "what": "producer send → micro-batch in a no-op agent (bench/faust_hop.py)",
            "broker": "kafka",
            "dataset": args.data.name,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "summary": summary,
            "runs": [asdict(r) for r in runs],
        }
        write_results(result, args.json, lambda r, png: plot(r["summary"], png))


if __name__ == "__main__":
    main()
