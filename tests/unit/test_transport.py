"""The worker's consumer gets the configured fetch wait, not Faust's fixed 1.5 s."""

from __future__ import annotations

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
