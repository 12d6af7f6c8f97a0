"""The operator's path through the CLI, on a real dataset whose items have no text (OTTO)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from infra.stack import Endpoints
from tests.integration.helpers import WorkerProcess, isolated_settings, settings_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def shoprec(
    env: dict[str, str], *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoprec.cli", *args],
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
    try:
        produced = shoprec(
            env, "produce", "--data", str(data_dir / "otto-sample"), "--limit", "400"
        )
        assert produced.returncode == 0, produced.stderr
        report = orjson.loads(produced.stdout)
        assert report["events"] == 400 and report["items"] == 510
        # Ten users, and the worker coalesces one user's events within a micro-batch:
        # only one recommendation per user is certain, however the batches fall.
        tail = shoprec(
            env, "recs", "tail", "--from-beginning", "--json", "--limit", "10", "--timeout", "120"
        )
        assert tail.returncode == 0, tail.stderr + worker.log()
    finally:
        worker.stop()
    recs = [orjson.loads(line) for line in tail.stdout.splitlines()]
    assert len(recs) == 10, worker.log()
    # OTTO items have no text: every item recommended came from behaviour.
    with_items = [r for r in recs if r["items"]]
    assert with_items, recs
    reasons = {reason for r in with_items for i in r["items"] for reason in i["reasons"]}
    assert not {x for x in reasons if x.startswith(("similar to", "matches"))}, reasons
    assert any(x.startswith("often seen together with") for x in reasons), reasons
    assert all(r["model"].startswith("fused_ranker@") for r in recs)


def test_worker_refuses_to_start_without_redis(stack: Endpoints, tmp_path: Path) -> None:
    settings = isolated_settings(stack)
    env = settings_env(settings) | {"SHOPREC_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = shoprec(env, "worker", timeout=60)
    assert result.returncode != 0
    assert "cannot reach Redis" in result.stderr
