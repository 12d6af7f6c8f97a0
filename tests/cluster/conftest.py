"""One local cluster for the whole suite (starting it costs about a minute and 4.3 GiB), on
free ports, with the committed model repository and a real catalogue embedded by BERT.

Each test that streams takes ``scenario``: its own topics (3 replicas), consumer group and
Redis state prefix on the cluster, one worker ready, the producer and the output collector
(``tests/faults/harness.py``); ``@pytest.mark.scenario(setting=value)`` changes its
settings.  Whatever a test kills is started again before the next one, and both clusters
are whole again (``Cluster.restore``).  Each test reports what it measured with
``report``: printed, and kept in ``bench/results/cluster-faults.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.stack import Endpoints, Stack
from tests.cluster.cluster import Cluster, record
from tests.faults.conftest import committed_model_repo
from tests.faults.harness import Catalogue, FaultStack, Scenario, load_events, load_items
from tests.stack import stack_settings

# The fault tests stream at most this many of the first rees46 events (ids made unique
# per test); the catalogue covers their items.
N_EVENTS = 1500


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "scenario(**settings): settings overrides for the `scenario` fixture's run"
    )


def stack_env(stack_dir: Path) -> dict[str, str]:
    """The environment of a `shoprec` command on the private cluster in ``stack_dir``."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith("SHOPREC_")}
    ports = ("KAFKA_PORT", "REDIS_PORT", "TRITON_HTTP_PORT", "TRITON_GRPC_PORT")
    return (
        keep
        | {f"SHOPREC_{p}": "0" for p in (*ports, "TRITON_METRICS_PORT")}
        | {"SHOPREC_STACK_DIR": str(stack_dir)}
    )


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Started as an operator would: `shoprec stack up --cluster` (which also creates the
    topics with the cluster's replication factor); the tests drive it through ``Stack``."""
    stack_dir = tmp_path_factory.mktemp("cluster")
    model_repo = committed_model_repo(tmp_path_factory.mktemp("models"))
    stack = Stack(stack_settings(stack_dir), model_repo=model_repo)
    argv = [sys.executable, "-m", "cli.main", "stack", "up", "--cluster", "--timeout", "400"]
    up = subprocess.run(
        [*argv, "--model-repo", str(model_repo)],
        cwd=stack_dir,
        env=stack_env(stack_dir),
        capture_output=True,
        text=True,
        check=False,
    )
    if up.returncode != 0:
        stack.down(wipe=True)
        pytest.fail(f"shoprec stack up --cluster failed:\n{up.stderr[-4000:]}")
    endpoints = Endpoints(**json.loads(up.stdout))
    assert endpoints.redis_cluster and endpoints.kafka_replication_factor == 3
    try:
        items = load_items({str(e["item_id"]) for e in load_events(N_EVENTS)})
        catalogue = asyncio.run(Catalogue.embed(endpoints.triton_url, items))
        asyncio.run(catalogue.ensure_in(endpoints.redis_url, cluster=True))
        logs = tmp_path_factory.mktemp("cluster-logs")
        yield Cluster(FaultStack(stack, endpoints, catalogue, logs))
    finally:
        stack.down(wipe=True)


@pytest.fixture
def whole(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster, whole before the test and again after it, whatever the test killed."""
    cluster.restore()
    yield cluster
    cluster.restore()


@pytest.fixture
async def scenario(
    whole: Cluster, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Scenario]:
    """One worker ready on fresh replicated topics, the producer and the collector running."""
    marker = request.node.get_closest_marker("scenario")
    overrides = marker.kwargs if marker else {}
    async with Scenario.started(whole.faults, tmp_path, **overrides) as started:
        yield started


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[dict[str, Any]], None]:
    """``report(measured)``: print what the test measured and keep it in the results file."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    name = request.node.name

    def emit(measured: dict[str, Any]) -> None:
        record(name, measured)
        text = f"\n{name}: {json.dumps(measured, indent=1)}\n"
        if capture is not None:
            with capture.global_and_fixture_disabled():
                print(text, flush=True)
        else:
            print(text, flush=True)

    return emit
