"""Helpers shared by the integration tests: isolated settings and the real data
(the worker subprocess is ``tests/worker.py``, shared with the fault tests)."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson

from infra.stack import Endpoints
from shoprec.settings import Settings


def stack_env(endpoints: Endpoints, **extra: str) -> dict[str, str]:
    """Environment for a shoprec process talking to the test stack."""
    return {
        "SHOPREC_KAFKA_BOOTSTRAP": endpoints.kafka_bootstrap,
        "SHOPREC_REDIS_URL": endpoints.redis_url,
        "SHOPREC_TRITON_URL": endpoints.triton_url,
        **extra,
    }


def isolated_settings(endpoints: Endpoints, **overrides: object) -> Settings:
    """Settings with a fresh topic prefix, app id and user-state prefix, so tests never
    see each other's data (several replay the same real events: same users, same event
    ids, which shared state would count as duplicates)."""
    tag = uuid.uuid4().hex[:8]
    isolation: dict[str, object] = {
        "topic_prefix": f"t{tag}.",
        "app_id": f"shoprec-test-{tag}",
        "state_prefix": f"t{tag}:",
        # Each worker gets a free metrics port (tests.worker), never the shared default.
        "metrics_port": 0,
    }
    return Settings(
        kafka_bootstrap=endpoints.kafka_bootstrap,
        redis_url=endpoints.redis_url,  # type: ignore[arg-type]
        triton_url=endpoints.triton_url,
        _env_file=None,  # type: ignore[call-arg]
        **(isolation | overrides),  # type: ignore[arg-type]
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The same settings as SHOPREC_* variables, for a worker subprocess."""
    return settings.as_env()


def rees46_fixture(
    data_dir: Path, n_events: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The first ``n_events`` real rees46 events and the catalogue records of their items."""
    folder = data_dir / "rees46-sample"
    with gzip.open(folder / "events.jsonl.gz", "rb") as fh:
        events = [orjson.loads(line) for _, line in zip(range(n_events), fh, strict=False)]
    wanted = {e["item_id"] for e in events}
    with gzip.open(folder / "items.jsonl.gz", "rb") as fh:
        items = [it for line in fh if (it := orjson.loads(line))["item_id"] in wanted]
    return events, items


def copy_model_repo(parent: Path) -> Path:
    """A private copy of the repository's ``model_repo`` under ``parent``: tests that add,
    load or roll back versions leave the shared one alone."""
    dst = parent / "model_repo"
    src = Path(__file__).resolve().parents[2] / "model_repo"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``shoprec ARGS`` in a subprocess with exactly ``env``, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
