"""The worker's consumer never commits past a record still in flight, nor past one skipped
at a rebalance (no services: the worker's real Faust consumer, its acknowledgement
bookkeeping driven by hand)."""

from __future__ import annotations

import logging
from typing import cast

import pytest
from faust.transport.conductor import Conductor
from faust.transport.drivers import aiokafka as driver
from faust.types import TP, Message
from faust.types.tuples import ConsumerMessage

from shoprec.settings import Settings
from streams import transport
from streams.app import new_faust_app

TOPIC = "shop.views"
TP0 = TP(TOPIC, 0)


async def consumer_at(committed: int) -> driver.Consumer:
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
