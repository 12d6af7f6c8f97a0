"""The worker's runtime: its connections and pipeline objects, opened once.

Plain Python with no Faust in it, so the Faust app (``streams/app.py``) runs it
in agents and the offline tools (``ops/replay.py``, ``ops/rebuild.py``) reuse it
without importing the Faust app.  An agent hands it a micro-batch of raw records
and publishes what it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from features import keys
from features.catalog import remove_items, upsert_items
from features.connection import open_redis
from features.forget import ForgetList
from features.item_index import ItemIndex
from features.store import FeatureStore, UpdatePolicy
from features.user_state import Vector
from ranking.breaker import CircuitBreaker
from ranking.client import RankerClient
from shoprec import redact
from shoprec.dlq import DeadLetter
from shoprec.errors import DependencyUnavailable, InvalidEvent, describe
from shoprec.events import CatalogItem, Limits, parse_catalog_item, tombstone_item_id
from shoprec.output import Recommendation
from shoprec.retry import retry
from shoprec.settings import Settings
from streams.experiment import ExperimentRunner
from streams.ingest import Ingestor, RawRecord
from streams.metrics import WorkerStats
from streams.recommend import Recommender, RecommendPolicy

log = logging.getLogger("shoprec.worker")

# The item table follows items:log at most this often (catalogue freshness).
ITEM_REFRESH_S = 0.5
# A catalogue chunk (64 texts) may take seconds to embed: item_encoder runs one thread at
# a low priority on a CPU, behind the ranker.  A short timeout would only send the same
# chunk again while the first is still being embedded (seen at 2 s on a loaded machine).
CATALOGUE_ENCODE_TIMEOUT_S = 120.0
# How long a stopping worker waits for its last publishes to be acknowledged.
CONFIRM_ON_CLOSE_S = 3.0


def now_ms() -> int:
    return int(time.time() * 1000)


def limits_from(settings: Settings) -> Limits:
    return Limits(settings.max_event_bytes, settings.max_field_chars, settings.max_future_skew_ms)


class QueryEncoder:
    """Search queries go to the query encoder: the catalogue's encoder runs at a lower
    priority and may be busy with a catalogue load (``ranking/encoder_model.py``)."""

    def __init__(self, ranker: RankerClient, model: str) -> None:
        self._ranker = ranker
        self._model = model

    async def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        return await self._ranker.encode(texts, model=self._model)


class Runtime:
    """The worker's connections and pipeline objects, opened once."""

    def __init__(self, settings: Settings, *, write_behavioural: bool = True) -> None:
        self.settings = settings
        self._write_behavioural = write_behavioural
        self.stats = WorkerStats()
        self._lock = asyncio.Lock()
        self._opened = False
        self._confirming: set[asyncio.Task[None]] = set()

    async def ensure_open(self) -> None:
        async with self._lock:
            if not self._opened:
                await self._open()
                self._opened = True

    async def _open(self) -> None:
        s = self.settings
        self.redis = open_redis(s.redis_url, cluster=s.redis_cluster, timeout_s=5.0)
        try:
            await self.redis.ping()
        except Exception as exc:
            raise DependencyUnavailable(
                f"cannot reach Redis ({describe(exc)}); "
                "check SHOPREC_REDIS_URL and that Redis is up"
            ) from exc
        self.ranker = RankerClient.from_settings(
            s,
            breaker=CircuitBreaker(
                f"triton {s.triton_url}",
                failures=s.triton_breaker_failures,
                cool_down_s=s.triton_breaker_cool_down_s,
                max_cool_down_s=16 * s.triton_breaker_cool_down_s,
            ),
        )
        # Its own client: a slow catalogue load neither times out nor opens the ranker's
        # circuit breaker.
        self.catalogue_encoder = RankerClient.from_settings(s, timeout_s=CATALOGUE_ENCODE_TIMEOUT_S)
        models = [s.item_encoder_model, s.query_encoder_model, s.ranker_model]
        await self.ranker.wait_ready(models, timeout_s=60.0)
        self.items = ItemIndex(self.redis, write_behavioural=self._write_behavioural)
        loaded = await self.items.refresh()
        log.info("item table loaded: %d items", loaded)
        store = FeatureStore(
            self.redis,
            UpdatePolicy.of(s),
            category_of=self.items.category,
            query_categories=self.items.categories_near,
        )
        self.store = store
        # Attribution and the experiment (SHOPREC_EXPERIMENT; None when the window is 0).
        self.experiment = ExperimentRunner.from_settings(s, self.redis, self.stats)
        if self.experiment is not None:
            await self.experiment.check_versions(self.ranker)
        self.ingestor = Ingestor(
            store,
            self.items,
            QueryEncoder(self.ranker, s.query_encoder_model),
            limits_from(s),
            now_ms,
            forgotten=ForgetList.from_settings(self.redis, s),
            experiment=self.experiment,
        )
        self.recommender = Recommender(
            store,
            self.redis,
            self.items,
            self.ranker,
            RecommendPolicy.from_settings(s),
            now_ms,
            experiment=self.experiment,
        )

    async def close(self) -> None:
        if self._opened:
            if self._confirming:
                # A confirmation cut short only means a redelivery re-emits: at least once.
                await asyncio.wait(self._confirming, timeout=CONFIRM_ON_CLOSE_S)
            if self.experiment is not None:
                with contextlib.suppress(Exception):  # counters for the bandit, not the report
                    await self.experiment.flush()
            await self.ranker.close()
            await self.catalogue_encoder.close()
            await self.redis.aclose()

    def confirm_when_acknowledged(
        self, acks: Sequence[Awaitable[Any]], recs: Sequence[Recommendation]
    ) -> None:
        """:meth:`confirm_published` once the broker has acknowledged every publish, in
        the background: the next batch need not wait for the acknowledgements."""
        task = asyncio.create_task(self._confirm_after(acks, recs))
        self._confirming.add(task)
        task.add_done_callback(self._confirming.discard)

    async def _confirm_after(
        self, acks: Sequence[Awaitable[Any]], recs: Sequence[Recommendation]
    ) -> None:
        try:
            await asyncio.gather(*acks)
            await self.confirm_published(recs)
        except Exception as exc:  # never fatal: a redelivery would only recommend again
            log.warning("%d triggers stay pending: %s", len(recs), redact.exception_ref(exc))

    async def confirm_published(self, recs: Sequence[Recommendation]) -> None:
        """The broker acknowledged these: a redelivery of their triggers is a duplicate.

        Until then each trigger stays pending in user state, so a worker that dies between
        writing the state and publishing leaves its successor something to re-trigger
        (at least once; ``trigger.event_id`` tells a consumer it has seen one already).
        """
        keys.STATE_PREFIX.set(self.settings.state_prefix)
        await retry(
            "confirm published",
            lambda: self.store.confirm_published((r.user_id, r.trigger_event_id) for r in recs),
        )

    async def handle_events(
        self, records: Sequence[RawRecord]
    ) -> tuple[list[Recommendation], list[DeadLetter]]:
        """One micro-batch of shop events, end to end, minus the publishing."""
        keys.STATE_PREFIX.set(self.settings.state_prefix)  # live state, or a replay's shadow
        t0 = time.perf_counter()
        await self.items.maybe_refresh(ITEM_REFRESH_S)
        t1 = time.perf_counter()
        outcome = await self.ingestor.ingest(records)
        t2 = time.perf_counter()
        # The batch is in user state now: an outage from here on retries the recommending
        # alone, or the whole batch would come back as duplicates that recommend nothing.
        recs = await retry(
            "recommend",
            functools.partial(self.recommender.recommend, outcome.triggers, outcome.arms),
        )
        held_out = self.recommender.held_out
        if held_out:
            # No list to publish for them: their triggers are done (not pending) now.
            await retry(
                "confirm held out",
                lambda: self.store.confirm_published((t.user_id, t.event_id) for t in held_out),
            )
        st = self.stats
        st.batch_sizes.append(len(records))
        st.record_stages(
            {"item_refresh": (t1 - t0) * 1000, "ingest": (t2 - t1) * 1000}
            | self.recommender.stage_ms
        )
        st.events_in += len(records)
        st.dead_lettered += len(outcome.dead_letters)
        st.duplicates += outcome.duplicates
        st.rate_limited += outcome.rate_limited
        st.coalesced += outcome.coalesced
        st.suppressed += outcome.suppressed
        re_emitted = sum(r.trigger_event_id in outcome.redelivered for r in recs)
        # A redelivered holdout trigger is in duplicates already.
        st.held_out += sum(t.event_id not in outcome.redelivered for t in held_out)
        st.recommended += len(recs) - re_emitted
        st.re_emitted += re_emitted
        st.degraded += sum(r.degraded for r in recs)
        st.latencies_ms.extend(r.latency_ms for r in recs)
        st.observe_batch(
            (r.topic for r in records),
            (d.reason for d in outcome.dead_letters),
            [r.latency_ms for r in recs],
            outcome.query_embedding_failed + any(r.degraded for r in recs),
        )
        return recs, outcome.dead_letters

    async def handle_events_isolating_failures(
        self, records: Sequence[RawRecord]
    ) -> tuple[list[Recommendation], list[DeadLetter]]:
        """:meth:`handle_events`, retried while dependencies are down; a record that
        still fails for another reason (a bug, not an outage) is found by splitting
        the batch and dead-lettered alone, so one poison record stops nothing."""
        try:
            return await retry("event batch", functools.partial(self.handle_events, records))
        except Exception as exc:
            if len(records) == 1:
                r = records[0]
                log.error(
                    "record %s[%d]@%d key %s failed processing (%s); dead-lettering it",
                    r.topic,
                    r.partition,
                    r.offset,
                    redact.user_ref(r.key),
                    redact.exception_ref(exc),
                )
                letter = DeadLetter(
                    "processing_error",
                    repr(exc)[:500],
                    r.topic,
                    r.partition,
                    r.offset,
                    r.key,
                    r.value,
                )
                self.stats.events_in += 1
                self.stats.dead_lettered += 1
                # Counted by topic too: shoprec_events_total adds up to events_in.
                self.stats.observe_batch([r.topic], ["processing_error"], [])
                return [], [letter]
        recs: list[Recommendation] = []
        dead: list[DeadLetter] = []
        for record in records:
            more_recs, more_dead = await self.handle_events_isolating_failures([record])
            recs += more_recs
            dead += more_dead
        return recs, dead

    async def handle_catalog(self, records: Sequence[RawRecord]) -> list[DeadLetter]:
        """Embed new or changed items with BERT (once per item) and store them."""
        limits = limits_from(self.settings)
        upserts: list[CatalogItem] = []
        removals: list[str] = []
        dead: list[DeadLetter] = []
        for r in records:
            try:
                if r.value is None:
                    removals.append(tombstone_item_id(r.key, limits))
                else:
                    upserts.append(parse_catalog_item(r.key, r.value, limits=limits))
            except InvalidEvent as exc:
                dead.append(
                    DeadLetter(
                        exc.reason, exc.detail, r.topic, r.partition, r.offset, r.key, r.value
                    )
                )
        if upserts:
            embeddings = await self._embed_texts([i.text() for i in upserts])
            await retry("store items", lambda: upsert_items(self.redis, upserts, embeddings))
        if removals:
            await retry("remove items", lambda: remove_items(self.redis, removals))
        # Apply the change here, off the event path: the first event after a catalogue
        # load would otherwise wait for the whole load to be read back (0.53 s measured
        # for 6,493 items) and every recommendation in that batch with it.
        await retry("refresh items", self.items.refresh)
        self.stats.catalog_items += len(upserts) + len(removals)
        self.stats.catalog_dead_lettered += len(dead)
        return dead

    async def _embed_texts(self, texts: Sequence[str]) -> list[Vector | None]:
        """BERT vectors for non-empty texts; each distinct text is encoded once."""
        distinct = sorted({t for t in texts if t})
        vectors = await retry("item_encoder", lambda: self.catalogue_encoder.encode(distinct))
        by_text = dict(zip(distinct, vectors, strict=True))
        return [by_text.get(t) for t in texts]
