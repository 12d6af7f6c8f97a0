"""`shoprec bench capacity`: capacity with 1, 2 and 3 workers on the cluster, what each
process spends per event, and the capacity model made from it.

It runs the end-to-end sweep (:mod:`bench.e2e`) on the cluster profile (three Kafka
nodes with replication factor 3, a Redis Cluster of three primaries and three replicas,
two Tritons), with every offered rate for every worker count, each run on fresh event ids
of the real dataset, open loop.  Around each measured phase :class:`~bench.stackwatch.
StackWatch` reads the CPU seconds of every process (each broker, each Redis node, each
Triton with its stubs, each worker, and this process: the load generator and the output
reader) and the commands every Redis node ran; after the last run, what a user's state
takes in Redis.  From that it builds the model (:func:`capacity_model`): events/s per
worker core, Redis commands and CPU per event and memory per million users, Triton cores
per 10,000 ranked events/s, Kafka cores per 10,000 events/s, and the partitions needed.

On a small machine the parts share the cores, so the events/s a run reaches is the
machine's, not a worker's; the CPU per event of each part is what carries over to a
deployment where each part has cores of its own.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
import orjson

from bench.e2e import BenchOptions, run_bench
from bench.report import DATA, REPO_ROOT, write_results
from features import keys
from features.connection import open_redis
from ops.produce import dataset_files, read_jsonl
from shoprec.errors import ShoprecError
from shoprec.settings import Settings

DEFAULT_DATA = DATA / "rees46-sample"
DEFAULT_JSON = REPO_ROOT / "bench" / "results" / "capacity-cluster.json"
SAMPLED_USERS = 400
# A run is saturated (its events/s is a capacity) when this much of what was offered
# could not be handled at the offered rate.
SATURATED = 0.9


async def state_sizes(settings: Settings, users: Sequence[str]) -> dict[str, Any]:
    """Bytes a user's state takes in Redis (``MEMORY USAGE`` of each of their keys, for
    a sample of users that have state), and what the shared counters take."""
    redis = open_redis(settings.redis_url, cluster=settings.redis_cluster, timeout_s=30.0)
    token = keys.STATE_PREFIX.set(settings.state_prefix)
    try:
        per_user: list[int] = []
        for user in users:
            sizes = [await redis.memory_usage(k, samples=0) for k in keys.user_keys(user)]
            if sizes[1]:  # the meta hash: the user has state
                per_user.append(sum(int(x or 0) for x in sizes))
            if len(per_user) >= SAMPLED_USERS:
                break
        covis = [
            int(await redis.memory_usage(k, samples=0) or 0)
            async for k in redis.scan_iter(match=f"{settings.state_prefix}{{i:*}}:cv", count=5000)
        ]
        popularity = [
            int(await redis.memory_usage(k, samples=0) or 0)
            async for k in redis.scan_iter(match=f"{settings.state_prefix}pop:*", count=5000)
        ]
    finally:
        keys.STATE_PREFIX.reset(token)
        await redis.aclose()
    return {
        "users_sampled": len(per_user),
        "bytes_per_user": round(statistics.mean(per_user)) if per_user else None,
        "bytes_per_user_p95": round(float(np.percentile(per_user, 95))) if per_user else None,
        "covisitation_keys": len(covis),
        "bytes_per_covisitation_key": round(statistics.mean(covis)) if covis else None,
        "popularity_keys": len(popularity),
        "popularity_bytes": sum(popularity),
    }


def inspect_state(data: Path) -> Any:
    """What :func:`run_bench` asks the stack after the last run: the state's sizes."""
    _, events = dataset_files(data)
    users = sorted({str(e["user_id"]) for e in read_jsonl(events)})
    random.Random(14).shuffle(users)

    def inspect(settings: Settings) -> dict[str, Any]:
        return {"redis_state": asyncio.run(state_sizes(settings, users))}

    return inspect


def _median(values: Sequence[float]) -> float:
    return round(float(statistics.median(values)), 4) if values else float("nan")


