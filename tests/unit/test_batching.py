"""The worker's micro-batches (``BatchingStream.take_buffered`` through
``streams.app.micro_batches``), on a real Faust stream over an in-memory channel."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import faust
import pytest

from shoprec.settings import Settings
from streams.app import micro_batches, new_faust_app


def values(batch: Sequence[faust.EventT[bytes]]) -> list[int]:
    return [int(e.value) for e in batch]


class Feed:
    """A Faust app's stream over a channel the test sends numbered events into."""

    def __init__(self) -> None:
        self.app = new_faust_app(Settings(_env_file=None))
        self.app.flow_control.resume()  # the worker's consumer does this on assignment
        self.channel = self.app.channel(key_type=bytes, value_type=bytes)
        self.stream = self.app.stream(self.channel)

    async def send(self, *numbers: int) -> None:
        for n in numbers:
            await self.channel.send(key=b"user", value=str(n).encode())

    async def batches(
        self, n: int, max_events: int = 128, linger_s: float = 0.0
    ) -> list[list[int]]:
        got: list[list[int]] = []

        async def take() -> None:
            async for batch in micro_batches(self.stream, max_events, linger_s):
                got.append(values(batch))
                if len(got) == n:
                    break

        await asyncio.wait_for(take(), timeout=5.0)
        return got


async def test_a_batch_is_everything_that_has_arrived() -> None:
    feed = Feed()
    await feed.send(*range(5))
    assert await feed.batches(1) == [[0, 1, 2, 3, 4]]


async def test_batches_hold_at_most_max_events_and_keep_the_order() -> None:
    feed = Feed()
    await feed.send(*range(10))
    assert await feed.batches(3, max_events=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


async def test_what_arrives_while_the_agent_works_is_the_next_batch() -> None:
    feed = Feed()
    await feed.send(0)
    got: list[list[int]] = []
    async for batch in micro_batches(feed.stream, 128, 0.0):
        got.append(values(batch))
        if len(got) == 1:
            await feed.send(1, 2, 3)
            await asyncio.sleep(0.05)  # the agent at work; the stream takes them in
        else:
            break
    assert got == [[0], [1, 2, 3]]


async def test_an_idle_agent_waits_for_the_first_event_then_gets_it_alone() -> None:
    feed = Feed()
    sender = asyncio.get_running_loop().call_later(0.2, lambda: asyncio.ensure_future(feed.send(7)))
    try:
        assert await feed.batches(1) == [[7]]
    finally:
        sender.cancel()


async def test_linger_holds_a_batch_for_more() -> None:
    feed = Feed()

    async def trickle() -> None:
        for n in range(3):
            await feed.send(n)
            await asyncio.sleep(0.02)

    task = asyncio.create_task(trickle())
    try:
        assert await feed.batches(1, linger_s=0.5) == [[0, 1, 2]]
    finally:
        await task


async def test_a_batch_is_acknowledged_only_after_its_loop_body_ran() -> None:
    feed = Feed()
    await feed.send(0, 1)
    seen: list[faust.EventT[bytes]] = []
    async for batch in micro_batches(feed.stream, 1, 0.0):
        assert not any(e.message.acked for e in batch), "acknowledged before it was handled"
        seen += batch
        if len(seen) == 2:
            break
    assert seen[0].message.acked, "the first batch's body ran through"


async def test_a_batch_whose_loop_body_raises_is_not_acknowledged() -> None:
    feed = Feed()
    await feed.send(0)
    held: list[faust.EventT[bytes]] = []
    batches = micro_batches(feed.stream, 128, 0.0)
    with pytest.raises(RuntimeError, match="poison"):
        async for batch in batches:
            held += batch
            raise RuntimeError("poison")
    await batches.aclose()  # what the event loop does with the abandoned generator
    assert values(held) == [0]
    assert not held[0].message.acked, "a failed batch must come again (at least once)"
