"""Recommend: for the users an event batch triggered, read their context, call the ranker
once, write the lists.

The worker moves data; Triton does the math.  Per micro-batch: one Redis read pipeline
(``FeatureStore.read_context``), one :class:`~ranking.pipeline.RecommendRequest` of item
numbers and arrays, one ``fused_ranker`` call that retrieves, mixes, filters, scores and
returns each user's top-K with its explanation (``ranking.pipeline``), and item ids turned
back into strings once, for the output.  When the ranker cannot be called, the same
pipeline runs here against the worker's own item table with the retrieval signals as the
order (``FallbackScorer``), and the output says ``"degraded": true``.

With an experiment (``streams.experiment``), each user is scored the way their arm
scores (a ranker version on Triton, or co-visitation or retrieval order here), a holdout
user gets no list, shadow arms score everyone without emitting, and the lists made are
remembered for attribution.  Every list carries its id, experiment and arm.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
from redis.asyncio import Redis

from features.candidates import ranked
from features.item_index import ItemIndex
from features.item_table import ItemTable
from features.store import FeatureStore, UserContext
from ranking.client import RankerClient
from ranking.fusion import Reason
from ranking.pipeline import FallbackScorer, RecommendRequest, Scorer, TopK, recommend
from shoprec.errors import RankerUnavailable
from shoprec.events import ShopEvent, event_code
from shoprec.experiments import Arm, Experiment, list_id
from shoprec.output import RecItem, Recommendation
from shoprec.settings import Settings
from streams.experiment import (
    ArmAnswer,
    CovisitationScorer,
    ExperimentRunner,
    rank_by_arm,
    shown_lists,
    take_rows,
    top_rows,
)

log = logging.getLogger("shoprec.recommend")

FALLBACK_MODEL = "retrieval@fallback"
# Without an experiment every list comes from the served ranker, in no arm.
NO_ARM = Arm(name="none", share=1.0)
F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
Decoded = tuple[ArmAnswer, list[str | None]]
"""An arm's answer with its item ids, row-major (None where a number names no item)."""


@dataclass(frozen=True, slots=True)
class RecommendPolicy:
    top_k: int
    n_candidates: int
    history_len: int
    complements: int  # after a purchase, co-purchases sent to take turns with the ranker

    @classmethod
    def from_settings(cls, s: Settings) -> RecommendPolicy:
        return cls(s.top_k, s.n_candidates, s.history_len, s.complements_after_purchase)

    def carrying(self, experiment: Experiment) -> RecommendPolicy:
        """The policy requests are built with: enough complements for the arm that takes
        the most (each arm's call keeps its own number, ``rank_by_arm``)."""
        return replace(self, complements=experiment.most_complements(self.complements))


