"""The operator's path through the CLI, on a real dataset whose items have no text (OTTO)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from redis import Redis

from features import keys
from infra.stack import Endpoints
from tests.integration.helpers import isolated_settings, settings_env
from tests.worker import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def shoprec(
    env: dict[str, str], *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_items_without_text_are_recommended_from_behaviour(
    stack: Endpoints, data_dir: Path, tmp_path: Path
) -> None:
    settings = isolated_settings(stack, min_emit_interval_ms=0)
    env = settings_env(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    otto = str(data_dir / "otto-sample")
    redis = Redis.from_url(stack.redis_url)
    try:
        # The operator's order: the catalogue first, events once it is stored (events
        # that arrive before their items have nothing to recommend).
        stored_before = redis.xlen(keys.ITEM_LOG)
        loaded = shoprec(env, "catalog", "load", "--data", otto)
        assert loaded.returncode == 0, loaded.stderr
        deadline = time.monotonic() + 120
        while redis.xlen(keys.ITEM_LOG) < stored_before + 510:
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(0.5)
        produced = shoprec(env, "produce", "--data", otto, "--no-catalog", "--limit", "400")
        assert produced.returncode == 0, produced.stderr
        assert orjson.loads(produced.stdout)["events"] == 400
        # Ten users, and the worker coalesces one user's events within a micro-batch:
        # only one recommendation per user is certain, however the batches fall.
        tail = shoprec(
            env, "recs", "tail", "--from-beginning", "--json", "--limit", "10", "--timeout", "120"
        )
        assert tail.returncode == 0, tail.stderr + worker.tail()
    finally:
        worker.close()
        redis.close()
    recs = [orjson.loads(line) for line in tail.stdout.splitlines()]
    assert len(recs) == 10, worker.tail()
    # OTTO items have no text: every item recommended came from behaviour.
    with_items = [r for r in recs if r["items"]]
    assert with_items, recs
    reasons = {reason for r in with_items for i in r["items"] for reason in i["reasons"]}
    assert not {x for x in reasons if x.startswith(("similar to", "matches"))}, reasons
    # Co-visitation, or the user's own history (an item of it is explained as such,
    # whichever source brought it).
    behaviour = ("often seen together with", "you viewed this before", "you bought this before")
    assert any(x.startswith(behaviour) for x in reasons), reasons
    assert all(r["model"].startswith("fused_ranker@") for r in recs)


def test_worker_refuses_to_start_without_redis(stack: Endpoints, tmp_path: Path) -> None:
    settings = isolated_settings(stack)
    env = settings_env(settings) | {"SHOPREC_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = shoprec(env, "worker", timeout=60)
    assert result.returncode != 0
    assert "cannot reach Redis" in result.stderr
