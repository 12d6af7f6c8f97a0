"""One call does all the math: retrieve, mix, filter, score, pick the top-K, explain.

The worker sends a :class:`RecommendRequest` per micro-batch — each user's state and
context as arrays, items named by number (``features.item_table``) — and gets a
:class:`TopK` back.  Inside Triton (``ranking.triton_model``) :func:`recommend` runs it
against the model's own item table and retrieval index; the worker runs the same function
against its own table with :class:`FallbackScorer` when Triton is down, so the degraded
lists come from the same retrieval, mixing and filters, only ordered by their retrieval
signals.

Per micro-batch of ``B`` users:

1. semantic retrieval: the ``n/2`` nearest eligible items (a vector, in stock) to each
   user's rolling embedding, and for a search the ``n/4`` nearest to the query,
   interleaved (``features.ann.TableIndex``: exact, or faiss IVF on a large catalogue);
2. mixing with quotas and filters (``features.candidates.mix``): after a purchase the
   basket's complements (co-purchase), then semantic, co-visitation, category trending,
   trending; never what the user just bought or is looking at;
3. scoring (a :class:`Scorer`: the trained ranker, or v1's fixed fusion);
4. the ``k`` best, stable on ties (retrieval order breaks them); after a purchase the
   ranker's picks and what is bought together with the basket take turns, the ranker's
   best first, the complements in co-purchase order or in the ranker's, as the version's
   learner chose (:func:`take_turns`; bench/after_purchase.py: complements are what the
   next purchase often holds);
5. the explanation of those ``k`` only: reason code ("you bought this before" / "you
   viewed this before" for an item of the user's history), and the user's item behind
   "similar to" / "often seen together with" / "often bought together with".
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from features.ann import TableIndex
from features.candidates import SOURCES, Mixed, blocked, interleave, mix
from features.item_table import ItemTable
from features.keys import EMB_DIM
from ranking.fusion import Reason
from shoprec.events import EventType

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


ComplementOrder = Literal["co-purchase", "ranker"]
"""The order the complements after a purchase take their turns in: how often each was
bought with the basket (the request's order), or the ranker's score."""
COMPLEMENT_ORDERS: tuple[ComplementOrder, ...] = ("co-purchase", "ranker")


@dataclass(frozen=True)
class RecommendRequest:
    """``B`` users' state and context; items are numbers, -1 pads a row.

    Ages are seconds from a history event back to the trigger (negative for an event
    stamped later than the trigger: arrival order is not event order).  Each source list
    (co-visitation, category trending, trending) comes ranked, best first.
    """

    user_emb: F32  # [B, D] rolling embedding, unit or zero
    query_emb: F32  # [B, D] last search query's embedding, unit or zero
    history: I32  # [B, H] newest first
    history_types: I32  # [B, H] shoprec.events.EventType codes, 0 pads
    history_age_s: F32  # [B, H]
    memory: I32  # [B, M] the user's memory of their whole past, strongest first
    memory_count: F32  # [B, M] their event counts, decayed (features.keys.user_memory)
    covis: I32  # [B, C] co-visitation neighbours of the user's latest items
    covis_score: F32  # [B, C] their decayed counts
    covis_source: I32  # [B, C] the user's item each neighbour was seen with
    bought_with: I32  # [B, P] after a purchase: co-purchases of the basket; else -1
    bought_with_score: F32  # [B, P] their decayed counts
    bought_with_source: I32  # [B, P] the basket item each was bought with
    category: I32  # [B, T] trending in the user's categories
    category_score: F32  # [B, T]
    trending: I32  # [B, G] trending in the shop
    trending_score: F32  # [B, G]
    in_view: I32  # [B, 1] the item the trigger was about, -1 for none
    search: I32  # [B, 1] 1 when the trigger is a search
    list_size: I32  # [B, 2] (k, n): items to return, candidates to score

    @property
    def size(self) -> int:
        return int(self.user_emb.shape[0])

    @property
    def k(self) -> int:
        return int(self.list_size[:, 0].max(initial=0))

    @property
    def n(self) -> int:
        return int(self.list_size[:, 1].max(initial=0))

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first broken input (shape, dtype, NaN)."""
        b = self.size
        if self.user_emb.ndim != 2 or self.query_emb.shape != self.user_emb.shape:
            raise ValueError(
                f"USER_EMB and QUERY_EMB must both be [B, D], got {self.user_emb.shape} "
                f"and {self.query_emb.shape}"
            )
        groups = (
            ("history", ("history", "history_types", "history_age_s")),
            ("memory", ("memory", "memory_count")),
            ("covis", ("covis", "covis_score", "covis_source")),
            ("bought_with", ("bought_with", "bought_with_score", "bought_with_source")),
            ("category", ("category", "category_score")),
            ("trending", ("trending", "trending_score")),
        )
        for _, names in groups:
            shape = getattr(self, names[0]).shape
            for name in names:
                arr = getattr(self, name)
                if arr.ndim != 2 or arr.shape[0] != b or arr.shape != shape:
                    raise ValueError(f"{name.upper()} must be [{b}, n] like {names[0].upper()}")
        for name in ("in_view", "search"):
            if getattr(self, name).shape != (b, 1):
                raise ValueError(f"{name.upper()} must be [{b}, 1]")
        if self.list_size.shape != (b, 2) or (b and (self.list_size < 1).any()):
            raise ValueError(f"LIST_SIZE must be [{b}, 2] of positive (k, n)")
        for f in fields(self):
            arr = getattr(self, f.name)
            want = np.float32 if f.name in _FLOATS else np.int32
            if arr.dtype != want:
                raise ValueError(f"{f.name.upper()} must be {np.dtype(want).name}, got {arr.dtype}")
            if want == np.float32 and not np.isfinite(arr).all():
                raise ValueError(f"{f.name.upper()} holds NaN or infinite values")

    def with_complements(self, n: int) -> RecommendRequest:
        """The same request with at most ``n`` complements per user: the first ``n`` of
        ``bought_with`` (best first, as requests carry them) kept, the rest padding."""
        if self.bought_with.shape[1] <= n:
            return self
        keep = slice(0, max(n, 1))  # a list input is at least one wide
        out = self.arrays() | {
            "bought_with": self.bought_with[:, keep].copy(),
            "bought_with_score": self.bought_with_score[:, keep].copy(),
            "bought_with_source": self.bought_with_source[:, keep].copy(),
        }
        if n == 0:
            out["bought_with"][:] = -1
            out["bought_with_score"][:] = 0.0
            out["bought_with_source"][:] = -1
        return RecommendRequest(**out)

    @classmethod
    def concat(cls, parts: list[RecommendRequest]) -> RecommendRequest:
        """Stack the users of several requests (Triton's dynamic batch), padding each list
        to the widest with -1 (items) and 0 (everything else)."""
        if len(parts) == 1:
            return parts[0]
        out = {}
        for f in fields(cls):
            arrays = [getattr(p, f.name) for p in parts]
            width = max(a.shape[1] for a in arrays)
            fill = -1 if f.name in _ITEM_LISTS else 0
            out[f.name] = np.concatenate(
                [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill) for a in arrays]
            )
        return cls(**out)

    def rows(self, start: int, stop: int) -> RecommendRequest:
        return RecommendRequest(**{k: v[start:stop] for k, v in self.arrays().items()})


