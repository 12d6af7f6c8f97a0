"""`shoprec bench soak`: minutes of steady load on the real stack; nothing lost, memory flat.

One worker, a private stack (Apache Kafka, Redis, Triton with BERT) on free ports,
the dataset's real events offered open loop at a constant rate (the latency
target's 500 events/s by default) for ``--duration`` seconds.  While it runs the
worker's resident memory is sampled every few seconds and the consumer group's
lag every second; afterwards the worker's final counters are checked against
what was offered.  Results: JSON and a three-panel plot (memory, lag, latency
per window) beside it.

Runs the end-to-end benchmark's phase (:mod:`bench.e2e`: load generator, output
consumer, lag samples, drain), so the two measure latency, and drain on a broker
without lag (Tansu), the same way.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from bench.e2e import (
    BenchOptions,
    EventSource,
    bench_stack,
    cpu_seconds,
    load_catalogue,
    machine,
    peak_rss_mb,
    percentiles_of,
    run_phase,
    start_workers,
    summarise_run,
    worker_phase,
)
from bench.report import DATA, REPO_ROOT, say, write_results
from infra import procs
from shoprec.errors import ShoprecError
from shoprec.settings import Settings

DEFAULT_DATA = DATA / "rees46-sample"
DEFAULT_JSON = REPO_ROOT / "bench" / "results" / "soak.json"
RSS_EVERY_S = 5.0
WINDOWS = 10
# Memory is "flat" when the fitted growth over the run's second half stays under this.
FLAT_MB_PER_MIN = 2.0


@dataclass(frozen=True, slots=True)
class SoakOptions:
    data: Path
    rate: float
    duration_s: float
    broker: str
    min_emit_interval_ms: int
    json_out: Path | None


class RssSampler:
    """Resident memory of one process every ``every_s`` seconds, in a thread."""

    def __init__(self, pid: int, every_s: float = RSS_EVERY_S) -> None:
        self.pid = pid
        self.every_s = every_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = procs.memory_mb(self.pid)
            if rss is not None:
                self.samples.append((round(time.monotonic() - self._t0, 1), round(rss, 1)))
            self._stop.wait(self.every_s)


def memory_trend(samples: list[tuple[float, float]]) -> dict[str, Any]:
    """Growth fitted over the second half of the run (the first half includes warm-up)."""
    if len(samples) < 4:
        return {"samples": len(samples)}
    t, mb = np.asarray(samples).T
    late = t >= t[-1] / 2
    slope = float(np.polyfit(t[late] / 60.0, mb[late], 1)[0])
    return {
        "first_mb": float(mb[0]),
        "peak_mb": float(mb.max()),
        "last_mb": float(mb[-1]),
        "second_half_slope_mb_per_min": round(slope, 3),
        "flat": abs(slope) < FLAT_MB_PER_MIN,
    }


def latency_windows(latencies_ms: list[float], n: int = WINDOWS) -> list[dict[str, float]]:
    """Percentiles per consecutive slice of the run (constant rate: slices are equal time)."""
    if not latencies_ms:
        return []
    return [percentiles_of(list(part)) for part in np.array_split(latencies_ms, n) if len(part)]


def run_soak(opts: SoakOptions, model_repo: Path) -> dict[str, Any]:
    source = EventSource(opts.data)
    with bench_stack(opts.broker, model_repo, opts.min_emit_interval_ms) as base:
        n_items = load_catalogue(base, opts.data)
        settings: Settings = base.model_copy(update={"app_id": "shoprec-soak"})
        bench_opts = BenchOptions(
            data=opts.data,
            rates=[opts.rate],
            duration_s=opts.duration_s,
            warmup_s=10.0,
            drain_timeout_s=600.0,
        )
        events = source.take(int(opts.rate * (bench_opts.warmup_s + opts.duration_s)), "soak")
        [worker] = start_workers(settings, 1, settings.stack_dir / "logs")
        try:
            cpu0 = cpu_seconds(worker.proc.pid)
            phase = worker_phase(settings, [worker])
            say(f"soak: {len(events)} events at {opts.rate:.0f}/s for {opts.duration_s:.0f} s ...")
            began = time.monotonic()
            with RssSampler(worker.proc.pid) as rss:
                # A backlog not drained in time is a result, not an error: the counters
                # then say how far the worker got.
                result = asyncio.run(run_phase(phase, events, opts.rate, bench_opts))
            if not result.drained:
                say(f"soak: {phase.group} did not catch up in {bench_opts.drain_timeout_s:.0f} s")
            busy_s = result.received.last_at - began
            cpu = cpu_seconds(worker.proc.pid) - cpu0
            peak = peak_rss_mb(worker.proc.pid)
            stats = worker.counters()
        finally:
            procs.stop(worker.proc)
    run = summarise_run(result, [stats], busy_s, [cpu], [peak])
    buckets = ("recommended", "dead_lettered", "duplicates", "rate_limited", "coalesced")
    c = run["counters"]
    out: dict[str, Any] = {
        "dataset": opts.data.name,
        "broker": opts.broker,
        "catalogue_items": n_items,
        "offered_rate": opts.rate,
        "duration_s": opts.duration_s,
        "min_emit_interval_ms": opts.min_emit_interval_ms,
        "machine": machine(),
        "drained": result.drained,
        "nothing_lost": run["lost"] == 0
        and c["events_in"] == sum(c[b] for b in buckets) == result.offered.sent,
        "memory": memory_trend(rss.samples) | {"rss_mb": rss.samples},
        "lag": {"max": max(result.lags, default=0), "per_s": result.lags},
        "latency_by_window_ms": latency_windows(result.received.latencies_ms),
    } | run
    if opts.json_out is not None:
        write_results(out, opts.json_out, plot)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, lag, lat) = plt.subplots(3, 1, figsize=(7, 8), sharex=False)
    samples = result["memory"]["rss_mb"]
    mem.plot([t / 60 for t, _ in samples], [mb for _, mb in samples], "-")
    mem.set_ylabel("worker RSS, MB")
    mem.set_xlabel("minutes")
    lags = result["lag"]["per_s"]
    lag.plot([i / 60 for i in range(len(lags))], lags, "-")
    lag.set_ylabel("consumer lag, records")
    lag.set_xlabel("minutes")
    windows = result["latency_by_window_ms"]
    xs = [(i + 0.5) * result["duration_s"] / 60 / max(1, len(windows)) for i in range(len(windows))]
    for q, style in (("p50", "-o"), ("p99", "--o")):
        lat.plot(xs, [w.get(q, np.nan) for w in windows], style, label=q)
    lat.set_yscale("log")
    lat.set_ylabel("event → output latency, ms")
    lat.set_xlabel("minutes (windows of equal size)")
    lat.legend(fontsize=8)
    fig.suptitle(
        f"soak: {result['offered_rate']:.0f} events/s for {result['duration_s'] / 60:.0f} min "
        f"on {result['broker']}, lost {result['lost']}"
    )
    for ax in (mem, lag, lat):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command()
@click.option("--rate", default=500.0, show_default=True, help="Offered events/s, constant.")
@click.option("--duration", default=600.0, show_default=True, help="Seconds of load.")
@click.option(
    "--min-emit-interval-ms",
    default=30_000,
    show_default=True,
    help="The worker's SHOPREC_MIN_EMIT_INTERVAL_MS during the soak (the production default).",
)
@click.option("--broker", type=click.Choice(["kafka", "tansu"]), default="kafka", show_default=True)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=DEFAULT_DATA,
    show_default=True,
    help="Dataset whose real events (and catalogue) are offered, cycled with fresh ids.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_JSON,
    show_default=True,
    help="Results file; the plot goes beside it (.png).",
)
def soak_command(
    rate: float,
    duration: float,
    min_emit_interval_ms: int,
    broker: str,
    data: Path,
    json_out: Path,
) -> None:
    """Steady load for minutes on a private real stack: report loss, memory and lag.

    Exits non-zero when an event was lost or the worker's memory kept growing.

    \b
    Examples:
      shoprec bench soak                      # 500 events/s for 10 minutes
      shoprec bench soak --rate 200 --duration 120 --json /tmp/soak.json
    """
    opts = SoakOptions(data, rate, duration, broker, min_emit_interval_ms, json_out)
    try:
        result = run_soak(opts, REPO_ROOT / "model_repo")
    except ShoprecError as exc:
        raise click.ClickException(str(exc)) from exc
    mem = result["memory"]
    click.echo(
        f"soak {rate:.0f}/s for {duration:.0f} s: sent {result['events_sent']}, "
        f"lost {result['lost']}, latency {result['latency_ms']}, lag max {result['lag']['max']}, "
        f"RSS {mem.get('first_mb')} -> {mem.get('last_mb')} MB "
        f"(second half {mem.get('second_half_slope_mb_per_min')} MB/min)"
    )
    if not result["nothing_lost"] or not mem.get("flat", False):
        raise click.ClickException("the soak lost events or the worker's memory kept growing")
