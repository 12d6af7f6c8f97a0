"""The benchmark's drain on brokers without lag: every sent event must be counted, as the
workers' metrics endpoints count them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from bench import e2e
from bench.e2e import Phase, Received, Started, events_counted
from infra import procs
from infra.procs import Proc
from shoprec.settings import Settings
from streams.lag import LagUnknown, group_lag, lag_is_known
from streams.metrics import WorkerStats
from streams.observability import StatsCollector, worker_counters


def test_counters_read_from_the_metrics_endpoint_are_the_stats_lines(tmp_path: Path) -> None:
    # The benchmarks and the fault tests read a worker's counters from /metrics.
    stats = WorkerStats()
    stats.events_in, stats.recommended, stats.duplicates, stats.dead_lettered = 7, 4, 2, 1
    stats.re_emitted, stats.degraded = 1, 3
    stats.observe_batch(["shop.views"] * 6, ["not_json"], [12, 30])
    stats.observe_batch(["shop.carts"], [], [])
    stats.batch_sizes.extend([3, 4])
    stats.record_stages({"ingest": 2.0, "ranker": 9.5})
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats))
    read = worker_counters(generate_latest(registry).decode())
    summary = stats.summary()
    for key in ("events_in", "recommended", "duplicates", "dead_lettered", "re_emitted"):
        assert read[key] == summary[key], key
    assert read["degraded"] == 3
    assert read["stages_ms"] == summary["stages_ms"]
    assert read["batch_size"] == summary["batch_size"]


def test_a_worker_whose_endpoint_is_not_up_has_counted_nothing() -> None:
    url = f"http://127.0.0.1:{procs.free_port()}/metrics"
    assert (
        events_counted(Started(Proc("worker-0", 1, None, Path("w.log")), 0, metrics_url=url)) == 0
    )


def tansu_phase(counted: list[int]) -> Phase:
    settings = Settings(_env_file=None, broker="tansu")  # type: ignore[call-arg]
    return Phase(settings, {}, "out", "group", lambda _: (0, None, False), lambda _: counted[0])


async def test_a_quiet_output_does_not_end_the_drain_while_events_are_uncounted() -> None:
    counted = [100]
    got = Received()
    got.last_at = time.monotonic() - 30  # the output went quiet long ago (a stalled worker)
    drain = asyncio.create_task(e2e.drain(tansu_phase(counted), [], got, 300, timeout_s=30))
    await asyncio.sleep(1.5)
    assert not drain.done(), "200 events are not counted yet"
    counted[0] = 300
    took = await asyncio.wait_for(drain, 5)
    assert took is not None and took < 10


async def test_a_drain_without_progress_ends_and_leaves_the_loss_to_the_counters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(e2e, "STALL_S", 1.0)
    got = Received()
    got.last_at = time.monotonic() - 30
    took = await asyncio.wait_for(e2e.drain(tansu_phase([100]), [], got, 300, timeout_s=30), 10)
    assert took is not None and 1.0 <= took < 5


async def test_tansu_reports_no_lag_so_every_drain_counts_events_instead() -> None:
    # One probe (streams.lag) for the worker, bench, soak and fault tests: on Tansu it
    # raises before it asks the broker, and the drains wait on counted events.
    tansu = Settings(_env_file=None, broker="tansu")  # type: ignore[call-arg]
    assert not lag_is_known(tansu)
    with pytest.raises(LagUnknown):
        await group_lag(tansu, "group", ["topic"])