class Recommender:
    def __init__(
        self,
        store: FeatureStore,
        redis: Redis,
        items: ItemIndex,
        ranker: RankerClient,
        policy: RecommendPolicy,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        experiment: ExperimentRunner | None = None,
    ) -> None:
        self._store = store
        self._redis = redis
        self._items = items
        self._ranker = ranker
        self._policy = policy
        self._request_policy = (
            policy if experiment is None else policy.carrying(experiment.experiment)
        )
        self._clock_ms = clock_ms
        self._fallback = FallbackScorer()
        self._experiment = experiment
        self._local: dict[str, Scorer] = {
            "covisitation": CovisitationScorer(),
            "retrieval": self._fallback,
        }
        self.stage_ms: dict[str, float] = {}
        """Milliseconds each stage of the last call took (for the stats and benchmarks)."""
        self.held_out: list[ShopEvent] = []
        """The last call's triggers of users in a holdout arm: no list for them."""

    async def recommend(
        self, triggers: Sequence[ShopEvent], arms: Mapping[str, str] | None = None
    ) -> list[Recommendation]:
        """The lists of these triggers' users; ``arms`` (user -> arm, as
        :meth:`ExperimentRunner.observe` answered) saves a round trip when known."""
        self.held_out = []
        if not triggers:
            self.stage_ms = {}
            return []
        t0 = time.perf_counter()
        ctx = await self._store.read_context(
            (t.user_id for t in triggers), {t.user_id: t.ts for t in triggers}
        )
        t1 = time.perf_counter()
        users = [ctx.users[t.user_id] for t in triggers]
        request = build_request(
            triggers, users, ctx.trending, self._items.table, self._request_policy
        )
        t2 = time.perf_counter()
        answers = self._decode_and_fill(request, await self._rank_by_arm(triggers, request, arms))
        t3 = time.perf_counter()
        recs = await self._assemble(triggers, answers)
        t4 = time.perf_counter()
        self.stage_ms = {
            "redis_read": (t1 - t0) * 1000,
            "request": (t2 - t1) * 1000,
            "ranker": (t3 - t2) * 1000,
            "assemble": (t4 - t3) * 1000,
        }
        return recs

    async def recommend_now(
        self,
        asks: Sequence[ShopEvent],
        users: Sequence[UserContext],
        trending: dict[str, float],
        top_k: int,
    ) -> list[Recommendation]:
        """Recommend now for these users with this context, outside the event stream (the
        pull API, ``api.service``).

        Each ask stands where a trigger event would: the user, the time, the item in view
        (``item_id``) and, for a search (type ``"search"``), the query, whose vector is in
        that user's context.  ``users`` are the asks' contexts, one each, as
        :meth:`FeatureStore.read_context` reads them or as the caller made them (similar
        items: a shopper whose only history is that item).  The same request, ranker call,
        fallback and explanations as a batch of events; ``top_k`` items each.
        """
        if not asks:
            return []
        policy = replace(
            self._policy, top_k=top_k, n_candidates=max(top_k, self._policy.n_candidates)
        )
        request = build_request(asks, users, trending, self._items.table, policy)
        top, model, degraded = await self._rank(request)
        every = list(range(len(asks)))
        answers = self._decode_and_fill(request, [ArmAnswer(NO_ARM, every, top, model, degraded)])
        return await self._assemble(asks, answers)

    async def _rank_by_arm(
        self,
        triggers: Sequence[ShopEvent],
        request: RecommendRequest,
        arms: Mapping[str, str] | None,
    ) -> list[ArmAnswer]:
        """Each trigger's list from its user's arm (one arm, the served ranker, without an
        experiment); holdout triggers are kept in :attr:`held_out`."""
        exp = self._experiment
        if exp is None:
            top, model, degraded = await self._rank(request)
            return [ArmAnswer(NO_ARM, list(range(len(triggers))), top, model, degraded)]
        known = dict(arms or {})
        missing = {t.user_id for t in triggers} - known.keys()
        if missing:
            known |= await exp.arms_of(missing)
        per_row = [exp.arm(known[t.user_id]) for t in triggers]
        self.held_out = [t for t, a in zip(triggers, per_row, strict=True) if a.kind == "holdout"]
        return await rank_by_arm(
            request, per_row, exp.shadows, self._rank_arm, self._policy.complements
        )

    async def _rank_arm(self, request: RecommendRequest, arm: Arm) -> tuple[TopK, str, bool]:
        """One arm's top-K: Triton's ranker (the arm's version, or the served one), or a
        scorer run here on the same candidates."""
        if arm.kind == "ranker":
            return await self._rank(request, arm.model_version)
        items = self._items
        top = recommend(request, items.table, items.retrieval, self._local[arm.kind])
        return top, f"{arm.kind}@worker", False

    async def _rank(self, request: RecommendRequest, version: str = "") -> tuple[TopK, str, bool]:
        """The ranker's top-K, its model and version; the fallback's, degraded, when the
        ranker cannot be called."""
        try:
            answer = await self._ranker.recommend(request, version)
        except RankerUnavailable as exc:
            log.warning("ranker unavailable, serving retrieval order: %s", exc)
            items = self._items
            top = recommend(request, items.table, items.retrieval, self._fallback)
            return top, FALLBACK_MODEL, True
        return answer.top, f"{self._ranker.ranker_model}@{answer.model_version}", False

    def _decode_and_fill(
        self, request: RecommendRequest, answers: list[ArmAnswer]
    ) -> list[Decoded]:
        """Each answer with its item numbers made ids (once per micro-batch); users the
        ranker answered with an empty list while this worker's own fallback finds items
        get the fallback's list, marked degraded.

        Triton's item table follows ``items:log`` a moment behind the worker's (every
        ``ITEM_REFRESH_INTERVAL_S``, a bounded number of changes per call), so the first
        batches after a catalogue is loaded into an empty shop could otherwise publish
        empty recommendations; so would a Triton pointed at another Redis, whose items
        this worker cannot name.
        """
        out: list[Decoded] = []
        table = self._items.table
        for a in answers:
            ids = table.id_of(a.top.items)
            k = a.top.items.shape[1]
            # Empty as published: numbers this worker's table does not know are dropped.
            known = np.array([i is not None for i in ids], np.bool_).reshape(-1, k)
            empty = np.flatnonzero(~known.any(axis=1)).tolist()
            if a.degraded or not empty:
                out.append((a, ids))
                continue
            rows = [a.rows[j] for j in empty]
            fallback = recommend(
                take_rows(request, rows), table, self._items.retrieval, self._fallback
            )
            filled = np.flatnonzero((fallback.items >= 0).any(axis=1)).tolist()
            if not filled:
                out.append((a, ids))
                continue
            log.warning(
                "%s answered %d of %d lists empty; serving the retrieval order for %d "
                "(its item table is behind this worker's: a catalogue just loaded?)",
                a.model,
                len(empty),
                len(a.rows),
                len(filled),
            )
            replaced = {empty[f] for f in filled}
            keep = [j for j in range(len(a.rows)) if j not in replaced]
            if keep:
                kept = ArmAnswer(
                    a.arm, [a.rows[j] for j in keep], top_rows(a.top, keep), a.model, False
                )
                out.append((kept, [ids[j * k + c] for j in keep for c in range(k)]))
            served = top_rows(fallback, filled)
            out.append(
                (
                    ArmAnswer(a.arm, [rows[f] for f in filled], served, FALLBACK_MODEL, True),
                    table.id_of(served.items),
                )
            )
        return out

    async def _assemble(
        self, triggers: Sequence[ShopEvent], answers: Sequence[Decoded]
    ) -> list[Recommendation]:
        """The explanation's items get their names.
        Live arms' lists become the output, in trigger order; every list made, shadow
        lists too, is remembered for attribution (one pipeline)."""
        table = self._items.table
        decoded = [(a, ids, table.id_of(a.top.source_item)) for a, ids in answers]
        wanted = {s for a, _, sources in decoded if a.arm.emits for s in sources if s}
        names = await self._items.names(sorted(wanted))
        now = self._clock_ms()
        name = self._experiment.experiment.name if self._experiment else ""
        by_row: dict[int, Recommendation] = {}
        for answer, ids, sources in decoded:
            if answer.arm.shadow:
                continue
            top = answer.top
            k = top.items.shape[1]
            scores = top.scores.tolist()
            reasons = top.reasons.tolist()
            trending = top.is_trending.tolist()
            for r, row in enumerate(answer.rows):
                t = triggers[row]
                picked = []
                for j in range(k):
                    item = ids[r * k + j]
                    if item is None:  # padding, or an item this worker has not read yet
                        continue
                    source = sources[r * k + j]
                    words = explanation(
                        Reason(reasons[r][j]),
                        names.get(source, source) if source else None,
                        bool(trending[r][j]),
                    )
                    picked.append(RecItem(item, float(scores[r][j]), words))
                experiment = name if answer.arm is not NO_ARM else ""
                by_row[row] = Recommendation(
                    user_id=t.user_id,
                    items=tuple(picked),
                    model=answer.model,
                    trigger_event_id=t.event_id,
                    trigger_type=t.type,
                    trigger_ts=t.ts,
                    emitted_ts=now,
                    degraded=answer.degraded,
                    list_id=list_id(t.user_id, t.event_id),
                    experiment=experiment,
                    arm=answer.arm.name if experiment else "",
                )
        if self._experiment is not None:
            made = [(a, ids) for a, ids, _ in decoded if a.arm is not NO_ARM]
            await self._experiment.show(shown_lists(triggers, made, name))
        return [by_row[row] for row in sorted(by_row)]


