"""A private stack for the fault tests: they stop and restart its parts, so it is theirs alone.

One stack serves the whole fault package (starting Triton with BERT costs tens of
seconds on two cores); each test gets its own topics, consumer group and Redis
state prefix, and whatever a test stops is started again before the next one.

A test that streams events takes the ``scenario`` fixture: a started run on that stack
(worker ready, producer, output collector, books), torn down even when the test fails;
``@pytest.mark.scenario(setting=value)`` changes the run's settings.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from infra.stack import Stack
from tests.faults.harness import (
    REPO,
    Catalogue,
    FaultStack,
    Scenario,
    load_events,
    load_items,
)
from tests.stack import stack_settings

# The catalogue covers the items of the events the tests stream (the overload cycles them).
N_CATALOGUE_EVENTS = 4000


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "scenario(**settings): settings overrides for the `scenario` fixture's run"
    )


def committed_model_repo(dest: Path) -> Path:
    """The model repository as git tracks it: a model version someone is still writing
    in the working tree must not stop the fault tests' Triton from starting."""
    source = REPO / "model_repo"
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "model_repo"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return source  # not a git checkout: the tree is what there is
    for name in filter(None, listed.split("\0")):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, target)
    return dest / "model_repo"


@pytest.fixture(scope="package")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    settings = stack_settings(tmp_path_factory.mktemp("fault-stack"))
    model_repo = committed_model_repo(tmp_path_factory.mktemp("models"))
    stack = Stack(settings, model_repo=model_repo)
    endpoints = stack.up(("broker", "redis", "triton"), timeout_s=300)
    try:
        items = load_items({str(e["item_id"]) for e in load_events(N_CATALOGUE_EVENTS)})
        catalogue = asyncio.run(Catalogue.embed(endpoints.triton_url, items))
        asyncio.run(catalogue.ensure_in(endpoints.redis_url))
        yield FaultStack(stack, endpoints, catalogue, tmp_path_factory.mktemp("fault-logs"))
    finally:
        stack.down(wipe=True)


@pytest.fixture
def faults(fault_stack: FaultStack) -> Iterator[FaultStack]:
    """The private stack, whole again after the test whatever it broke."""
    fault_stack.restore()
    yield fault_stack
    fault_stack.restore()


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
async def scenario(
    faults: FaultStack, logs: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Scenario]:
    """One worker ready on fresh topics, the producer and the output collector running."""
    marker = request.node.get_closest_marker("scenario")
    async with Scenario.started(faults, logs, **(marker.kwargs if marker else {})) as started:
        yield started