def capacity_model(result: dict[str, Any], replicas: int = 1) -> dict[str, Any]:
    """The capacity model: per-core and per-10k figures from the runs' CPU per event
    (medians over the saturated runs)."""
    measured = [r for r in result["runs"] if "stack" in r]
    # Per-event costs from the saturated runs: there the batches are full and the fixed
    # costs (per batch, per poll) are shared by the most events, as at capacity; a light
    # load costs more per event (smaller batches) but needs no capacity.
    runs = [r for r in measured if r["events_per_s"] < SATURATED * r["offered_rate"]] or measured
    # Workers and the generator as spent; the stack's parts less their idle cost, which
    # is a fixed cost per node, not per event (given apart as idle cores).
    gross = [r["stack"]["cpu_ms_per_event_by_component"] for r in runs]
    net = [
        r["stack"].get("net_cpu_ms_per_event_by_component", g)
        for r, g in zip(runs, gross, strict=True)
    ]
    worker_ms = _median([c.get("worker", math.nan) for c in gross])
    generator_ms = _median([c.get("generator", math.nan) for c in gross])
    redis_ms = _median([c.get("redis", math.nan) for c in net])
    broker_ms = _median([c.get("broker", math.nan) for c in net])
    idle = runs[0]["stack"].get("idle_cpu_cores_by_component", {}) if runs else {}
    triton_ranked_ms = _median([r["stack"]["triton_cpu_ms_per_ranked"] for r in runs])
    ranked_share = _median([r["stack"]["ranked"] / max(1, r["stack"]["events"]) for r in runs])
    commands = _median([r["stack"]["redis_commands_per_event"] for r in runs])
    on_primaries = _median(
        [r["stack"].get("redis_commands_per_event_on_primaries", math.nan) for r in runs]
    )
    scripts = _median([r["stack"]["redis_script_calls_per_event"] for r in runs])
    per_worker_core = 1000.0 / worker_ms
    workers_10k = math.ceil(10_000 / per_worker_core)
    capacity: dict[str, float] = {}
    for r in measured:
        key = f"{r['workers']}"
        capacity[key] = max(capacity.get(key, 0.0), float(r["events_per_s"]))
    saturated = [
        {"workers": r["workers"], "offered": r["offered_rate"], "events_per_s": r["events_per_s"]}
        for r in measured
        if r["events_per_s"] < SATURATED * r["offered_rate"]
    ]
    state = result.get("redis_state", {})
    per_user = state.get("bytes_per_user")
    return {
        "capacity_events_per_s_by_workers": capacity,
        "saturated_runs": saturated,
        "cpu_ms_per_event": {
            "worker": worker_ms,
            "redis_all_nodes": redis_ms,
            "kafka_all_brokers": broker_ms,
            "triton_per_ranked": triton_ranked_ms,
            "load_generator": generator_ms,
        },
        "idle_cpu_cores": {k: round(v, 3) for k, v in idle.items()},
        "ranked_share_of_events": ranked_share,
        "worker_events_per_s_per_core": round(per_worker_core, 1),
        "workers_per_10k_events_per_s": workers_10k,
        # Faust gives each worker whole partitions (of every input topic alike): one
        # partition per worker at least, and room to add workers without re-partitioning.
        "partitions_per_input_topic_for_10k": 2 * workers_10k,
        # Primaries and replicas together: a replica re-runs each write's effects.
        "redis_commands_per_event": commands,
        "redis_commands_per_event_on_primaries": on_primaries,
        "redis_script_calls_per_event": scripts,
        "redis_events_per_s_per_core": round(1000.0 / redis_ms, 1),
        "redis_cores_per_10k_events_per_s": round(10 * redis_ms, 2),
        "redis_gib_per_million_users": (
            round(per_user * 1e6 * (1 + replicas) / 2**30, 2) if per_user else None
        ),
        "triton_cpu_cores_per_10k_ranked_per_s": round(10 * triton_ranked_ms, 2),
        "kafka_cores_per_10k_events_per_s": round(10 * broker_ms, 2),
        "gpu": "not measured (no GPU on this machine)",
    }


def _net(run: dict[str, Any]) -> dict[str, float]:
    stack = run["stack"]
    net: dict[str, float] = stack.get(
        "net_cpu_ms_per_event_by_component", stack["cpu_ms_per_event_by_component"]
    )
    return net