def explanation(reason: Reason, source: str | None, trending: bool) -> tuple[str, ...]:
    """The ranker's reason in words a shopper understands, plus "trending" if it is."""
    if reason == Reason.QUERY:
        primary = "matches your search"
    elif reason == Reason.COVISIT and source:
        primary = f"often seen together with {source}"
    elif reason == Reason.BOUGHT_WITH and source:
        primary = f"often bought together with {source}"
    elif reason == Reason.BOUGHT_BEFORE:
        primary = "you bought this before"
    elif reason == Reason.SEEN_BEFORE:
        primary = "you viewed this before"
    elif reason == Reason.SIMILAR:
        primary = f"similar to {source}" if source else "matches your taste"
    elif reason == Reason.POPULAR or (reason == Reason.NONE and trending):
        primary = "trending"
    else:
        primary = "picked for you"
    if primary != "trending" and trending:
        return (primary, "trending")
    return (primary,)


def build_request(
    triggers: Sequence[ShopEvent],
    users: Sequence[UserContext],
    trending: dict[str, float],
    table: ItemTable,
    policy: RecommendPolicy,
) -> RecommendRequest:
    """The micro-batch's users as arrays of item numbers, each source list ranked."""
    b = len(triggers)
    number = table.rows

    def rows(lists: Sequence[Sequence[str]], scores: Sequence[Sequence[float]]) -> tuple[I32, F32]:
        """-1-padded item numbers and their values, one row per list."""
        width = max(1, max((len(x) for x in lists), default=0))
        nums = np.full((len(lists), width), -1, np.int32)
        vals = np.zeros((len(lists), width), np.float32)
        flat = number([i for x in lists for i in x])
        start = 0
        for r, (x, s) in enumerate(zip(lists, scores, strict=True)):
            nums[r, : len(x)] = flat[start : start + len(x)]
            vals[r, : len(x)] = s
            start += len(x)
        return nums, vals

    hist = [u.history[: policy.history_len] for u in users]
    history, ages = rows(
        [[h.item_id for h in x] for x in hist],
        [[(t.ts - h.ts) / 1000.0 for h in x] for t, x in zip(triggers, hist, strict=True)],
    )
    types = np.zeros(history.shape, np.int32)
    for r, x in enumerate(hist):
        types[r, : len(x)] = [event_code(h.type) for h in x]
    memory, memory_count = rows(
        [list(u.memory) for u in users], [list(u.memory.values()) for u in users]
    )
    covis_ids = [ranked(u.covis) for u in users]
    covis, covis_score = rows(
        covis_ids, [[u.covis[i] for i in x] for u, x in zip(users, covis_ids, strict=True)]
    )
    covis_source, _ = rows(
        [[u.covis_source.get(i, "") for i in x] for u, x in zip(users, covis_ids, strict=True)],
        [[0.0] * len(x) for x in covis_ids],
    )
    bought_ids = [ranked(u.bought_with)[: policy.complements] for u in users]
    bought_with, bought_with_score = rows(
        bought_ids,
        [[u.bought_with[i] for i in x] for u, x in zip(users, bought_ids, strict=True)],
    )
    bought_with_source, _ = rows(
        [[u.bought_with_source[i] for i in x] for u, x in zip(users, bought_ids, strict=True)],
        [[0.0] * len(x) for x in bought_ids],
    )
    cat_ids = [ranked(u.category_trending) for u in users]
    category, category_score = rows(
        cat_ids, [[u.category_trending[i] for i in x] for u, x in zip(users, cat_ids, strict=True)]
    )
    shop = ranked(trending)
    trend, trend_score = rows([shop], [[trending[i] for i in shop]])
    return RecommendRequest(
        user_emb=np.stack([u.embedding for u in users]).astype(np.float32),
        query_emb=np.stack([u.query for u in users]).astype(np.float32),
        history=history,
        history_types=types,
        history_age_s=ages,
        memory=memory,
        memory_count=memory_count,
        covis=covis,
        covis_score=covis_score,
        covis_source=covis_source,
        bought_with=bought_with,
        bought_with_score=bought_with_score,
        bought_with_source=bought_with_source,
        category=category,
        category_score=category_score,
        trending=np.repeat(trend, b, axis=0),
        trending_score=np.repeat(trend_score, b, axis=0),
        in_view=number([t.item_id or "" for t in triggers]).astype(np.int32)[:, None],
        search=np.array([[t.type == "search"] for t in triggers], np.int32),
        list_size=np.tile(np.array([[policy.top_k, policy.n_candidates]], np.int32), (b, 1)),
    )
