"""A ranker whose item table is behind the worker's never makes an empty recommendation.

Triton's ``fused_ranker`` follows ``items:log`` a moment behind the worker, so right after
a catalogue is loaded into an empty shop it can hold no items while the worker already
does; it then answers every list empty.  Arrange: a private Triton that reads an empty
Redis of its own, so its table stays empty for good, and a worker (the real
``streams.runtime.Runtime``) whose Redis holds real rees46 items.  Inject: real events.
Assert: every list has items, from the worker's retrieval order, marked degraded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from infra.stack import Endpoints, Stack
from streams.ingest import RawRecord
from streams.recommend import FALLBACK_MODEL
from streams.runtime import Runtime
from streams.topics import TopicNames
from tests.integration.helpers import isolated_settings, rees46_fixture
from tests.stack import stack_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def empty_ranker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    stack = Stack(stack_settings(tmp_path_factory.mktemp("behind")))
    endpoints = stack.up(("redis", "triton"), timeout_s=300)
    try:
        yield endpoints
    finally:
        stack.down(wipe=True)


async def test_lists_come_from_the_workers_retrieval_while_the_rankers_table_is_empty(
    empty_ranker: Endpoints,
    private_redis_url: str,
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="shoprec.recommend")
    events, items = rees46_fixture(data_dir, 40)
    worker_side = replace(empty_ranker, redis_url=private_redis_url)
    settings = isolated_settings(worker_side, min_emit_interval_ms=0)
    loader = Runtime(settings, write_behavioural=False)
    await loader.ensure_open()
    try:
        records = [
            RawRecord("catalog.items", 0, k, it["item_id"].encode(), orjson.dumps(it))
            for k, it in enumerate(items)
        ]
        assert await loader.handle_catalog(records) == []
    finally:
        await loader.close()

    topics = TopicNames.from_settings(settings)
    runtime = Runtime(settings, write_behavioural=False)
    await runtime.ensure_open()
    try:
        recs, dead = await runtime.handle_events(
            [
                RawRecord(
                    topics.event_topic(e["type"]), 0, n, e["user_id"].encode(), orjson.dumps(e)
                )
                for n, e in enumerate(events)
            ]
        )
    finally:
        await runtime.close()

    assert dead == []
    assert {r.user_id for r in recs} == {e["user_id"] for e in events}
    known = {it["item_id"] for it in items}
    for r in recs:
        assert (r.model, r.degraded) == (FALLBACK_MODEL, True), r
        assert r.items and {i.item_id for i in r.items} <= known, r
    # The ranker answered (empty), it was not down: the worker said which case this is.
    assert any("answered" in m and "lists empty" in m for m in caplog.messages), caplog.messages
