"""`shoprec bench api`: the pull API under load, beside a live event stream.

On a private stack (Apache Kafka, Redis, Triton with BERT on free ports) with the
dataset's real catalogue, one ``shoprec worker`` and one ``shoprec serve``:

1. the first ``--prime`` real events go through the worker, so their users have state;
2. a separate process then streams the dataset's real events at ``--event-rate`` through
   the worker for the whole measurement (fresh event ids, open loop, as ``bench/e2e.py``);
3. meanwhile the pull API is asked about those real users and their items, first closed
   loop at each ``--concurrency`` (throughput and latency as clients wait for answers),
   then open loop at each ``--rate`` (requests due at fixed times whether or not the
   service keeps up; latency counts from the due time, so no coordinated omission).

The request mix: of every five, one asks for the items similar to a user's item, one
for the user's recommendations with that item in view, three for the user's plain
recommendations.  Reported per step: p50/p95/p99/max latency, requests/s answered,
status codes, degraded answers, the events/s the worker handled meanwhile, CPU of the
API, the worker, Triton and the load generator, and the load average (the machine may
be shared: compare the load average before reading the latencies).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import click
import numpy as np
import orjson
from prometheus_client.parser import text_string_to_metric_families

from bench.e2e import (
    EventSource,
    Started,
    bench_stack,
    cpu_seconds,
    load_catalogue,
    machine,
    offer,
    percentiles_of,
    start_workers,
)
from bench.features import _int_list
from bench.report import DATA, REPO_ROOT, say, write_results
from infra import procs
from ops.produce import start_producer
from shoprec.errors import StackError
from shoprec.settings import Settings
from streams.topics import TopicNames

DEFAULT_DATA = DATA / "rees46-sample"
TARGET = {"p99_ms": 20.0, "requests_per_s": 200.0, "events_per_s": 200.0}
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 10.0


# --- the API process (shared with the demo and the tests) ---------------------------


@dataclass(frozen=True, slots=True)
class ApiServer:
    """A ``shoprec serve`` process and where it answers."""

    proc: procs.Proc
    url: str

    def get(self, path: str, timeout_s: float = 5.0) -> tuple[int, Any]:
        """(status, JSON body) of a GET, 4xx and 5xx included."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout_s) as resp:
                return resp.status, orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read() or b"null")

    def is_ready(self) -> bool:
        try:
            return self.get("/ready", 2.0)[0] == 200
        except (OSError, orjson.JSONDecodeError):
            return False

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Seconds until ``/ready`` says 200; StackError (with the log) if it never does."""
        return procs.wait_until(
            self.is_ready,
            timeout_s,
            "the pull API",
            self.proc.log_path,
            proc=self.proc,
            interval=0.25,
        )

    def stop(self) -> None:
        procs.stop(self.proc)


def start_api(settings: Settings, log_path: Path, env: dict[str, str] | None = None) -> ApiServer:
    """``shoprec serve`` as its own process on a free port (unless the settings name one
    other than the default), with these settings; call :meth:`ApiServer.wait_ready`."""
    default_port = Settings.model_fields["api_port"].default
    port = settings.api_port if settings.api_port != default_port else procs.free_port()
    own = settings.model_copy(update={"api_port": port})
    argv = [sys.executable, "-m", "cli.main", "serve"]
    proc = procs.start("api", argv, log_path, env={**os.environ, **own.as_env(), **(env or {})})
    return ApiServer(proc, f"http://{own.api_host}:{port}")


# --- what the clients ask -----------------------------------------------------------


def request_paths(events: Sequence[dict[str, Any]]) -> list[str]:
    """One request per real event, in the documented mix (see the module docstring)."""
    out = []
    for n, e in enumerate(events):
        user, item = str(e["user_id"]), str(e["item_id"])
        if n % 5 == 0:
            out.append(f"/v1/items/{item}/similar")
        elif n % 5 == 1:
            out.append(f"/v1/users/{user}/recommendations?context_item={item}")
        else:
            out.append(f"/v1/users/{user}/recommendations")
    return out


@dataclass(slots=True)
class Load:
    """What one step measured on the client side."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0  # no HTTP answer at all (refused, timed out)
    answered_all: int = 0  # warm-up included: what the CPU of the step was spent on
    degraded: int = 0
    seconds: float = 0.0
    behind_max_ms: float = 0.0  # how late the generator itself ran (its own CPU share)

    def record(self, status: int, body: bytes, ms: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.latencies_ms.append(ms)
        self.degraded += b'"degraded":true' in body

    def summary(self) -> dict[str, Any]:
        answered = sum(self.statuses.values())
        return {
            "requests": answered + self.errors,
            "requests_per_s": round(answered / self.seconds, 1) if self.seconds else 0.0,
            "latency_ms": percentiles_of(self.latencies_ms),
            "status": {str(k): v for k, v in sorted(self.statuses.items())},
            "no_answer": self.errors,
            "degraded": self.degraded,
            "generator_behind_max_ms": round(self.behind_max_ms, 1),
        }


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as resp:
        return resp.status, await resp.read()


async def closed_loop(
    url: str, paths: Sequence[str], concurrency: int, seconds: float, warmup_s: float
) -> Load:
    """``concurrency`` clients, each asking again as soon as it has its answer."""
    load = Load()
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup_s
    stop_at = measure_from + seconds
    counter = iter(range(sys.maxsize))

    async def client(session: aiohttp.ClientSession) -> None:
        while (now := loop.time()) < stop_at:
            path = paths[next(counter) % len(paths)]
            try:
                status, body = await _get(session, url + path)
            except (aiohttp.ClientError, TimeoutError):
                load.errors += now >= measure_from
                continue
            load.answered_all += 1
            if now >= measure_from:
                load.record(status, body, (loop.time() - now) * 1000)

    async with _session(concurrency) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    load.seconds = seconds
    return load


async def open_loop(
    url: str, paths: Sequence[str], rate: float, seconds: float, warmup_s: float
) -> Load:
    """Request ``i`` is due at ``start + i / rate``; its latency counts from then."""
    load = Load()
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.1
    n_warm = int(rate * warmup_s)
    n = n_warm + int(rate * seconds)

    async def one(session: aiohttp.ClientSession, i: int, due: float) -> None:
        try:
            status, body = await _get(session, url + paths[i % len(paths)])
        except (aiohttp.ClientError, TimeoutError):
            load.errors += i >= n_warm
            return
        load.answered_all += 1
        if i >= n_warm:
            load.record(status, body, (loop.time() - due) * 1000)

    async with _session(256) as session:
        tasks = []
        for i in range(n):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif i >= n_warm:
                load.behind_max_ms = max(load.behind_max_ms, -delay * 1000)
            tasks.append(asyncio.create_task(one(session, i, due)))
        await asyncio.gather(*tasks)
    load.seconds = seconds
    return load


@contextlib.asynccontextmanager
async def _session(connections: int) -> Any:
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


# --- the event stream beside it (its own process) ------------------------------------


def stream_events(settings: Settings, data: Path, rate: float, seconds: float, tag: str) -> None:
    """Offer the dataset's real events at ``rate`` for ``seconds`` (a child process)."""
    # Stopped when the sweep is done: nothing left to flush that anyone will read.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    events = EventSource(data).take(int(rate * seconds), tag)
    asyncio.run(offer_events(settings, events, rate))


async def offer_events(settings: Settings, events: list[dict[str, Any]], rate: float) -> None:
    """``events`` to their topics, open loop at ``rate``, stamped with their due times."""
    names = TopicNames.from_settings(settings)
    topic_of = {t: names.event_topic(t) for t in ("view", "click", "cart", "purchase", "search")}
    producer = await start_producer(settings)
    try:
        await offer(producer, events, rate, time.time() * 1000 + 100, topic_of)
    finally:
        await producer.stop()


# --- one step, the sweep, the results ------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiBenchOptions:
    data: Path
    concurrency: Sequence[int] = (1, 2, 4, 8, 16, 32)
    rates: Sequence[float] = (50, 100, 200, 300)
    duration_s: float = 20.0
    warmup_s: float = 3.0
    event_rate: float = 200.0
    prime_events: int = 3000
    json_out: Path | None = None


@dataclass(slots=True)
class Processes:
    api: ApiServer
    worker: Started
    triton_pid: int
    generator_pid: int = field(default_factory=os.getpid)

    def cpu(self) -> dict[str, float]:
        return {
            "api": cpu_seconds(self.api.proc.pid),
            "worker": cpu_seconds(self.worker.proc.pid),
            "triton": sum(_cpu_or_zero(p) for p in procs.group_members(self.triton_pid)),
            "load_generator": cpu_seconds(self.generator_pid),
        }

    def events_in(self) -> int:
        return int(self.worker.counters()["events_in"])

    def api_sums(self) -> dict[str, tuple[float, float]]:
        """(sum, count) of the API's stage histograms and of its batch sizes, so far."""
        with urllib.request.urlopen(self.api.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out: dict[str, tuple[float, float]] = {}
        for family in text_string_to_metric_families(text):
            if family.name not in ("shoprec_api_stage_seconds", "shoprec_api_batch_size"):
                continue
            for sample in family.samples:
                name = sample.labels.get("stage", "batch_size")
                total, count = out.get(name, (0.0, 0.0))
                if sample.name.endswith("_sum"):
                    out[name] = (sample.value, count)
                elif sample.name.endswith("_count"):
                    out[name] = (total, sample.value)
        return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


def _cpu_or_zero(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:  # a stub that exited meanwhile
        return 0.0


def measure(
    ps: Processes, what: dict[str, Any], load_of: Callable[[], Coroutine[Any, Any, Load]]
) -> dict[str, Any]:
    """One step: the load ``load_of`` makes, with CPU, events handled and load average."""
    events_before, cpu_before, sums_before = ps.events_in(), ps.cpu(), ps.api_sums()
    busy_before = machine_busy()
    began = time.monotonic()
    load = asyncio.run(load_of())
    wall = time.monotonic() - began
    events_after, cpu_after, sums_after = ps.events_in(), ps.cpu(), ps.api_sums()
    busy_after = machine_busy()
    ours = sum(cpu_after.values()) - sum(cpu_before.values())
    busy = busy_after[0] - busy_before[0]
    api_cpu_s = cpu_after["api"] - cpu_before["api"]
    means = {}
    for name, (total, count) in sums_after.items():
        before = sums_before.get(name, (0.0, 0.0))
        n = count - before[1]
        if n:
            scale = 1.0 if name == "batch_size" else 1000.0
            means[name] = round(scale * (total - before[0]) / n, 2)
    return (
        what
        | load.summary()
        | {
            "events_per_s": round((events_after - events_before) / wall, 1),
            # The API process does nothing else; Triton also ranks the stream's events.
            "api_cpu_ms_per_request": round(1000 * api_cpu_s / max(1, load.answered_all), 2),
            # Inside the API: the mean batch, and the mean of each stage in ms (queue per
            # request; the others per batch).
            "api_batch_size_mean": means.pop("batch_size", None),
            "api_stage_ms_mean": means,
            "cpu_pct": {
                name: round(100 * (cpu_after[name] - cpu_before[name]) / wall, 1)
                for name in cpu_after
            },
            # The whole machine's CPU in use, and how much of it this benchmark's processes
            # had (the rest: Kafka, Redis, the kernel, and anything else on the machine).
            "machine_busy_pct": round(100 * busy / max(busy_after[1] - busy_before[1], 1e-9), 1),
            "share_of_busy_cpu_pct": round(100 * ours / max(busy, 1e-9), 1),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
    )


def run_api_bench(opts: ApiBenchOptions, model_repo: Path) -> dict[str, Any]:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_before = os.getloadavg()
    with bench_stack("kafka", model_repo, min_emit_interval_ms=0) as base:
        # One client address asks everything here: the per-address limit would measure
        # itself, not the service.
        settings = base.model_copy(update={"api_rate_limit": 0.0})
        n_items = load_catalogue(settings, opts.data)
        with _running(settings, opts) as ps:
            primed = _prime(ps, settings, opts)
            paths = request_paths(primed)
            url = ps.api.url
            total_s = (opts.duration_s + opts.warmup_s) * (len(opts.concurrency) + len(opts.rates))
            with _event_stream(settings, opts, total_s + 30) as stream:
                steps_c = []
                for c in opts.concurrency:
                    say(f"concurrency {c} beside {opts.event_rate:.0f} events/s ...")
                    closed = partial(closed_loop, url, paths, c, opts.duration_s, opts.warmup_s)
                    steps_c.append(measure(ps, {"concurrency": c}, closed))
                    say(_one_line(steps_c[-1]))
                steps_r = []
                for rate in opts.rates:
                    say(f"{rate:.0f} requests/s beside {opts.event_rate:.0f} events/s ...")
                    opened = partial(open_loop, url, paths, rate, opts.duration_s, opts.warmup_s)
                    steps_r.append(measure(ps, {"offered_rate": rate}, opened))
                    say(_one_line(steps_r[-1]))
                if stream.exitcode not in (None, 0):
                    raise StackError(f"the event stream failed (exit {stream.exitcode})")
    at_target = [s for s in steps_r if s["offered_rate"] == TARGET["requests_per_s"]]
    result: dict[str, Any] = {
        "dataset": opts.data.name,
        "catalogue_items": n_items,
        "primed_events": len(primed),
        "event_rate": opts.event_rate,
        "duration_s": opts.duration_s,
        "warmup_s": opts.warmup_s,
        "request_mix": "1/5 similar items, 1/5 user with context_item, 3/5 user",
        "api_rate_limit": "off (one client address)",
        "machine": machine()
        | {
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "target": TARGET,
        "target_met": bool(at_target)
        and at_target[0]["latency_ms"].get("p99", float("inf")) < TARGET["p99_ms"]
        and at_target[0]["events_per_s"] >= 0.9 * TARGET["events_per_s"],
        "by_concurrency": steps_c,
        "by_rate": steps_r,
    }
    if opts.json_out is not None:
        write_results(result, opts.json_out, plot)
    return result


@contextlib.contextmanager
def _running(settings: Settings, opts: ApiBenchOptions) -> Iterator[Processes]:
    from infra.stack import Stack

    logs = settings.stack_dir / "logs"
    [worker] = start_workers(settings, 1, logs)
    api: ApiServer | None = None
    try:
        api = start_api(settings, logs / "api.log")
        took = api.wait_ready()
        say(f"pull API ready in {took:.1f} s at {api.url}")
        triton = Stack(settings, model_repo=REPO_ROOT / "model_repo").status()["triton"]["pid"]
        yield Processes(api, worker, int(triton))
    finally:
        if api is not None:
            api.stop()
        procs.stop(worker.proc)


def _prime(ps: Processes, settings: Settings, opts: ApiBenchOptions) -> list[dict[str, Any]]:
    """The first real events through the worker, so their users have state to rank from."""
    events = EventSource(opts.data).take(opts.prime_events, "prime")
    say(f"priming: {len(events)} real events through the worker ...")
    before = ps.events_in()
    asyncio.run(offer_events(settings, events, 1000.0))
    procs.wait_until(
        lambda: ps.events_in() - before >= len(events),
        300,
        "the worker to take the priming events",
        ps.worker.proc.log_path,
        proc=ps.worker.proc,
        interval=0.5,
    )
    return events


@contextlib.contextmanager
def _event_stream(
    settings: Settings, opts: ApiBenchOptions, seconds: float
) -> Iterator[multiprocessing.process.BaseProcess]:
    """The dataset's events at ``--event-rate`` from a process of their own, so the load
    generator's timing and the producer's do not share one event loop."""
    ctx = multiprocessing.get_context("spawn")
    args = (settings, opts.data, opts.event_rate, seconds, "stream")
    proc = ctx.Process(target=stream_events, args=args, name="event-stream")
    proc.start()
    try:
        time.sleep(2.0)  # the producer connects; the first events reach the worker
        yield proc
    finally:
        if proc.is_alive():
            proc.terminate()
        proc.join(30)


def _one_line(step: dict[str, Any]) -> str:
    lat = step["latency_ms"]
    return (
        f"  p50 {lat.get('p50')} p95 {lat.get('p95')} p99 {lat.get('p99')} ms, "
        f"{step['requests_per_s']} req/s, status {step['status']}, "
        f"{step['events_per_s']} events/s, cpu {step['cpu_pct']}%, "
        f"batch {step['api_batch_size_mean']}, stages {step['api_stage_ms_mean']} ms, "
        f"load {step['load_avg_1m']}"
    )


def plot(result: dict[str, Any], path: Path) -> None:
    """Latency percentiles and throughput against concurrency, and against offered rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    by_c, by_r = result["by_concurrency"], result["by_rate"]
    xs = [s["concurrency"] for s in by_c]
    for q, style in (("p50", "-o"), ("p95", "-s"), ("p99", "--o")):
        left.plot(xs, [s["latency_ms"].get(q, np.nan) for s in by_c], style, label=q)
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent clients (closed loop)")
    left.set_ylabel("latency, ms")
    throughput = left.twinx()
    throughput.plot(xs, [s["requests_per_s"] for s in by_c], ":^", color="grey", label="req/s")
    throughput.set_ylabel("requests/s answered")
    left.legend(loc="upper left", fontsize=8)
    throughput.legend(loc="lower right", fontsize=8)
    rates = [s["offered_rate"] for s in by_r]
    for q, style in (("p50", "-o"), ("p95", "-s"), ("p99", "--o")):
        right.plot(rates, [s["latency_ms"].get(q, np.nan) for s in by_r], style, label=q)
    right.axhline(TARGET["p99_ms"], color="red", lw=0.8, ls=":", label="target p99")
    right.set_xlabel("offered requests/s (open loop)")
    right.set_ylabel("latency from due time, ms")
    right.set_yscale("log")
    right.legend(fontsize=8)
    load = result["machine"]["load_avg_after"][0]
    steps = [*by_c, *by_r]
    busy = np.median([s["machine_busy_pct"] for s in steps])
    ours = np.median([s["share_of_busy_cpu_pct"] for s in steps])
    fig.suptitle(
        f"pull API beside {result['event_rate']:.0f} events/s through a worker "
        f"({result['machine']['cpus']} cores, Triton on CPU; load average {load}, CPUs "
        f"{busy:.0f}% busy, {ours:.0f}% of that this benchmark's)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command("api")
@click.option(
    "--concurrency",
    default="1,2,4,8,16,32",
    show_default=True,
    help="Closed-loop clients per step, comma-separated.",
)
@click.option(
    "--rate",
    "rates",
    default="50,100,200,300",
    show_default=True,
    help="Open-loop requests/s per step, comma-separated.",
)
@click.option("--duration", default=20.0, show_default=True, help="Measured seconds per step.")
@click.option("--warmup", default=3.0, show_default=True, help="Unmeasured seconds per step.")
@click.option("--event-rate", default=200.0, show_default=True, help="Events/s streamed meanwhile.")
@click.option(
    "--prime", default=3000, show_default=True, help="Real events applied before measuring."
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=DEFAULT_DATA,
    show_default=True,
    help="Dataset whose catalogue, events and users are used.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the results here, and a plot beside it (.png).",
)
def api_command(
    concurrency: str,
    rates: str,
    duration: float,
    warmup: float,
    event_rate: float,
    prime: int,
    data: Path,
    json_out: Path | None,
) -> None:
    """Measure the pull API at increasing load beside a live event stream.

    Starts a private stack, a worker and `shoprec serve`; primes state with real
    events; streams --event-rate events/s meanwhile; then asks the API about the
    dataset's real users closed loop at each --concurrency and open loop at each
    --rate. About 5 minutes with the defaults; progress goes to stderr.

    \b
    Example (the committed result):
      shoprec bench api --json bench/results/api.json
    """
    opts = ApiBenchOptions(
        data=data,
        concurrency=_int_list(concurrency),
        rates=[float(r) for r in _int_list(rates)],
        duration_s=duration,
        warmup_s=warmup,
        event_rate=event_rate,
        prime_events=prime,
        json_out=json_out,
    )
    try:
        result = run_api_bench(opts, REPO_ROOT / "model_repo")
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    for step in (*result["by_concurrency"], *result["by_rate"]):
        what = (
            f"x{step['concurrency']}" if "concurrency" in step else f"{step['offered_rate']:.0f}/s"
        )
        click.echo(f"{what}: {_one_line(step).strip()}")
    click.echo(f"target (p99 < 20 ms at 200 req/s beside 200 events/s) met: {result['target_met']}")
