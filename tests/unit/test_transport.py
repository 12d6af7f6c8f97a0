"""The worker's consumer: the configured fetch wait (not Faust's fixed 1.5 s), on the
worker's event loop unless a thread of its own is asked for."""

from __future__ import annotations

import asyncio

import pytest

from shoprec.settings import Settings
from streams.app import create_app


def settings(**overrides: object) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "expected_ms"),
    [
        ({"broker": "kafka"}, 500),
        ({"broker": "tansu"}, 5),
        ({"broker": "tansu", "consumer_fetch_max_wait_ms": 40}, 40),
    ],
)
async def test_the_worker_consumer_waits_as_configured(
    overrides: dict[str, object], expected_ms: int
) -> None:
    app, _ = create_app(settings(**overrides))
    thread = app.consumer._thread  # type: ignore[attr-defined]
    consumer = thread._create_worker_consumer(app.transport)
    try:
        # What aiokafka's fetcher is built with when the consumer starts.
        assert consumer._fetch_max_wait_ms == expected_ms
        assert consumer._group_id == app.conf.id, "the rest is Faust's own consumer"
    finally:
        await consumer.stop()


@pytest.mark.parametrize("in_thread", [False, True])
async def test_the_consumer_runs_on_the_worker_loop_unless_told_otherwise(in_thread: bool) -> None:
    app, _ = create_app(settings(consumer_thread=in_thread))
    thread = app.consumer._thread  # type: ignore[attr-defined]
    # Faust's consumer thread gets a loop of its own; on the worker's loop, calls into
    # the "thread" are plain awaits.
    assert (thread.thread_loop is not app.loop) == in_thread
    if not in_thread:
        assert await thread.call_thread(asyncio.sleep, 0, "inline") == "inline"