_FLOATS = frozenset(
    {
        "user_emb",
        "query_emb",
        "history_age_s",
        "memory_count",
        "covis_score",
        "bought_with_score",
        "category_score",
        "trending_score",
    }
)
_ITEM_LISTS = frozenset(
    {
        "history",
        "memory",
        "covis",
        "covis_source",
        "bought_with",
        "bought_with_source",
        "category",
        "trending",
        "in_view",
    }
)

TRITON_INPUTS: tuple[str, ...] = tuple(f.name.upper() for f in fields(RecommendRequest))
"""The ``recommender``'s inputs in config order: each field of :class:`RecommendRequest`,
upper-cased (``USER_EMB``, ..., ``LIST_SIZE``)."""


@dataclass(frozen=True)
class TopK:
    """The answer for ``B`` users, ``[B, k]``, best first, -1 / -inf padding."""

    items: I32
    scores: F32
    reasons: I32  # ranking.fusion.Reason codes
    source_item: I32  # the user's item behind "similar to" / "seen together with", -1
    is_trending: I32  # 1 when the item is popular now (explanations add "trending")

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


TRITON_OUTPUTS: tuple[str, ...] = tuple(f.name.upper() for f in fields(TopK))


class Scorer(Protocol):
    """What orders the candidates: the trained ranker, v1's fixed fusion, or the fallback."""

    complements: int | None
    """The most complements after a purchase its lists take: a trained version's learner
    chose it on the shop's held-out events (``ops.learn.choose_complements``); None takes
    what the request carries (``SHOPREC_COMPLEMENTS_AFTER_PURCHASE``, an arm's own)."""

    complement_order: ComplementOrder
    """The order they take their turns in, chosen beside their number."""

    def sync(self, table: ItemTable, changed: I64) -> int:
        """Item numbers ``changed`` in ``table``: update what is derived from them (the
        trained ranker's item cache); returns rows recomputed."""
        ...

    def score(self, request: RecommendRequest, cands: Mixed, table: ItemTable) -> F32:
        """``[B, n]`` scores, higher is better; padding candidates ``-inf``."""
        ...

    def explain(
        self, request: RecommendRequest, items: I64, signals: F32, table: ItemTable
    ) -> tuple[I32, I32]:
        """For the chosen ``items`` ``[B, k]`` (with their ``signals`` ``[B, k, 3]``):
        ``Reason`` codes and the index into the user's history of the item behind a
        "similar to" (-1 if none)."""
        ...


