"""A worker that dies between writing user state and publishing loses no recommendation.

The state write marks each trigger pending; only the broker's acknowledgement of its
recommendation clears it.  A redelivered batch is then all duplicates (nothing applied
twice), yet its pending triggers recommend again: at least once, never zero times.
Real Redis, real Triton (BERT, fused_ranker), real rees46 events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from infra.stack import Endpoints
from shoprec.output import Recommendation
from shoprec.settings import Settings
from streams.ingest import RawRecord
from streams.runtime import Runtime
from streams.topics import TopicNames
from tests.integration.helpers import isolated_settings, rees46_fixture

pytestmark = pytest.mark.integration

N_EVENTS = 120


@pytest.fixture
async def settings(stack: Endpoints, data_dir: Path) -> AsyncIterator[Settings]:
    """Isolated settings whose catalogue holds the fixture's items."""
    s = isolated_settings(stack, min_emit_interval_ms=0)
    _, items = rees46_fixture(data_dir, N_EVENTS)
    loader = Runtime(s)
    await loader.ensure_open()
    try:
        catalogue = [
            RawRecord("catalog.items", 0, n, str(it["item_id"]).encode(), orjson.dumps(it))
            for n, it in enumerate(items)
        ]
        assert await loader.handle_catalog(catalogue) == []
    finally:
        await loader.close()
    yield s


def event_records(s: Settings, data_dir: Path) -> list[RawRecord]:
    events, _ = rees46_fixture(data_dir, N_EVENTS)
    topics = TopicNames.from_settings(s)
    return [
        RawRecord(topics.event_topic(e["type"]), 0, n, str(e["user_id"]).encode(), orjson.dumps(e))
        for n, e in enumerate(events)
    ]


async def run_batch(s: Settings, records: list[RawRecord]) -> tuple[Runtime, list[Recommendation]]:
    """A fresh worker's runtime handling ``records``; closed before anything is published."""
    runtime = Runtime(s)
    await runtime.ensure_open()
    try:
        recs, dead = await runtime.handle_events(records)
    finally:
        await runtime.close()
    assert dead == []
    return runtime, recs


def triggers(recs: list[Recommendation]) -> set[tuple[str, str]]:
    return {(r.user_id, r.trigger_event_id) for r in recs}


async def test_a_batch_redelivered_after_a_crash_before_publishing_recommends_again(
    settings: Settings, data_dir: Path
) -> None:
    records = event_records(settings, data_dir)
    first, before_crash = await run_batch(settings, records)
    assert first.stats.recommended == len(before_crash) > 10
    assert first.stats.duplicates == 0

    # The worker died before publishing: the same records come back to its successor.
    second, after_crash = await run_batch(settings, records)
    assert second.stats.duplicates == len(records), "no event is applied twice"
    assert triggers(after_crash) == triggers(before_crash)
    assert second.stats.re_emitted == len(after_crash) and second.stats.recommended == 0
    assert all(r.items for r in after_crash)

    # Once the broker acknowledged them, a redelivery is a plain duplicate again.
    confirming = Runtime(settings)
    await confirming.ensure_open()
    try:
        await confirming.confirm_published(after_crash)
    finally:
        await confirming.close()
    third, after_confirm = await run_batch(settings, records)
    assert after_confirm == []
    assert third.stats.duplicates == len(records) and third.stats.re_emitted == 0


async def test_only_the_newest_trigger_of_a_user_stays_pending(
    settings: Settings, data_dir: Path
) -> None:
    """Confirming an older trigger must not clear a newer one that replaced it."""
    records = event_records(settings, data_dir)
    _, recs = await run_batch(settings, records)
    by_user = {r.user_id: r for r in recs}
    user, newest = next(iter(by_user.items()))
    stale = Recommendation(
        user_id=user,
        items=(),
        model="test",
        trigger_event_id="an-older-event",
        trigger_type="view",
        trigger_ts=0,
        emitted_ts=0,
        degraded=False,
    )
    runtime = Runtime(settings)
    await runtime.ensure_open()
    try:
        await runtime.confirm_published([stale])
    finally:
        await runtime.close()
    _, again = await run_batch(settings, records)
    assert (user, newest.trigger_event_id) in triggers(again)
