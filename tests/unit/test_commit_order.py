"""The worker's consumer never commits past a record still in flight, nor past one skipped
at a rebalance, nor past one fetched and never handled (no services: the worker's real
Faust consumer and fetch loop, Kafka's records and seeks played by hand)."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import pytest
from aiokafka.structs import ConsumerRecord
from faust.transport.conductor import Conductor
from faust.transport.drivers import aiokafka as driver
from faust.types import TP, Message
from faust.types.tuples import ConsumerMessage

from shoprec.settings import Settings
from streams import transport
from streams.app import new_faust_app

TOPIC = "shop.views"
TP0 = TP(TOPIC, 0)


async def consumer_at(committed: int | None) -> driver.Consumer:
    """The worker's consumer, subscribed to TOPIC (acknowledged), committed at ``committed``."""
    app = new_faust_app(Settings(_env_file=None))
    app.topics.add(app.topic(TOPIC, key_type=bytes, value_type=bytes))
    await cast(Conductor, app.topics)._update_indices()  # what subscribing does
    consumer = cast(driver.Consumer, app.consumer)
    consumer._committed_offset[TP0] = committed
    return consumer


def taken(consumer: driver.Consumer, offsets: range) -> dict[int, Message]:
    """Records the agents have taken (tracked, not acknowledged yet)."""
    out = {}
    for offset in offsets:
        message = Message(TOPIC, 0, offset, 0.0, 0, None, b"user", b"{}", None)
        consumer.track_message(message)
        out[offset] = message
    return out


def fetched(offsets: range, generation: int) -> dict[int, Message]:
    """Records as the aiokafka driver makes them: stamped with the generation they were
    fetched in, not yet taken by a stream."""
    return {
        offset: ConsumerMessage(
            TOPIC, 0, offset, 0.0, 0, None, b"user", b"{}", None, generation_id=generation
        )
        for offset in offsets
    }


def take(consumer: driver.Consumer, message: Message) -> None:
    """What a stream does with a record it hands to its agent (faust.Stream._c_aiter)."""
    message.tracked = True
    consumer.track_message(message)


async def test_a_later_batch_acknowledged_first_commits_nothing_until_the_earlier_one() -> None:
    # Two agent instances (SHOPREC_AGENT_CONCURRENCY=2): 100 is in one batch, still
    # waiting on Triton; 101-103 are the other's, done first.
    consumer = await consumer_at(100)
    messages = taken(consumer, range(100, 104))
    for offset in (101, 102, 103):
        assert consumer.ack(messages[offset])
    assert consumer._new_offset(TP0) is None  # committing 104 would skip 100 on a crash
    assert consumer.ack(messages[100])
    assert consumer._new_offset(TP0) == 104


async def test_faust_alone_would_commit_past_the_record_in_flight() -> None:
    # What the override prevents (faust-streaming#606), on Faust's own consumer class:
    # if this ever returns None, Faust fixed it and the override can go.
    consumer = await consumer_at(100)
    messages = taken(consumer, range(100, 104))
    for offset in (101, 102, 103):
        consumer.ack(messages[offset])
    assert driver.Consumer._new_offset(consumer, TP0) == 104


async def test_in_order_acknowledgements_commit_as_before() -> None:
    consumer = await consumer_at(100)
    messages = taken(consumer, range(100, 106))
    for offset in (100, 101, 102):
        consumer.ack(messages[offset])
    # 103-105 are still in flight, after the run: they hold nothing back.
    assert consumer._new_offset(TP0) == 103


async def test_a_commit_held_behind_records_never_acknowledged_is_reported_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # 100 and 101 were never taken (say, dropped at a rebalance) while 102-103 were
    # acknowledged: Faust waits for them, and the group's lag stays up while the worker
    # works.  On-call gets one line that says why.
    monkeypatch.setattr(transport, "COMMIT_STALL_WARN_S", 0.0)
    consumer = await consumer_at(100)
    messages = taken(consumer, range(102, 104))
    for message in messages.values():
        consumer.ack(message)
    with caplog.at_level(logging.WARNING, logger="shoprec.worker"):
        assert consumer._new_offset(TP0) is None
        assert consumer._new_offset(TP0) is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "shop.views[0] held at offset 100" in warnings[0]
    assert "2 records acknowledged from offset 102 on" in warnings[0]
    for message in taken(consumer, range(100, 102)).values():
        consumer.ack(message)
    assert consumer._new_offset(TP0) == 104  # and the stall is over