def candidates(request: RecommendRequest, table: ItemTable, index: TableIndex) -> Mixed:
    """Steps 1 and 2: retrieval, mixing and filters."""
    n = request.n
    sem, sem_scores = index.search(request.user_emb, n // 2)
    searching = np.flatnonzero(
        (request.search[:, 0] > 0) & (np.linalg.norm(request.query_emb, axis=1) > 0)
    )
    if searching.size:
        near_query, near_query_scores = index.search(request.query_emb[searching], n // 4)
        mixed, mixed_scores = interleave(
            near_query, near_query_scores, sem[searching], sem_scores[searching]
        )
        width = mixed.shape[1]
        sem = np.pad(sem, ((0, 0), (0, width - sem.shape[1])), constant_values=-1)
        sem_scores = np.pad(sem_scores, ((0, 0), (0, width - sem_scores.shape[1])))
        sem[searching], sem_scores[searching] = mixed, mixed_scores
    sem_scores = np.where(sem >= 0, sem_scores, np.float32(0.0)).astype(np.float32)
    history = request.history.astype(np.int64)
    return mix(
        (
            request.bought_with.astype(np.int64),
            sem,
            request.covis.astype(np.int64),
            request.category.astype(np.int64),
            request.trending.astype(np.int64),
        ),
        (
            request.bought_with_score,
            sem_scores,
            request.covis_score,
            request.category_score,
            request.trending_score,
        ),
        table.stock(np.arange(table.size)),
        blocked(
            history,
            request.history_types,
            request.history_age_s,
            request.in_view[:, 0].astype(np.int64),
        ),
        n,
    )


def recommend(
    request: RecommendRequest, table: ItemTable, index: TableIndex, scorer: Scorer
) -> TopK:
    """All five steps for one micro-batch."""
    k = request.k
    if scorer.complements is not None:
        request = request.with_complements(scorer.complements)
    cands = candidates(request, table, index)
    scores = scorer.score(request, cands, table)
    scores = np.where(cands.items >= 0, scores, -np.inf).astype(np.float32)
    complement = cands.source == _COMPLEMENT
    order = take_turns(scores, complement, scorer.complement_order)[:, :k]
    items = np.take_along_axis(cands.items, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1)
    signals = np.take_along_axis(cands.signals, order[:, :, None], axis=1)
    real = items >= 0
    reasons, match = scorer.explain(request, items, signals, table)
    # An item of the customer's own past is explained as such, whatever term scored it:
    # "you bought this before" says more than "similar to" an item it resembles.  The
    # memory of the whole past keeps no event types: an item only there was seen before.
    mine = (items[:, :, None] == request.history[:, None, :]) & (
        request.history_types[:, None, :] > 0
    )
    remembered = (items[:, :, None] == request.memory[:, None, :]) & (
        request.memory[:, None, :] >= 0
    )
    bought = (mine & (request.history_types[:, None, :] == EventType.PURCHASE)).any(axis=-1)
    seen = mine.any(axis=-1) | remembered.any(axis=-1)
    reasons = np.where(seen, Reason.SEEN_BEFORE, reasons)
    reasons = np.where(bought, Reason.BOUGHT_BEFORE, reasons)
    placed = np.take_along_axis(complement, order, axis=1)
    reasons = np.where(placed, Reason.BOUGHT_WITH, reasons)
    reasons = np.where(real, reasons, Reason.PAD).astype(np.int32)
    source = np.full(items.shape, -1, np.int64)
    similar = real & (reasons == Reason.SIMILAR) & (match >= 0)
    source[similar] = np.take_along_axis(request.history, np.maximum(match, 0), axis=1)[similar]
    for reason, listed, behind in (
        (Reason.COVISIT, request.covis, request.covis_source),
        (Reason.BOUGHT_WITH, request.bought_with, request.bought_with_source),
    ):
        mask = real & (reasons == reason)
        if mask.any():
            source[mask] = _source_of(items, listed, behind)[mask]
    width = max(k, items.shape[1])
    pad = ((0, 0), (0, width - items.shape[1]))
    return TopK(
        items=np.pad(np.where(real, items, -1), pad, constant_values=-1).astype(np.int32),
        scores=np.pad(top_scores, pad, constant_values=-np.inf).astype(np.float32),
        reasons=np.pad(reasons, pad, constant_values=int(Reason.PAD)).astype(np.int32),
        source_item=np.pad(source, pad, constant_values=-1).astype(np.int32),
        is_trending=np.pad(real & (signals[..., 1] > 0), pad).astype(np.int32),
    )


_COMPLEMENT = SOURCES.index("complement")


def take_turns(
    scores: F32, complement: Bools, by: ComplementOrder = "co-purchase"
) -> npt.NDArray[np.int64]:
    """Column order of each row: the ranker's picks by score and the complements (in their
    mixing, that is co-purchase, order, or ``by`` the ranker's score), taking turns, the
    ranker's best first; padding last.

    Turns, not complements first: on amazon (every event a purchase) ten complements ahead
    of the ranker cost the next purchase's NDCG@10 in the learner's stream test (0.1193
    against 0.1271 without complements), while alternating keeps the ranker's best on top.
    Stable: equal scores keep retrieval order, so the same input gives the same list.
    """
    order = np.where(complement, np.cumsum(complement, axis=1) - 1, -1)
    if by == "ranker":
        order = by_score(scores, order)
    return np.argsort(turns(scores, order), axis=1, kind="stable")


def by_score(scores: F32, complement_rank: I64) -> I64:
    """The complements' ranks (``complement_rank`` 0, 1, ... in co-purchase order, -1 for
    the ranker's candidates) re-ordered by the ranker's score, co-purchase order breaking
    ties.  Which order serves a shop better differs (docs/models.md, "After a purchase"),
    so the learner chooses it per version (``ops.learn.choose_complements``)."""
    complement = complement_rank >= 0
    width = scores.shape[1]
    tie = np.where(complement, complement_rank, width).astype(np.float64)
    first = np.where(complement, -scores.astype(np.float64), np.inf)
    ranked = np.lexsort((tie, first), axis=1)
    place = np.empty_like(ranked)
    np.put_along_axis(place, ranked, np.arange(width)[None, :], axis=1)
    out: I64 = np.where(complement, place, -1).astype(np.int64)
    return out


def turns(scores: F32, complement_rank: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Each column's place in the served list (0 first, ``inf`` for padding): the
    complements (``complement_rank`` 0, 1, ... in their order; -1 for the ranker's
    candidates) take the odd places, the ranker's candidates the even ones by score.
    :func:`take_turns` sorts by it; the offline evaluation scores by it
    (``ranking.evaluate.served_with_complements``)."""
    rows, width = scores.shape
    complement = complement_rank >= 0
    rank = np.empty((rows, width), np.float64)
    by_score = np.argsort(np.where(complement, np.inf, -scores), axis=1, kind="stable")
    np.put_along_axis(rank, by_score, np.arange(width, dtype=np.float64)[None, :], axis=1)
    turn = np.where(complement, 2.0 * complement_rank + 1.0, 2.0 * rank)
    out: npt.NDArray[np.float64] = np.where(np.isneginf(scores), np.inf, turn)
    return out


def _source_of(items: I64, listed: I32, behind: I32) -> I64:
    """For each of ``items`` ``[B, k]``: ``behind[b, j]`` where ``listed[b, j]`` is that
    item (the user's item it was seen or bought with), -1 where it is not listed."""
    eq = (items[:, :, None] == listed[:, None, :]) & (listed[:, None, :] >= 0)
    found = np.take_along_axis(behind, eq.argmax(axis=-1), axis=1)
    out: I64 = np.where(eq.any(axis=-1), found, -1).astype(np.int64)
    return out


class FallbackScorer:
    """The degraded order when the ranker cannot be called: retrieval cosine, then
    co-visitation, then popularity; explained by the strongest of those."""

    complements: int | None = None
    complement_order: ComplementOrder = "co-purchase"

    def sync(self, table: ItemTable, changed: I64) -> int:
        return 0

    def score(self, request: RecommendRequest, cands: Mixed, table: ItemTable) -> F32:
        covis, pop, retrieval = (cands.signals[..., i] for i in range(3))
        out: F32 = (
            retrieval + 0.5 * np.tanh(np.log1p(covis)) + 0.25 * np.tanh(np.log1p(pop) / 3)
        ).astype(np.float32)
        return out

    def explain(
        self, request: RecommendRequest, items: I64, signals: F32, table: ItemTable
    ) -> tuple[I32, I32]:
        covis, retrieval = signals[..., 0], signals[..., 2]
        reasons = np.where(
            retrieval > 0, Reason.SIMILAR, np.where(covis > 0, Reason.COVISIT, Reason.POPULAR)
        ).astype(np.int32)
        return reasons, np.full(items.shape, -1, np.int32)


def empty_request(b: int, dim: int = EMB_DIM, *, k: int = 10, n: int = 100) -> RecommendRequest:
    """``b`` users with nothing known (warm-up, tests): every list one padding slot wide."""
    one = np.full((b, 1), -1, np.int32)
    zero = np.zeros((b, 1), np.float32)
    return RecommendRequest(
        user_emb=np.zeros((b, dim), np.float32),
        query_emb=np.zeros((b, dim), np.float32),
        history=one.copy(),
        history_types=np.zeros((b, 1), np.int32),
        history_age_s=zero.copy(),
        memory=one.copy(),
        memory_count=zero.copy(),
        covis=one.copy(),
        covis_score=zero.copy(),
        covis_source=one.copy(),
        bought_with=one.copy(),
        bought_with_score=zero.copy(),
        bought_with_source=one.copy(),
        category=one.copy(),
        category_score=zero.copy(),
        trending=one.copy(),
        trending_score=zero.copy(),
        in_view=one.copy(),
        search=np.zeros((b, 1), np.int32),
        list_size=np.tile(np.array([[k, n]], np.int32), (b, 1)),
    )
