"""Recommend: for the users an event batch triggered, retrieve, rank on Triton, explain.

One call handles every triggered user of a micro-batch: one Redis read
pipeline, one exact nearest-neighbour product over the item table, and one
batched ranker call (split by the client into Triton's max batch size).
When the ranker fails, the same candidates are ordered by their retrieval
signals and the output says ``"degraded": true``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from redis.asyncio import Redis

from features.candidates import Candidates, mix_candidates, semantic_neighbours
from features.catalog import item_titles
from features.store import FeatureStore, UserContext
from ranking.client import RankBatch, RankerClient, Reason
from shoprec.errors import RankerUnavailable
from shoprec.events import ShopEvent, event_code
from shoprec.output import RecItem, Recommendation
from streams.protocols import ItemTableView

log = logging.getLogger("shoprec.recommend")

FALLBACK_MODEL = "retrieval@fallback"


@dataclass(frozen=True, slots=True)
class RecommendPolicy:
    top_k: int
    n_candidates: int
    history_len: int


@dataclass(frozen=True, slots=True)
class Scored:
    scores: npt.NDArray[np.float32]  # [B, N]
    reasons: npt.NDArray[np.int32]  # [B, N], ranking.fusion.Reason codes
    history_match: npt.NDArray[np.int32]  # [B, N], history index behind "similar to", -1
    model: str
    degraded: bool


class Recommender:
    def __init__(
        self,
        store: FeatureStore,
        redis: Redis,
        items: ItemTableView,
        ranker: RankerClient,
        policy: RecommendPolicy,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._store = store
        self._redis = redis
        self._items = items
        self._ranker = ranker
        self._policy = policy
        self._clock_ms = clock_ms
        self.stage_ms: dict[str, float] = {}
        """Milliseconds each stage of the last call took (for the stats and benchmarks)."""

    async def recommend(self, triggers: Sequence[ShopEvent]) -> list[Recommendation]:
        if not triggers:
            self.stage_ms = {}
            return []
        t0 = time.perf_counter()
        ctx = await self._store.read_context(
            (t.user_id for t in triggers), {t.user_id: t.ts for t in triggers}
        )
        t1 = time.perf_counter()
        users = [ctx.users[t.user_id] for t in triggers]
        candidates = self._retrieve(triggers, users, ctx.trending)
        t2 = time.perf_counter()
        scored = await self._score(triggers, users, candidates)
        t3 = time.perf_counter()
        recs = await self._assemble(triggers, users, candidates, scored)
        t4 = time.perf_counter()
        self.stage_ms = {
            "redis_read": (t1 - t0) * 1000,
            "retrieval": (t2 - t1) * 1000,
            "ranker": (t3 - t2) * 1000,
            "assemble": (t4 - t3) * 1000,
        }
        return recs

    def _retrieve(
        self,
        triggers: Sequence[ShopEvent],
        users: Sequence[UserContext],
        trending: dict[str, float],
    ) -> list[Candidates]:
        k = self._policy.n_candidates // 2
        by_user = semantic_neighbours(self._items, np.stack([u.embedding for u in users]), k)
        by_query = semantic_neighbours(self._items, np.stack([u.query for u in users]), k // 2)
        out = []
        for t, u, near_user, near_query in zip(triggers, users, by_user, by_query, strict=True):
            semantic = _interleave(near_query, near_user) if t.type == "search" else near_user
            out.append(
                mix_candidates(
                    u, semantic, trending, self._items, t.item_id, self._policy.n_candidates
                )
            )
        return out

    async def _score(
        self,
        triggers: Sequence[ShopEvent],
        users: Sequence[UserContext],
        candidates: Sequence[Candidates],
    ) -> Scored:
        batch = self._rank_batch(triggers, users, candidates)
        try:
            result = await self._ranker.rank(batch)
        except RankerUnavailable as exc:
            log.warning("ranker unavailable, serving retrieval order: %s", exc)
            return _fallback_scores(batch)
        return Scored(
            scores=result.scores,
            reasons=result.reasons,
            history_match=result.history_match,
            model=f"{self._ranker.ranker_model}@{result.model_version}",
            degraded=False,
        )

    def _rank_batch(
        self,
        triggers: Sequence[ShopEvent],
        users: Sequence[UserContext],
        candidates: Sequence[Candidates],
    ) -> RankBatch:
        h, n = self._policy.history_len, self._policy.n_candidates
        b = len(triggers)
        batch = RankBatch.empty(b, h, n)
        for row, (t, u, c) in enumerate(zip(triggers, users, candidates, strict=True)):
            batch.user_emb[row] = u.embedding
            batch.query_emb[row] = u.query
            for j, entry in enumerate(u.history[:h]):
                batch.history_ids[row, j] = entry.item_id
                batch.history_types[row, j] = event_code(entry.type)
                batch.history_age_s[row, j] = max(0.0, (t.ts - entry.ts) / 1000.0)
            m = len(c.item_ids)
            batch.candidate_ids[row, :m] = c.item_ids
            batch.signals[row, :m] = c.signals()
        return batch

    async def _assemble(
        self,
        triggers: Sequence[ShopEvent],
        users: Sequence[UserContext],
        candidates: Sequence[Candidates],
        scored: Scored,
    ) -> list[Recommendation]:
        picks: list[list[_Pick]] = []
        for row, (u, c) in enumerate(zip(users, candidates, strict=True)):
            m = len(c.item_ids)
            order = np.argsort(-scored.scores[row, :m], kind="stable")[: self._policy.top_k]
            picks.append([_pick(u, c, scored, row, int(j)) for j in order])
        sources = sorted({p.source for ps in picks for p in ps if p.source})
        names = await item_titles(self._redis, sources)
        now = self._clock_ms()
        return [
            Recommendation(
                user_id=t.user_id,
                items=tuple(RecItem(p.item_id, p.score, p.reasons(names)) for p in ps),
                model=scored.model,
                trigger_event_id=t.event_id,
                trigger_type=t.type,
                trigger_ts=t.ts,
                emitted_ts=now,
                degraded=scored.degraded,
            )
            for t, ps in zip(triggers, picks, strict=True)
        ]


@dataclass(frozen=True, slots=True)
class _Pick:
    """One recommended item with what explains it."""

    item_id: str
    score: float
    reason: Reason
    source: str | None  # the user's item behind "similar to" / "seen together with"
    trending: bool

    def reasons(self, names: dict[str, str]) -> tuple[str, ...]:
        """The ranker's reason in words a shopper understands, plus "trending" if it is."""
        src = names.get(self.source, self.source) if self.source else None
        if self.reason == Reason.QUERY:
            primary = "matches your search"
        elif self.reason == Reason.COVISIT and src:
            primary = f"often seen together with {src}"
        elif self.reason == Reason.SIMILAR:
            primary = f"similar to {src}" if src else "matches your taste"
        elif self.reason == Reason.POPULAR or (self.reason == Reason.NONE and self.trending):
            primary = "trending"
        else:
            primary = "picked for you"
        if primary != "trending" and self.trending:
            return (primary, "trending")
        return (primary,)


