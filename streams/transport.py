"""How records get from Kafka to the worker's agents: Faust's aiokafka transport and
stream, with the three changes that take Faust's own hop from 19.5–21 ms to ~5 ms
(p50 at 100 events/s; ``bench/faust_hop.py`` measures each, docs/benchmarks.md), and
two to its commits (:meth:`_Consumer._new_offset`: never past a record in flight, nor
past one fetched and never handled; :meth:`_Consumer.ack`: only records a stream took in
this generation count).

1. **The fetch wait.** faust-streaming 0.15 hard-codes ``fetch_max_wait_ms=1500`` for
   the worker's consumer.  Apache Kafka answers a fetch as soon as a record arrives, so
   there the wait only paces idle polling; Tansu holds every fetch for the whole wait,
   which put 457 ms (p50, measured) on the broker-in hop.  The consumer gets
   ``SHOPREC_CONSUMER_FETCH_MAX_WAIT_MS`` instead.
2. **No consumer thread.** Faust runs aiokafka in a thread of its own and hands each
   fetch to the worker's event loop through a method queue (``call_soon_threadsafe``
   both ways).  Each hand-off waits for the other thread to be scheduled and to get the
   GIL, which the loop holds while it works.  :class:`_InLoopConsumerThread` runs the
   same consumer service on the worker's loop instead, with the same Faust code on top
   (``SHOPREC_CONSUMER_THREAD=true`` brings the thread back).
3. **Batches of what is there.** ``Stream.take_events(max, within)`` hands over a batch
   only when it is full or when ``within`` has passed since it *started waiting*, so an
   event that arrives while the agent is busy waits for the agent and then for a whole
   window as well, and an idle agent wakes up every ``within``.  :meth:`BatchingStream.
   take_buffered` hands over whatever has arrived as soon as the stream has taken in
   everything delivered so far: while the agent works, the next batch fills by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, cast

import aiokafka
import faust
from faust.transport.drivers import aiokafka as driver
from faust.types import TP, ChannelT, EventT, Message, TransportT
from faust.types.tuples import ack_lock
from mode.utils.futures import maybe_async, notify

# take_buffered hands over a batch this long after its last event at the latest even if
# the channel still holds records: ones the stream drops unseen (records fetched before
# a rebalance) never reach the batch, and a rebalance waits for the batch's acks.
STRANDED_BATCH_S = 0.1
# A partition's commit held this long behind records never acknowledged is reported once
# (Faust commits every ~3 s; a batch in flight takes milliseconds, seconds in an outage).
COMMIT_STALL_WARN_S = 60.0
# A partition is read again from a record fetched but never handled at most this often:
# the fetch after a seek takes milliseconds, and its copy is handled before the next try.
REREAD_EVERY_S = 5.0
REREAD_TRIES = 3

log = logging.getLogger("shoprec.worker")


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: driver.Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka hands this to its fetcher in start(), which has not run yet; Faust
        # passes no way to set it, so the attribute is the only seam (pinned versions).
        consumer._fetch_max_wait_ms = cast(Transport, transport).fetch_max_wait_ms
        return consumer


class _InLoopConsumerThread(_ConsumerThread):
    """Faust's consumer "thread" run as a plain service on the worker's event loop.

    Everything Faust builds on the consumer thread stays: the aiokafka consumer, the
    rebalance listener, the method queues; only mode's ``ServiceThread`` start and stop,
    which would run the service in a new thread with a loop of its own, are replaced by
    the steps that thread runs (``ServiceThread._serve`` and ``_shutdown_thread``, mode
    0.7), and a call "into the thread" is a plain ``await``.
    """

    def __init__(self, consumer: driver.Consumer, **kwargs: Any) -> None:
        # The thread's loop is the worker's: aiokafka starts its tasks on it.
        super().__init__(consumer, thread_loop=kwargs["loop"], **kwargs)

    async def start(self) -> None:
        self._thread_started.set()
        await self._default_start()
        await self.on_thread_started()

    async def stop(self) -> None:
        if self._started.is_set() and not self._stopped.is_set():
            self._stopped.set()
            await self._shutdown_thread()

    async def call_thread(
        self, fun: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        return await maybe_async(fun(*args, **kwargs))


class _Consumer(driver.Consumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Per partition whose commit waits: since when, and whether it was reported.
        self._commit_stalls: dict[TP, tuple[float, bool]] = {}
        # Per partition: offsets of the records the fetcher delivered that no stream has
        # handled in the current generation yet (see _new_offset).
        self._unhandled: defaultdict[TP, set[int]] = defaultdict(set)
        # Per partition read again: from which offset, when, how many times; the seeks.
        self._rereads: dict[TP, tuple[int, float, int]] = {}
        self._seeks: set[asyncio.Future[None]] = set()

    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        in_thread = cast(Transport, self.transport).consumer_thread
        cls = _ConsumerThread if in_thread else _InLoopConsumerThread
        return cls(self, loop=self.loop, beacon=self.beacon)

    def ack(self, message: Message) -> bool:
        """Mark ``message`` done; its offset counts toward the next commit only when a
        stream took the record in the consumer group's current generation.

        Around a rebalance Faust skips the records still queued for the streams, unhandled,
        and acknowledges them: while the flow is stopped (the partitions being revoked;
        the generation has not changed yet) and, after the new assignment, those fetched
        in the older generation.  Faust then seeks each partition back to its committed
        offset, so this worker fetches them again.  Counted, those acknowledgements commit
        past records nobody has handled: if the partition moves to another member before
        the new copies arrive (a second rebalance: a member joins, then one leaves), that
        member starts after them and they are never handled.  Not counting them only waits
        for the new copies.  A record a stream took in an older generation was handled,
        but the seek fetches it again too, and waiting for that copy keeps the rule one.
        """
        generation = message.generation_id
        current = generation is None or generation == self.app.consumer_generation_id
        if message.tracked and current:
            self._unhandled[message.tp].discard(message.offset)
            return bool(super().ack(message))
        with ack_lock:  # Faust's lock for this bookkeeping (Message.ack holds it too)
            if message.acked:
                return False
            message.acked = True
            self._unacked_messages.discard(message)  # wait_empty waits for no more
            notify(self._waiting_for_ack)
            return True

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:  # noqa: ASYNC109
        """Faust's fetch loop (its signature), noting each record of an acknowledged topic
        it delivers as not handled yet, until a stream of this generation takes and
        acknowledges it."""
        unhandled, acks_enabled_for = self._unhandled, self.app.topics.acks_enabled_for
        async for tp, message in super().getmany(timeout):
            if acks_enabled_for(message.topic):
                unhandled[tp].add(message.offset)
            yield tp, message

    async def perform_seek(self) -> None:
        """Faust's seek of every assigned partition to its committed offset; what this
        worker fetched of a partition it no longer has, or below the group's commit
        (handled, by this worker or the one that committed it), is forgotten."""
        await super().perform_seek()
        assigned = self.assignment()
        for tp in list(self._unhandled):
            committed = self._committed_offset[tp]  # Faust's: None for none (or 0)
            if tp not in assigned:
                del self._unhandled[tp]
            elif committed:
                self._unhandled[tp] = {o for o in self._unhandled[tp] if o >= committed}
        self._rereads.clear()

    def _new_offset(self, tp: TP) -> int | None:
        """The offset to commit for ``tp``: Faust's, but never past a record still in flight
        nor past one fetched and never handled.

        Faust commits the run of acknowledged offsets that starts one past the committed
        offset even while the record *at* the committed offset is being handled (its
        head-gap check lets one missing offset pass, for compacted topics;
        faust-streaming#606).  Acknowledged out of order -- two agent instances
        (``SHOPREC_AGENT_CONCURRENCY`` > 1) whose later batch finishes first -- that
        commit passes a record nobody has finished, and a crash then loses it.  So wait
        while a record before the acknowledged run is in flight.

        Around a rebalance a record can also be fetched and never reach an agent at all:
        skipped, and its copy fetched again after the seek dropped by Faust's read-offset
        filter, moved past it by a record fetched before the seek (faust-streaming#216,
        #221); and while Faust knows no committed offset for the partition (none yet, or
        between revocation and the seek) it checks no head gap at all.  A commit past it
        loses it: seen in the cluster suite as one record of 1,400 applied by no worker.
        So a record delivered by the fetcher and not handled in this generation, before
        the acknowledged run, holds the commit too, and the partition is read again from
        it (its copy comes again; what this worker already applied counts as duplicates).
        """
        acked = self._acked[tp]
        if not acked:
            self._commit_stalls.pop(tp, None)
            return None
        head = min(acked)
        in_flight = sorted(
            m.offset
            for m in list(self._unacked_messages)
            if m.tp == tp and not m.acked and m.offset < head
        )
        missed = (
            None if in_flight else min((o for o in self._unhandled[tp] if o < head), default=None)
        )
        waits = bool(in_flight) or (missed is not None and self._read_again(tp, missed))
        offset: int | None = None if waits else super()._new_offset(tp)
        if offset is None:
            self._watch_stall(tp, head, len(acked), in_flight)
        else:
            self._commit_stalls.pop(tp, None)
        return offset

    def _read_again(self, tp: TP, offset: int) -> bool:
        """Seek ``tp`` back to ``offset``, a record fetched and never handled, unless a
        rebalance is under way (its own seek reads it again) or this was just done;
        whether the commit waits for it.  After :data:`REREAD_TRIES` reads that did not
        bring it (deleted by retention meanwhile: the fetcher resets past it) it is
        reported lost and the commit goes on."""
        now = time.monotonic()
        last_offset, last_at, tries = self._rereads.get(tp, (-1, 0.0, 0))
        tries = tries if last_offset == offset else 0
        if tries and now - last_at < REREAD_EVERY_S:
            return True
        if tries >= REREAD_TRIES:
            log.error(
                "%s[%d]: record %d was fetched and never handled, and %d reads from it "
                "did not bring it again: the commit goes past it (lost)",
                tp.topic,
                tp.partition,
                offset,
                tries,
            )
            self._unhandled[tp].discard(offset)
            del self._rereads[tp]
            return False
        if not self.flow_active or tp not in self.assignment():
            return True
        self._rereads[tp] = (offset, now, tries + 1)
        log.warning(
            "%s[%d]: record %d was fetched and never handled (skipped around a rebalance); "
            "the commit waits and the partition is read again from it",
            tp.topic,
            tp.partition,
            offset,
        )
        # seek_wait, not seek: it runs on the consumer's thread when there is one (aiokafka
        # is not thread-safe), sets Faust's read offset there, and waits for the position.
        task = asyncio.ensure_future(self.seek_wait({tp: offset}))
        self._seeks.add(task)
        task.add_done_callback(self._seek_done)
        return True

    def _seek_done(self, task: asyncio.Future[None]) -> None:
        self._seeks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The partition went in a rebalance meanwhile, say: the commit still waits,
            # and the next one tries again.
            log.warning("reading a partition again failed: %r", exc)

    def _watch_stall(self, tp: TP, head: int, n_acked: int, in_flight: list[int]) -> None:
        """Warn once when ``tp``'s commit has waited :data:`COMMIT_STALL_WARN_S` on records
        before its acknowledged ones: the lag metric then stays up although the worker
        keeps working, and this says why."""
        now = time.monotonic()
        since, warned = self._commit_stalls.setdefault(tp, (now, False))
        if warned or now - since < COMMIT_STALL_WARN_S:
            return
        self._commit_stalls[tp] = (since, True)
        log.warning(
            "commit of %s[%d] held at offset %s for %.0f s: %d records acknowledged from "
            "offset %d on, the ones before them not (in flight: %s); a restart reads again "
            "from the commit and finds what user state already holds (duplicates)",
            tp.topic,
            tp.partition,
            self._committed_offset[tp],
            now - since,
            n_acked,
            head,
            in_flight[:10] or "none",
        )


class Transport(driver.Transport):
    Consumer = _Consumer

    def __init__(
        self, *args: Any, fetch_max_wait_ms: int, consumer_thread: bool, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.consumer_thread = consumer_thread


class BatchingStream(faust.Stream[Any]):
    """``faust.Stream`` with :meth:`take_buffered` (``StreamApp`` makes every stream one)."""

    async def take_buffered(
        self, max_events: int, linger_s: float = 0.0
    ) -> AsyncGenerator[list[EventT[Any]], None]:
        """Batches of up to ``max_events`` events, each acknowledged after the loop body
        that got it has run (at least once, as ``take_events``).

        A batch is handed over as soon as the stream has taken in every record the
        consumer delivered so far (its channel is empty), or when it is full; an idle
        agent sleeps until the next record.  ``linger_s`` > 0 holds a batch that long
        after its first event, for more to come.  Order is the stream's: one agent
        instance sees each partition's records in offset order, batch after batch.
        """
        events: list[EventT[Any]] = []
        arrived = asyncio.Event()  # the batch has its first event
        caught_up = asyncio.Event()  # ... and every record delivered so far, or is full
        consumed = asyncio.Event()  # a full batch has been handled: room for more
        handling: asyncio.Future[None] | None = None  # the agent has the batch
        queue = cast(ChannelT[Any], self.channel).queue

        # Runs in the stream's own (passive) iteration, once per event, as the
        # processor take_events uses: the stream tracks and decodes, this collects.
        async def collect(value: Any) -> Any:
            nonlocal handling
            if handling is not None:
                # The agent holds the batch: this event waits for the next one.
                try:
                    await handling
                finally:
                    handling = None
            event = self.current_event
            if event is None:
                raise RuntimeError("take_buffered found no current event")
            events.append(event)
            arrived.set()
            if len(events) >= max_events:
                caught_up.set()
                consumed.clear()
                await self.wait(consumed)  # type: ignore[arg-type]  # mode types a mode Event
            elif queue.empty():
                caught_up.set()
            else:
                caught_up.clear()
            return value

        acks_enabled = self.enable_acks
        self.enable_acks = False  # acknowledged below, after the loop body ran
        self.add_processor(collect)
        self._enable_passive(cast(ChannelT[Any], aiter(self.channel)))
        try:
            while not self.should_stop:
                # Each wait is a few turns of the loop: skipped when already there (an
                # event into an idle stream sets both at once).
                if not arrived.is_set() and await self.wait_for_stopped(arrived):  # type: ignore[arg-type]
                    break
                if linger_s:
                    await self.sleep(linger_s)
                if not caught_up.is_set():
                    await self.wait_for_stopped(caught_up, timeout=STRANDED_BATCH_S)  # type: ignore[arg-type]
                if not events:
                    continue
                handling = self.loop.create_future()
                batch = list(events)
                try:
                    yield batch
                    # The loop body ran through: acknowledge.  Not when it raised or
                    # the agent stopped mid-batch: those records come again (unlike
                    # take_events, which acknowledges a batch whatever happened).
                    for event in batch:
                        await self.ack(event)
                finally:
                    events.clear()
                    arrived.clear()
                    caught_up.clear()
                    notify(handling)
                    consumed.set()
        finally:
            self.enable_acks = acks_enabled
            self._processors.remove(collect)


class StreamApp(faust.App):
    """``faust.App`` on :class:`Transport` (fetch wait, consumer thread or not) whose
    streams are :class:`BatchingStream`."""

    def __init__(
        self, *args: Any, fetch_max_wait_ms: int, consumer_thread: bool, **kwargs: Any
    ) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.consumer_thread = consumer_thread
        super().__init__(*args, Stream=BatchingStream, **kwargs)

    def _new_transport(self) -> TransportT:
        return Transport(
            self.conf.broker_consumer,
            self,
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            consumer_thread=self.consumer_thread,
        )