def plot(result: dict[str, Any], path: Path) -> None:
    """Events/s reached per worker count, and the CPU each part spent per event."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if "stack" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for rate in sorted({r["offered_rate"] for r in runs}):
        mine = sorted((r for r in runs if r["offered_rate"] == rate), key=lambda r: r["workers"])
        left.plot(
            [r["workers"] for r in mine],
            [r["events_per_s"] for r in mine],
            "-o",
            label=f"offered {rate:.0f}/s",
        )
    left.set_xlabel("workers")
    left.set_ylabel("events/s handled")
    left.set_xticks(sorted({r["workers"] for r in runs}))
    left.set_title("throughput on one 2-core machine (all parts share it)")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    top = max(r["offered_rate"] for r in runs)
    at_top = sorted((r for r in runs if r["offered_rate"] == top), key=lambda r: r["workers"])
    parts = ["worker", "redis", "triton", "broker", "generator"]
    bottom = np.zeros(len(at_top))
    xs = np.arange(len(at_top))
    for part in parts:
        ys = np.array([_net(r).get(part, 0.0) for r in at_top])
        right.bar(xs, ys, bottom=bottom, label=part)
        bottom += ys
    right.set_xticks(xs, [f"{r['workers']} worker(s)" for r in at_top])
    right.set_ylabel("CPU ms per event")
    right.set_title(f"CPU per event by part (net of idle), offered {top:.0f}/s")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_capacity(
    data: Path,
    rates: Sequence[float],
    workers: Sequence[int],
    duration_s: float,
    json_out: Path,
    min_emit_interval_ms: int = 0,
) -> dict[str, Any]:
    opts = BenchOptions(
        data=data,
        rates=rates,
        duration_s=duration_s,
        workers=workers,
        skip_floor=True,
        cluster=True,
        min_emit_interval_ms=min_emit_interval_ms,
    )
    result = run_bench(opts, REPO_ROOT / "model_repo", inspect=inspect_state(data))
    result["model"] = capacity_model(result)
    write_results(result, json_out, plot)
    return result


@click.command()
@click.option(
    "--rate",
    "rates",
    default="100,500",
    show_default=True,
    help="Offered events/s, comma-separated: one below capacity, one above it.",
)
@click.option("--workers", default="1,2,3", show_default=True, help="Worker counts to measure.")
@click.option("--duration", default=15.0, show_default=True, help="Measured seconds per run.")
@click.option(
    "--min-emit-interval-ms",
    default=0,
    show_default=True,
    help="The workers' flood control: 0 ranks on every event (the heaviest load); 30000, "
    "production's default, ranks a user at most every 30 s (mostly state updates).",
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=DEFAULT_DATA,
    show_default=True,
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_JSON,
    show_default=True,
    help="Results, with a plot beside them (.png).",
)
def capacity_command(
    rates: str,
    workers: str,
    duration: float,
    min_emit_interval_ms: int,
    data: Path,
    json_out: Path,
) -> None:
    """Capacity on the local cluster with 1, 2, 3 workers, CPU per event of every process,
    and the capacity model (docs/capacity.md explains it).  About 4.3 GiB, 15-25 minutes.

    By default every event may trigger a ranked recommendation (no per-user flood
    control): the heaviest load a worker gets.
    """
    try:
        result = run_capacity(
            data,
            [float(r) for r in rates.split(",")],
            [int(w) for w in workers.split(",")],
            duration,
            json_out,
            min_emit_interval_ms,
        )
    except ShoprecError as exc:
        raise click.ClickException(str(exc)) from exc
    for run in result["runs"]:
        part = run["stack"]["cpu_ms_per_event_by_component"]
        click.echo(
            f"{run['offered_rate']:.0f}/s x{run['workers']}: {run['events_per_s']} events/s, "
            f"p50 {run['latency_ms'].get('p50')} ms, lost {run['lost']}, CPU ms/event {part}"
        )
    click.echo(orjson.dumps(result["model"], option=orjson.OPT_INDENT_2).decode())
