"""What the pull API does: the worker's runtime, asked about users and items instead of events.

The service opens the worker's :class:`~streams.runtime.Runtime` (Redis, the Triton
client with its circuit breaker, the item table, the feature store, the recommender) and
answers requests in micro-batches, as the worker answers events: requests that arrive
while a batch is with the ranker wait and go together in the next one (no timer, no
added wait at low load).  Per batch: the queries embedded on Triton (BERT on the query
encoder, as the worker's searches, once per distinct query), one Redis read of the users'
context (``FeatureStore.read_context``), one more for the asks whose context the request
changes (an item in view, a search: ``FeatureStore.context_for``), and one ranker call
through :meth:`~streams.recommend.Recommender.recommend_now`.

When the ranker cannot be called, the answer comes from the same pipeline run here on
the item table with the retrieval signals as the order, marked ``degraded`` (the
worker's fallback).  That is the "latest list" a pull gets when Triton is down: made
from the user's current state and this request's context, fresher than any list kept
from an earlier event, and nothing more about the user is stored for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from redis.exceptions import RedisError

from api.metrics import ApiMetrics
from api.schema import PULL_TRIGGER, SIMILAR_TRIGGER
from features import keys
from features.store import UserContext
from features.user_state import HistoryEntry, Vector, normalise
from shoprec import redact
from shoprec.errors import DependencyUnavailable, RankerUnavailable, ShoprecError
from shoprec.events import ShopEvent
from shoprec.output import Recommendation
from shoprec.settings import Settings
from streams.runtime import ITEM_REFRESH_S, QueryEncoder, Runtime, now_ms

log = logging.getLogger("shoprec.api")

MAX_BATCH = 64
# Batches in flight at once: one is built (Redis) while another is with the ranker.
PIPELINE = 2
OPEN_RETRY_S = 2.0
# A request waits at most this long for its answer (Redis's timeout is 5 s, Triton's 2 s).
ANSWER_TIMEOUT_S = 10.0
READY_CHECK_S = 1.0


class InternalError(ShoprecError):
    """A batch failed for a reason that is not an outage (a bug): logged by type and place."""


@dataclass(slots=True)
class Ask:
    """One request waiting for its batch."""

    subject: str  # the user, or the item of a similar-items request
    similar: bool
    k: int
    context_item: str | None
    query: str | None
    request_id: str
    received_ms: int
    answer: asyncio.Future[Recommendation]
    queued_at: float = dataclasses.field(default_factory=time.perf_counter)


class PullService:
    """Answers pull requests from the worker's state and ranker; see the module docstring."""

    def __init__(self, settings: Settings, metrics: ApiMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ApiMetrics()
        self.runtime: Runtime | None = None
        self.not_ready = "starting: opening Redis, Triton and the item table"
        self._queue: asyncio.Queue[Ask] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    # --- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Open in the background: the process answers /health (and 503s) meanwhile."""
        self._tasks.append(asyncio.create_task(self._open(), name="api-open"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.runtime is not None:
            await self.runtime.close()
            self.runtime = None

    async def _open(self) -> None:
        while True:
            runtime = Runtime(self.settings, write_behavioural=False)
            try:
                await runtime.ensure_open()
                break
            except (ShoprecError, RedisError, OSError) as exc:
                self.not_ready = f"not ready: {exc}"
                log.warning("pull API %s; trying again in %.0f s", self.not_ready, OPEN_RETRY_S)
                await _close_partly_open(runtime)
                await asyncio.sleep(OPEN_RETRY_S)
        self.runtime = runtime
        self.not_ready = ""
        log.info("pull API ready: %d items in the table", len(runtime.items))
        self._tasks.append(asyncio.create_task(self._follow_items(runtime), name="api-items"))
        for n in range(PIPELINE):
            self._tasks.append(asyncio.create_task(self._batches(runtime), name=f"api-batch-{n}"))

    async def _follow_items(self, runtime: Runtime) -> None:
        """Keep the item table fresh off the request path, as the worker's catalogue agent
        does: a request never waits for a catalogue change to be read."""
        failing = False
        while True:
            await asyncio.sleep(ITEM_REFRESH_S)
            try:
                await runtime.items.maybe_refresh(ITEM_REFRESH_S)
                failing = False
            except (RedisError, OSError) as exc:
                if not failing:  # once per outage
                    log.warning("item table refresh failed: %s", redact.exception_ref(exc))
                failing = True

    # --- asking ----------------------------------------------------------------------

    def knows_item(self, item_id: str) -> bool:
        """Whether the item table holds ``item_id`` (raises while not open)."""
        return self._open_runtime().items.number(item_id) >= 0

    async def recommend(
        self, user_id: str, *, k: int, context_item: str | None = None, query: str | None = None
    ) -> Recommendation:
        """The user's top ``k`` now, with the item in view and a search query if given."""
        return await self._ask(user_id, False, k, context_item, query)

    async def similar(self, item_id: str, *, k: int) -> Recommendation:
        """``k`` items to show beside ``item_id`` (``user_id`` of the answer is meaningless)."""
        return await self._ask(item_id, True, k, None, None)

    async def _ask(
        self, subject: str, similar: bool, k: int, context_item: str | None, query: str | None
    ) -> Recommendation:
        self._open_runtime()
        ask = Ask(
            subject,
            similar,
            k,
            context_item,
            query,
            request_id=f"req-{uuid.uuid4().hex}",
            received_ms=now_ms(),
            answer=asyncio.get_running_loop().create_future(),
        )
        self._queue.put_nowait(ask)
        try:
            return await asyncio.wait_for(ask.answer, ANSWER_TIMEOUT_S)
        except TimeoutError:
            raise DependencyUnavailable(
                f"no answer within {ANSWER_TIMEOUT_S:.0f} s: Redis or Triton is too slow"
            ) from None

    def _open_runtime(self) -> Runtime:
        if self.runtime is None:
            raise DependencyUnavailable(self.not_ready)
        return self.runtime

    # --- answering -------------------------------------------------------------------

    async def _batches(self, runtime: Runtime) -> None:
        keys.STATE_PREFIX.set(self.settings.state_prefix)  # this task's Redis key prefix
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [a for a in batch if not a.answer.done()]  # callers that gave up
            if not batch:
                continue
            self.metrics.batch_size.observe(len(batch))
            started = time.perf_counter()
            for ask in batch:
                self.metrics.stages.labels("queue").observe(started - ask.queued_at)
            try:
                recs = await self._answer(runtime, batch)
            except (RedisError, OSError, DependencyUnavailable) as exc:
                _fail(batch, DependencyUnavailable(f"Redis did not answer ({type(exc).__name__})"))
                continue
            except Exception as exc:  # a bug: the callers get a 500, the log its place
                log.error("a batch of %d failed: %s", len(batch), redact.exception_ref(exc))
                _fail(batch, InternalError(f"internal error ({redact.exception_ref(exc)})"))
                continue
            for ask, rec in zip(batch, recs, strict=True):
                self.metrics.answers.labels(
                    "similar" if ask.similar else "user", str(rec.degraded).lower()
                ).inc()
                if not ask.answer.done():
                    ask.answer.set_result(rec)

    async def _answer(self, runtime: Runtime, batch: list[Ask]) -> list[Recommendation]:
        now = now_ms()
        stage = self._stage_timer()
        vectors, query_failed = await self._embed_queries(runtime, batch)
        stage("queries")
        dim = runtime.items.table.dim
        users = [a for a in batch if not a.similar]
        trending: dict[str, float] = {}
        stored: dict[str, UserContext] = {}
        if users:
            read = await runtime.store.read_context(
                (a.subject for a in users), {a.subject: now for a in users}
            )
            stored, trending = read.users, read.trending
        stage("state")
        # What a request adds to the stored state (the item in view, a search) changes
        # the context: those asks get theirs made anew, the same user twice in a batch
        # one each.  A similar-items ask is a shopper with no state viewing the item.
        contexts: dict[int, UserContext] = {}
        changed: dict[str, UserContext] = {}
        for n, a in enumerate(batch):
            state = nobody(dim) if a.similar else stored[a.subject]
            query = vectors.get(a.query) if a.query else None
            in_view = a.subject if a.similar else a.context_item
            if query is None and in_view is None:
                contexts[n] = state
                continue
            if query is not None:
                state = dataclasses.replace(state, query=query)
            if in_view is not None:
                state = viewing(state, in_view, runtime.items.vector(in_view), now)
            changed[str(n)] = UserContext(state.embedding, state.query, state.history)
        if changed:
            made = await runtime.store.context_for(changed, now)
            trending = trending or made.trending
            contexts |= {int(n): c for n, c in made.users.items()}
        stage("context")
        asks = [
            ShopEvent(
                event_id=a.request_id,
                type="search" if a.query in vectors else "view",
                user_id=a.subject,
                ts=now,
                item_id=a.subject if a.similar else a.context_item,
                query=a.query,
            )
            for a in batch
        ]
        recs = await runtime.recommender.recommend_now(
            asks, [contexts[n] for n in range(len(batch))], trending, max(a.k for a in batch)
        )
        stage("rank")
        return [
            dataclasses.replace(
                rec,
                items=rec.items[: a.k],
                trigger_type=SIMILAR_TRIGGER if a.similar else PULL_TRIGGER,
                trigger_ts=a.received_ms,
                degraded=rec.degraded or (a.query is not None and query_failed),
            )
            for a, rec in zip(batch, recs, strict=True)
        ]

    def _stage_timer(self) -> Callable[[str], None]:
        """Each call observes the seconds since the previous one under its stage."""
        last = time.perf_counter()

        def stage(name: str) -> None:
            nonlocal last
            now = time.perf_counter()
            self.metrics.stages.labels(name).observe(now - last)
            last = now

        return stage

    async def _embed_queries(
        self, runtime: Runtime, batch: list[Ask]
    ) -> tuple[dict[str, Vector], bool]:
        """BERT vectors of the batch's distinct queries; ({}, True) when Triton cannot."""
        queries = sorted({a.query for a in batch if a.query})
        if not queries:
            return {}, False
        try:
            vectors = await QueryEncoder(runtime.ranker, self.settings.query_encoder_model).encode(
                queries
            )
        except RankerUnavailable as exc:
            log.warning("queries not embedded, answering without them: %s", exc)
            return {}, True
        return dict(zip(queries, vectors, strict=True)), False

    # --- readiness -------------------------------------------------------------------

    async def readiness(self) -> dict[str, Any]:
        """Redis, Triton and the item table, each "ok" or why not."""
        runtime = self.runtime
        if runtime is None:
            return {
                "ready": False,
                "redis": self.not_ready,
                "triton": self.not_ready,
                "items": 0,
                "degraded": True,
            }
        redis = triton = "ok"
        try:
            await asyncio.wait_for(runtime.redis.ping(), READY_CHECK_S)
        except (RedisError, OSError, TimeoutError) as exc:
            redis = f"Redis does not answer ({type(exc).__name__})"
        try:
            await runtime.ranker.wait_ready(timeout_s=READY_CHECK_S, warm=False)
        except RankerUnavailable as exc:
            triton = str(exc)
        n_items = len(runtime.items)
        return {
            "ready": redis == "ok" and n_items > 0,
            "redis": redis,
            "triton": triton,
            "items": n_items,
            "degraded": triton != "ok",
        }


def nobody(dim: int) -> UserContext:
    """The state of a shopper shoprec knows nothing of."""
    return UserContext(np.zeros(dim, np.float32), np.zeros(dim, np.float32), [])


def viewing(state: UserContext, item_id: str, vector: Vector | None, now: int) -> UserContext:
    """``state`` as if the shopper had just viewed ``item_id``, for this answer only
    (nothing is stored): the view heads the history, so co-visitation and category
    trending come from the item and the ranker attends to it; a shopper with no taste
    yet takes the item's."""
    embedding = state.embedding
    if not np.any(embedding):
        embedding = normalise(vector, len(embedding))
    return UserContext(embedding, state.query, [HistoryEntry(item_id, "view", now), *state.history])


def _fail(batch: list[Ask], exc: Exception) -> None:
    for ask in batch:
        if not ask.answer.done():
            ask.answer.set_exception(exc)


async def _close_partly_open(runtime: Runtime) -> None:
    """What a failed :meth:`Runtime.ensure_open` had opened already."""
    ranker = getattr(runtime, "ranker", None)
    if ranker is not None:
        with contextlib.suppress(Exception):
            await ranker.close()
    redis = getattr(runtime, "redis", None)
    if redis is not None:
        with contextlib.suppress(Exception):
            await redis.aclose()
