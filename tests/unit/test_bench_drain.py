"""The benchmark's drain on brokers without lag: every sent event must be counted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bench import e2e
from bench.e2e import Phase, Received, Started, events_counted
from infra.procs import Proc
from shoprec.settings import Settings

STATS = "[2026-11-25 20:29:37,894] [4993] [INFO] stats {{'events_in': {n}, 'recommended': 1}}\n"


def worker_log(tmp_path: Path, *counts: int, final: bool = False) -> Started:
    log = tmp_path / "worker.log"
    log.write_text("earlier run\n" + STATS.format(n=999))
    offset = log.stat().st_size
    with log.open("a") as fh:
        fh.write("[2026-11-25] [1] [INFO] Worker ready\n")
        for n in counts:
            fh.write(STATS.format(n=n))
        if final:
            fh.write("[2026-11-25] [1] [INFO] final stats {'events_in': 5}\n")
    return Started(Proc("worker-0", 1, None, log), offset)


def test_the_latest_periodic_stats_line_of_this_run_counts(tmp_path: Path) -> None:
    assert events_counted(worker_log(tmp_path)) == 0, "the earlier run's line is not ours"
    assert events_counted(worker_log(tmp_path, 10, 250)) == 250
    assert events_counted(worker_log(tmp_path, 10, 250, final=True)) == 250


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
    assert await asyncio.wait_for(drain, 5) < 10


async def test_a_drain_without_progress_ends_and_leaves_the_loss_to_the_counters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(e2e, "STALL_S", 1.0)
    got = Received()
    got.last_at = time.monotonic() - 30
    took = await asyncio.wait_for(e2e.drain(tansu_phase([100]), [], got, 300, timeout_s=30), 10)
    assert 1.0 <= took < 5