async def test_records_of_an_older_generation_skipped_after_a_rebalance_commit_nothing() -> None:
    # Generation 1 fetched 100-103; the group rebalanced (this worker kept the partition,
    # now generation 2, committed 100) and the stream skips the old records, unhandled,
    # acknowledging each.  Committing 104 now would lose 100-103 if the partition moved
    # again before generation 2's copies of them are handled.
    consumer = await consumer_at(100)
    consumer.app.consumer_generation_id = 2
    for message in fetched(range(100, 104), generation=1).values():
        consumer.ack(message)
        assert message.acked  # done with, as far as Faust's stream and wait_empty go
    assert consumer._new_offset(TP0) is None
    assert not consumer._unacked_messages
    copies = fetched(range(100, 104), generation=2)
    for message in copies.values():
        take(consumer, message)
    for message in copies.values():
        assert consumer.ack(message)
    assert consumer._new_offset(TP0) == 104


async def test_records_skipped_while_the_flow_is_stopped_commit_nothing() -> None:
    # Revocation stops the flow before the generation changes: records that reach the
    # stream then carry the current generation but are skipped all the same.
    consumer = await consumer_at(100)
    consumer.app.consumer_generation_id = 1
    for message in fetched(range(100, 103), generation=1).values():
        consumer.ack(message)
    assert consumer._new_offset(TP0) is None


async def test_faust_alone_counts_the_skipped_records_toward_the_commit() -> None:
    # What the ack override prevents, on Faust's own class: if this ever returns None,
    # Faust stopped counting skipped records and the override can go.
    consumer = await consumer_at(100)
    consumer.app.consumer_generation_id = 2
    for message in fetched(range(100, 104), generation=1).values():
        driver.Consumer.ack(consumer, message)
    assert driver.Consumer._new_offset(consumer, TP0) == 104


