"""Ingest: raw records → validated events → user state; picks the events that trigger.

This is the body of the ingest agent without Faust, so it can be driven by
tests and by the replay tools directly.  With an experiment runner
(``streams.experiment``), the batch's clicks, carts and purchases are then credited to
the lists they followed, and every user of the batch gets their arm.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from features.forget import ForgetList
from features.store import UpdateResult, UserUpdate
from features.user_state import Vector
from shoprec.dlq import DeadLetter
from shoprec.errors import InvalidEvent, ShoprecError
from shoprec.events import Limits, ShopEvent, parse_event
from streams.experiment import ExperimentRunner
from streams.protocols import ItemVectors, QueryEncoder

log = logging.getLogger("shoprec.ingest")

IN_DOUBT_CAP = 100_000
"""Event ids of failed attempts remembered at most (a batch normally succeeds on its next
try and forgets them; only batches dead-lettered after the write could leave some)."""


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One Kafka record as the agent received it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(slots=True)
class IngestOutcome:
    triggers: list[ShopEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0
    rate_limited: int = 0
    coalesced: int = 0  # triggers superseded by a later event of the same user in the batch
    # Triggers that are duplicates (counted there too): state written by a worker that died
    # before publishing their recommendation.  They recommend again; nothing is re-applied.
    redelivered: set[str] = field(default_factory=set)
    query_embedding_failed: int = 0
    # Events of users who asked to be forgotten, from before they asked: never applied.
    suppressed: int = 0
    # Each user's experiment arm (every user of the batch; empty without an experiment).
    arms: dict[str, str] = field(default_factory=dict)


def parse_records(
    records: Sequence[RawRecord], now_ms: int, limits: Limits
) -> tuple[list[ShopEvent], list[DeadLetter]]:
    """Split a batch into valid events and dead letters (bad input never raises)."""
    events: list[ShopEvent] = []
    dead: list[DeadLetter] = []
    for r in records:
        try:
            events.append(parse_event(r.value, now_ms=now_ms, limits=limits))
        except InvalidEvent as exc:
            dead.append(
                DeadLetter(exc.reason, exc.detail, r.topic, r.partition, r.offset, r.key, r.value)
            )
    return events, dead


class EventStore(Protocol):
    """Where events fold into user state: the Redis ``FeatureStore`` live, an in-memory
    one behind the same call offline (the experiment simulation)."""

    async def apply_events(self, updates: Sequence[UserUpdate]) -> list[UpdateResult]: ...


class Ingestor:
    """Folds a batch of records into the feature store."""

    def __init__(
        self,
        store: EventStore,
        items: ItemVectors,
        encoder: QueryEncoder,
        limits: Limits,
        clock_ms: Callable[[], int],
        forgotten: ForgetList | None = None,
        experiment: ExperimentRunner | None = None,
    ) -> None:
        self._store = store
        self._experiment = experiment
        self._forgotten = forgotten
        self._items = items
        self._encoder = encoder
        self._limits = limits
        self._clock_ms = clock_ms
        # Events whose state write was sent by an attempt that then failed: Redis may have
        # run it and lost only the reply, or a later step (attribution) failed.  The
        # worker retries the batch, and the write then finds those events applied; they
        # are this worker's own, not a redelivery, and are counted as applied.
        self._in_doubt: set[str] = set()

    async def ingest(self, records: Sequence[RawRecord]) -> IngestOutcome:
        events, dead = parse_records(records, self._clock_ms(), self._limits)
        outcome = IngestOutcome(dead_letters=dead)
        if events and self._forgotten is not None:
            # Before anything reads them (a search's query goes to BERT): an erased user's
            # retained events must not bring them back, live, in a replay or a rebuild.
            events, outcome.suppressed = await self._forgotten.drop_suppressed(events)
        if not events:
            return outcome
        vectors = await self._event_vectors(events, outcome)
        updates = [UserUpdate.of(e, v) for e, v in zip(events, vectors, strict=True)]
        ids = [e.event_id for e in events]
        if len(self._in_doubt) > IN_DOUBT_CAP:  # only batches that never succeeded stay
            self._in_doubt.clear()
        retried = self._in_doubt.intersection(ids)
        self._in_doubt.update(ids)
        results = await self._store.apply_events(updates)
        if self._experiment is not None:
            # Every event, duplicates too: attribution dedupes by event id itself, so an
            # event whose state a dead worker wrote but never credited is credited now.
            outcome.arms = await self._experiment.observe(events)
        latest: dict[str, ShopEvent] = {}
        redelivered: set[str] = set()
        applied_here: set[str] = set()
        for event, result in zip(events, results, strict=True):
            if not result.applied and event.event_id in retried:
                # Applied by this batch's failed attempt (its first copy only); the emit
                # flag says whether it is the user's pending trigger, as on that attempt
                # (an earlier event of the same user is then counted rate-limited, not
                # coalesced: one bucket either way).
                retried.discard(event.event_id)
                result = replace(result, applied=True)
            if result.applied:
                outcome.applied += 1
                applied_here.add(event.event_id)
                if not result.emit:
                    outcome.rate_limited += 1
                    continue
            else:
                outcome.duplicates += 1
                # A second copy of an event this batch applied (a producer's retry written
                # twice) finds it pending, but is no redelivery: the first copy triggers.
                if not result.emit or event.event_id in applied_here:
                    continue
                redelivered.add(event.event_id)
            previous = latest.get(event.user_id)
            if previous is not None:
                superseded = event if previous.ts > event.ts else previous
                if superseded.event_id not in redelivered:  # already in duplicates
                    outcome.coalesced += 1
                if superseded is event:
                    continue
            latest[event.user_id] = event
        outcome.triggers = list(latest.values())
        outcome.redelivered = {e.event_id for e in outcome.triggers} & redelivered
        self._in_doubt.difference_update(ids)
        return outcome

    async def _event_vectors(
        self, events: Sequence[ShopEvent], outcome: IngestOutcome
    ) -> list[Vector | None]:
        """The embedding each event adds to its user: the item's, or the query's (BERT, once)."""
        vectors: list[Vector | None] = [
            None if e.item_id is None else self._items.vector(e.item_id) for e in events
        ]
        searches = [i for i, e in enumerate(events) if e.type == "search" and e.query]
        if searches:
            try:
                embedded = await self._encoder.encode([events[i].query or "" for i in searches])
            except ShoprecError as exc:
                # The search still enters the history; only its taste signal is lost.
                log.warning("query embedding failed for %d searches: %s", len(searches), exc)
                outcome.query_embedding_failed += len(searches)
            else:
                for i, vec in zip(searches, embedded, strict=True):
                    vectors[i] = np.asarray(vec, dtype=np.float32)
        return vectors