def _pick(user: UserContext, cands: Candidates, scored: Scored, row: int, j: int) -> _Pick:
    item = cands.item_ids[j]
    reason = Reason(int(scored.reasons[row, j]))
    source: str | None = None
    if reason == Reason.COVISIT:
        source = user.covis_source.get(item)
    elif reason == Reason.SIMILAR:
        h = int(scored.history_match[row, j])
        source = user.history[h].item_id if 0 <= h < len(user.history) else None
    return _Pick(item, float(scored.scores[row, j]), reason, source, cands.popularity[j] > 0)


def _interleave(
    first: Sequence[tuple[str, float]], second: Sequence[tuple[str, float]]
) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for pair in (p for two in zip(first, second, strict=False) for p in two):
        if pair[0] not in seen:
            seen.add(pair[0])
            out.append(pair)
    for pair in [*first[len(second) :], *second[len(first) :]]:
        if pair[0] not in seen:
            seen.add(pair[0])
            out.append(pair)
    return out


def _fallback_scores(batch: RankBatch) -> Scored:
    """Order by retrieval signals alone: cosine, then co-visitation, then popularity."""
    covis, pop, retrieval = (batch.signals[..., i] for i in range(3))
    scores = retrieval + 0.5 * np.tanh(np.log1p(covis)) + 0.25 * np.tanh(np.log1p(pop) / 3)
    padding = batch.candidate_ids == ""
    scores = np.where(padding, -np.inf, scores).astype(np.float32)
    reasons = np.where(
        retrieval > 0, Reason.SIMILAR, np.where(covis > 0, Reason.COVISIT, Reason.POPULAR)
    ).astype(np.int32)
    no_match = np.full(reasons.shape, -1, dtype=np.int32)
    return Scored(scores, reasons, no_match, model=FALLBACK_MODEL, degraded=True)