class Kafka:
    """What the worker's consumer asks the aiokafka consumer: the records one fetch
    returns, the assignment, where the group's commit stands; the seeks it was told."""

    def __init__(self, consumer: driver.Consumer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.records: list[int] = []
        self.committed: int | None = None
        self.seeks: list[tuple[TP, int]] = []
        self.assigned = {TP0}

        async def wait_next_records(timeout: float) -> tuple[dict[TP, list[object]], set[TP]]:  # noqa: ASYNC109
            batch = [
                ConsumerRecord(TOPIC, 0, o, 0, 0, b"u", b"{}", None, 1, 2, []) for o in self.records
            ]
            return {TP0: batch}, {TP0}

        async def seek_to_committed() -> dict[TP, int | None]:
            return {tp: self.committed for tp in self.assigned}

        monkeypatch.setattr(consumer, "_wait_next_records", wait_next_records)
        # The aiokafka consumer itself, under Faust's consumer thread (seek_wait's route).
        monkeypatch.setattr(consumer._thread, "_consumer", self)
        monkeypatch.setattr(consumer, "seek_to_committed", seek_to_committed)
        monkeypatch.setattr(consumer, "assignment", lambda: set(self.assigned))
        monkeypatch.setattr(consumer, "highwater", lambda tp: 1_000)
        consumer.resume_flow()
        self.consumer = consumer

    def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def position(self, tp: TP) -> int:
        return self.seeks[-1][1]

    async def fetch(self, offsets: range) -> dict[int, Message]:
        """One fetch of ``offsets`` through the consumer's fetch loop (Consumer.getmany),
        stamped with the current generation, as Faust's drain loop gets them."""
        self.records = list(offsets)
        return {m.offset: m async for _, m in self.consumer.getmany(timeout=0.0)}


def handle(consumer: driver.Consumer, messages: dict[int, Message], offsets: range) -> None:
    """A stream takes these records, its agent handles them, the stream acknowledges."""
    for offset in offsets:
        take(consumer, messages[offset])
        consumer.ack(messages[offset])


async def copy_of_100_dropped(monkeypatch: pytest.MonkeyPatch) -> tuple[driver.Consumer, Kafka]:
    """Committed at 100, the fetch brought 100-103 and a stream handled 101-103: the copy
    of 100 never reached it (Faust's read-offset filter dropped it after a rebalance)."""
    consumer = await consumer_at(100)
    kafka = Kafka(consumer, monkeypatch)
    messages = await kafka.fetch(range(100, 104))
    handle(consumer, messages, range(101, 104))
    return consumer, kafka


async def test_a_record_fetched_and_never_handled_holds_the_commit_and_is_read_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The filter was moved past 100 by a record fetched before the seek.
    consumer, kafka = await copy_of_100_dropped(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="shoprec.worker"):
        assert consumer._new_offset(TP0) is None  # 104 would lose 100
        await asyncio.sleep(0)  # the seek runs
    assert kafka.seeks == [(TP0, 100)]
    assert consumer._read_offset[TP0] == 100  # Faust's filter lets the copy through
    assert "record 100 was fetched and never handled" in caplog.text
    assert consumer._new_offset(TP0) is None  # read once again: no second seek yet
    assert kafka.seeks == [(TP0, 100)]
    copies = await kafka.fetch(range(100, 104))
    handle(consumer, copies, range(100, 104))  # 101-103 again: duplicates downstream
    assert consumer._new_offset(TP0) == 104


async def test_faust_alone_commits_past_the_record_fetched_and_never_handled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What the override prevents, on Faust's own class: its head-gap check lets one
    # offset pass.  If this ever returns None, Faust checks it and the override can go.
    consumer, _ = await copy_of_100_dropped(monkeypatch)
    assert driver.Consumer._new_offset(consumer, TP0) == 104


@pytest.mark.parametrize("first", [0, 100])
async def test_with_no_committed_offset_known_a_record_never_handled_holds_the_commit(
    monkeypatch: pytest.MonkeyPatch, first: int
) -> None:
    # No commit yet (a new partition), or the revocation cleared Faust's: Faust checks
    # no head gap then, and would commit first+4 (the canary below).
    consumer = await consumer_at(None)
    kafka = Kafka(consumer, monkeypatch)
    messages = await kafka.fetch(range(first, first + 4))
    handle(consumer, messages, range(first + 1, first + 4))
    assert consumer._new_offset(TP0) is None
    await asyncio.sleep(0)
    assert kafka.seeks == [(TP0, first)]

    canary = await consumer_at(None)
    messages = await Kafka(canary, monkeypatch).fetch(range(first, first + 4))
    handle(canary, messages, range(first + 1, first + 4))
    assert driver.Consumer._new_offset(canary, TP0) == first + 4


async def test_a_record_that_never_comes_again_is_reported_lost_and_the_commit_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Retention deleted 100 before it was read again: each seek resets past it.  The
    # partition must not stall for ever behind it.
    monkeypatch.setattr(transport, "REREAD_EVERY_S", 0.0)
    consumer, kafka = await copy_of_100_dropped(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="shoprec.worker"):
        for _ in range(transport.REREAD_TRIES):
            assert consumer._new_offset(TP0) is None
            await asyncio.sleep(0)
        assert consumer._new_offset(TP0) == 104
    assert len(kafka.seeks) == transport.REREAD_TRIES
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "record 100" in errors[0] and "(lost)" in errors[0], errors


async def test_during_a_rebalance_the_commit_waits_without_a_seek_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The flow is stopped (partitions being revoked): the rebalance's seek to the
    # committed offset reads 100 again; a seek here would race it.
    consumer, kafka = await copy_of_100_dropped(monkeypatch)
    consumer.stop_flow()
    assert consumer._new_offset(TP0) is None
    await asyncio.sleep(0)
    assert kafka.seeks == []


async def test_the_seek_after_a_rebalance_forgets_what_the_group_committed_since(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # This worker fetched 100-103 and handled none before the rebalance; another member
    # handled 100-101 and committed 102.  Back with this worker, the partition is read
    # from 102: 100-101 hold nothing back.
    consumer = await consumer_at(100)
    kafka = Kafka(consumer, monkeypatch)
    await kafka.fetch(range(100, 104))
    kafka.committed = 102
    await consumer.perform_seek()
    copies = await kafka.fetch(range(102, 104))
    handle(consumer, copies, range(102, 104))
    assert consumer._new_offset(TP0) == 104
    assert kafka.seeks == []


async def test_a_partition_this_worker_lost_is_forgotten_at_the_seek(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = await consumer_at(100)
    kafka = Kafka(consumer, monkeypatch)
    await kafka.fetch(range(100, 104))
    kafka.assigned = set()
    await consumer.perform_seek()
    kafka.assigned = {TP0}  # it comes back later, committed at 104 by another member
    consumer._committed_offset[TP0] = 104
    copies = await kafka.fetch(range(104, 106))
    handle(consumer, copies, range(104, 106))
    assert consumer._new_offset(TP0) == 106


async def test_a_seek_that_fails_is_reported_and_tried_again_at_the_next_commit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(transport, "REREAD_EVERY_S", 0.0)
    consumer, kafka = await copy_of_100_dropped(monkeypatch)

    def refused(tp: TP, offset: int) -> None:
        raise RuntimeError("partition not assigned")

    monkeypatch.setattr(kafka, "seek", refused)
    with caplog.at_level(logging.WARNING, logger="shoprec.worker"):
        assert consumer._new_offset(TP0) is None
        for _ in range(3):  # the seek, then its done callback
            await asyncio.sleep(0)
    assert "reading a partition again failed: RuntimeError('partition not assigned')" in (
        caplog.text
    )
    monkeypatch.undo()  # the seek works again
    monkeypatch.setattr(transport, "REREAD_EVERY_S", 0.0)
    kafka = Kafka(consumer, monkeypatch)
    assert consumer._new_offset(TP0) is None
    await asyncio.sleep(0)
    assert kafka.seeks == [(TP0, 100)]
