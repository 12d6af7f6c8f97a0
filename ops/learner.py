"""``shoprec learner``: retrain on a schedule or after new events, promote only what is better.

A process of its own beside the workers (exactly one per shop: two would race for the
next version number).  Every ``SHOPREC_LEARNER_EVERY_S`` seconds, or as soon as
``SHOPREC_LEARNER_EVERY_EVENTS`` new events have arrived on the input topics (their end
offsets, read every few seconds), it runs one round of :mod:`ops.learn` (the first at
start; after one that found fewer than ``SHOPREC_LEARNER_MIN_EVENTS``, the next as soon as
the topics can hold enough; :class:`Trigger`): read the
retained topics (the last ``SHOPREC_LEARNER_WINDOW_S`` of them, or all), replay, train a
candidate, shadow-score it and the live version on the latest slice of events held out
by time (the most recent live triggers), and promote it through Triton's model control
on every server only when :func:`ops.learn.decide` says it is better; otherwise the live
version stays and the log and the history say why.  A round that fails (Kafka or Redis
away, too few events) is logged and tried again at the next trigger; servers that missed
a load are asked again every round, so a restarted or unreachable server catches up.
SIGTERM or SIGINT stops a round at its next checkpoint (:class:`~shoprec.errors.Interrupted`:
a fetch, a chunk of item texts, a replay step, a training batch, a judged scorer), without
a half-written candidate.

Prometheus metrics on ``SHOPREC_METRICS_HOST``:``SHOPREC_METRICS_PORT``:

    shoprec_learner_rounds_total{outcome}            promoted, kept, skipped, failed
    shoprec_learner_last_training_timestamp_seconds  end of the last training round
    shoprec_learner_last_training_seconds            how long it took (wall)
    shoprec_learner_last_promotion_timestamp_seconds when a version was last promoted
    shoprec_learner_live_version                     the version Triton serves (newest served)
    shoprec_learner_live_ndcg_at_10                  the live version's held-out NDCG@10
    shoprec_learner_candidate_ndcg_at_10             the last candidate's held-out NDCG@10
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ops.learn import LearnOptions, Round, TooFewEvents, learn_once
from ops.ranges import open_reader
from ops.versions import Versions, reconcile
from shoprec.errors import Interrupted, describe
from shoprec.settings import Settings
from streams.observability import serve_metrics
from streams.topics import TopicNames, partitions_of

log = logging.getLogger("shoprec.learner")

POLL_S = 5.0
RETRY_S = 60.0
OUTCOMES = ("promoted", "kept", "skipped", "failed")


@dataclass
class LearnerState:
    """What the metrics show; updated by the loop, read at scrape time."""

    rounds: Counter[str] = field(default_factory=Counter)
    last_training_ts: float = 0.0
    last_training_s: float = 0.0
    last_promotion_ts: float = 0.0
    live_version: int = 0
    live_ndcg: float = float("nan")
    candidate_ndcg: float = float("nan")
    last_round: Round | None = None


class LearnerCollector(Collector):
    def __init__(self, state: LearnerState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        st = self._state
        rounds = CounterMetricFamily(
            "shoprec_learner_rounds", "Learner rounds by outcome.", labels=["outcome"]
        )
        for outcome in OUTCOMES:
            rounds.add_metric([outcome], st.rounds[outcome])
        yield rounds
        for name, doc, value in (
            (
                "shoprec_learner_last_training_timestamp_seconds",
                "When the last training round ended (Unix time; 0: none yet).",
                st.last_training_ts,
            ),
            (
                "shoprec_learner_last_training_seconds",
                "Wall time of the last training round.",
                st.last_training_s,
            ),
            (
                "shoprec_learner_last_promotion_timestamp_seconds",
                "When a version was last promoted (Unix time; 0: none by this process).",
                st.last_promotion_ts,
            ),
            ("shoprec_learner_live_version", "The ranker version served.", st.live_version),
            (
                "shoprec_learner_live_ndcg_at_10",
                "The live version's NDCG@10 on the latest held-out slice.",
                st.live_ndcg,
            ),
            (
                "shoprec_learner_candidate_ndcg_at_10",
                "The last candidate's NDCG@10 on the same slice.",
                st.candidate_ndcg,
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


@dataclass
class Trigger:
    """When the next round is due: the first at once; then every ``every_s`` seconds
    (0: never by time), or once ``every_events`` more records are on the input topics
    (0: never by events), or, after a round that found too few events, once the topics
    hold enough (whichever comes first)."""

    every_s: float
    every_events: int
    next_at: float = float("inf")
    """Monotonic time of the next scheduled round (inf: none by time)."""
    counted: int | None = None
    """Records on the input topics when the last round started (None: not counted yet)."""
    waiting_for: int | None = None
    """After a round that found too few events: the record count worth another try."""
    first: bool = True

    def due_by_time(self, now: float) -> bool:
        return self.first or now >= self.next_at

    def counts_events(self) -> bool:
        """Whether :meth:`due_by_events` can say yes (so the topics are worth counting)."""
        return self.counted is not None and (self.waiting_for is not None or self.every_events > 0)

    def due_by_events(self, count: int) -> bool:
        if self.counted is None:
            return False
        if self.waiting_for is not None and count >= self.waiting_for:
            return True
        return self.every_events > 0 and count - self.counted >= self.every_events

    def started(self, now: float, count: int) -> None:
        """A round starts now, with ``count`` records on the input topics."""
        self.first = False
        self.next_at = now + self.every_s if self.every_s > 0 else float("inf")
        self.counted = count
        self.waiting_for = None

    def wait_for(self, count: int) -> None:
        """The round found too few events: another is due once the topics hold ``count``."""
        self.waiting_for = count

    def retry(self, now: float) -> None:
        """The round could not even count the topics (Kafka away): try again in
        :data:`RETRY_S`."""
        self.first = False
        self.next_at = now + RETRY_S


class Learner:
    """The loop: wait for a trigger, run a round, promote or keep; never exits on a failure."""

    def __init__(self, settings: Settings, options: LearnOptions | None = None) -> None:
        self.settings = settings
        self.options = options or LearnOptions().judged_as(settings)
        self.versions = Versions.from_settings(settings)
        self.state = LearnerState(live_version=self.versions.live() or 0)
        self.trigger = Trigger(settings.learner_every_s, settings.learner_every_events)
        self.stopping = threading.Event()
        """Set once ``stop`` is: the round in progress (a thread) gives up at its next
        checkpoint, so SIGTERM ends the process in seconds, within an orchestrator's grace
        period, instead of after the round (minutes) and a SIGKILL mid-write."""

    async def run(self, stop: asyncio.Event) -> None:
        serve_metrics(self.settings, LearnerCollector(self.state))
        relay = asyncio.create_task(self._relay(stop))
        log.info(
            "learner: every %.0f s or %d new events; served repository %s, candidates in %s",
            self.settings.learner_every_s,
            self.settings.learner_every_events,
            self.versions.served_dir,
            self.versions.archive_dir,
        )
        try:
            while not stop.is_set():
                if await self._due():
                    await self.round()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL_S)
        finally:
            relay.cancel()

    async def _relay(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.stopping.set()

    async def _due(self) -> bool:
        now = time.monotonic()
        if self.trigger.due_by_time(now):
            return True
        if not self.trigger.counts_events():
            return False
        try:
            count = await self._event_count()
        except Exception as exc:  # Kafka away: the schedule still holds
            log.warning("cannot count new events: %s", describe(exc))
            return False
        return self.trigger.due_by_events(count)

    async def _event_count(self) -> int:
        """Records ever written to the input topics (the sum of their end offsets)."""
        consumer = await open_reader(self.settings)
        try:
            tps = await partitions_of(consumer, TopicNames.from_settings(self.settings).events)
            return sum((await consumer.end_offsets(tps)).values())
        finally:
            await consumer.stop()

    async def round(self) -> Round | None:
        """One round; the outcome is counted, logged and kept in the history."""
        s, st = self.settings, self.state
        started = time.time()
        events_now: int | None = None
        try:
            events_now = await self._event_count()
            self.trigger.started(time.monotonic(), events_now)
            options = self.options
            if s.learner_window_s:
                now_ms = int(time.time() * 1000)
                options = dataclasses.replace(options, from_ms=now_ms - 1000 * s.learner_window_s)
            result = await learn_once(
                s, options, min_events=s.learner_min_events, stop=self.stopping
            )
        except TooFewEvents as few:
            st.rounds["skipped"] += 1
            # Try again as soon as the topics can hold enough, not a whole period later.
            if events_now is not None:
                self.trigger.wait_for(events_now + s.learner_min_events - few.count)
            log.info("learner: %d events so far, waiting for %d", few.count, s.learner_min_events)
            return None
        except Interrupted as why:
            log.info("learner: round %s; nothing promoted", why)
            return None
        except Exception:
            st.rounds["failed"] += 1
            if events_now is None:  # not even counted
                self.trigger.retry(time.monotonic())
            log.exception("learner round failed; the next trigger tries again")
            return None
        st.last_training_ts = time.time()
        st.last_training_s = st.last_training_ts - started
        st.candidate_ndcg = float(result.card["held_out"]["candidate"]["ndcg@10"])
        st.last_round = result
        if result.decision.promote:
            st.rounds["promoted"] += 1
            st.last_promotion_ts = time.time()
            st.live_version = result.version
            st.live_ndcg = st.candidate_ndcg
            log.info("learner: version %d promoted: %s", result.version, result.decision.reason)
        else:
            st.rounds["kept"] += 1
            st.live_version = result.live_version or 0
            st.live_ndcg = result.live_ndcg if result.live_ndcg is not None else float("nan")
            log.info(
                "learner: version %d not promoted, version %s stays live: %s",
                result.version,
                result.live_version,
                result.decision.reason,
            )
        choice = result.card.get("complements")
        if choice is not None:
            log.info(
                "learner: version %d takes %d complements after a purchase (%s order): %s",
                result.version,
                choice["served"],
                choice["order"],
                choice["reason"],
            )
        await self._reconcile()
        return result

    async def _reconcile(self) -> None:
        """Ask servers that do not serve the live version to load it (a restart or an
        outage during a promotion)."""
        live = self.versions.live()
        if live is None:
            return
        problems = await reconcile(self.settings.triton_url, self.versions.model, live)
        for endpoint, problem in problems.items():
            log.warning("Triton %s does not serve version %d yet: %s", endpoint, live, problem)
