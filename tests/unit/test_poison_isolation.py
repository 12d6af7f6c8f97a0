"""A record that breaks processing (not validation) is isolated and dead-lettered alone."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence

import pytest

from shoprec.dlq import DeadLetter
from shoprec.output import Recommendation
from shoprec.settings import Settings
from streams.ingest import RawRecord
from streams.runtime import Runtime


class OnePoisonRuntime(Runtime):
    """Processing fails whenever the batch holds the poison record; others pass through."""

    def __init__(self) -> None:
        super().__init__(Settings(_env_file=None))  # type: ignore[call-arg]
        self.processed: list[bytes | None] = []

    async def handle_events(
        self, records: Sequence[RawRecord]
    ) -> tuple[list[Recommendation], list[DeadLetter]]:
        if any(r.value == b"poison" for r in records):
            raise KeyError("alice@example.com")  # a bug quoting its input
        self.processed += [r.value for r in records]
        return [], []


async def test_poison_record_is_dead_lettered_and_the_rest_processed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rt = OnePoisonRuntime()
    records = [
        RawRecord("shop.views", 0, n, b"u", v) for n, v in enumerate([b"a", b"poison", b"c"])
    ]
    recs, dead = await rt.handle_events_isolating_failures(records)
    assert recs == []
    assert rt.processed == [b"a", b"c"]
    assert [(d.reason, d.offset, d.original) for d in dead] == [("processing_error", 1, b"poison")]
    assert "KeyError" in dead[0].detail and "alice@example.com" in dead[0].detail
    # The log names the record and the failing code, not the data the exception quotes.
    failed = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failed) == 1 and "shop.views[0]@1" in failed[0]
    assert "KeyError at test_poison_isolation.py" in failed[0]
    assert "alice" not in caplog.text


class FailingStore:
    def __init__(self) -> None:
        self.confirmed: list[tuple[str, str]] = []

    async def confirm_published(self, triggers: Iterable[tuple[str, str]]) -> int:
        self.confirmed += list(triggers)
        raise ValueError("confirm failed")


async def test_a_publish_or_confirmation_failure_leaves_triggers_pending_without_crashing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rt = OnePoisonRuntime()
    store = FailingStore()
    rt.store = store  # type: ignore[assignment]
    rec = Recommendation("u1", (), "m", "e1", "view", 0, 0, False)

    async def acked() -> None:
        return None

    async def not_acked() -> None:
        raise ConnectionError("broker gone")

    rt.confirm_when_acknowledged([not_acked()], [rec])
    rt.confirm_when_acknowledged([acked()], [rec])
    await asyncio.sleep(0.1)
    assert store.confirmed == [("u1", "e1")], "only the acknowledged publish is confirmed"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("1 triggers stay pending" in w for w in warnings)
