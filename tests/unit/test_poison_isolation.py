"""A record that breaks processing (not validation) is isolated and dead-lettered alone."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest

from shoprec.settings import Settings
from streams.app import Runtime
from streams.dlq import DeadLetter
from streams.ingest import RawRecord
from streams.output import Recommendation


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
