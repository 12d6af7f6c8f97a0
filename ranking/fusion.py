"""The fused ranker's scoring maths: fixed, documented weights over a batch of users.

This is the first honest ranker, not a learned one: every term is a signal
DESIGN §6 names, and the weights are hand-set in :class:`FusionWeights`.  A
trained model (history transformer with target attention + fusion head)
replaces :func:`fused_scores` later behind the same Triton interface.

Per user ``b`` and candidate ``n`` (all embeddings unit length):

    score = w_user    · cos(user, c)
          + w_query   · cos(query, c)
          + w_history · max_h [ type_w(h) · 0.5^(age_h / half_life) · max(cos(h, c), 0) ]
          + w_covis   · squash(covis,  covis_half)
          + w_pop     · squash(pop,    pop_half)
          + w_retrieval · retrieval
    squash(x, k) = log1p(x) / (log1p(x) + log1p(k))      in [0, 1), 1/2 at x = k

A zero user or query vector (unknown user, no search) gives cosine 0, the
neutral value, as does a candidate without a text embedding; such items still
rank by co-visitation and popularity.  Padding candidates score ``PAD_SCORE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from features.item_table import ItemTable
from shoprec.events import EventType

if TYPE_CHECKING:  # the pipeline imports Reason from here
    from features.candidates import Mixed
    from ranking.pipeline import ComplementOrder, RecommendRequest

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
Bools = npt.NDArray[np.bool_]

PAD_SCORE = float("-inf")
"""Score of padding candidates: sorts last under any ordering and is unmistakable
(``np.isfinite`` tells it apart); never add or multiply it, filter it first."""


class Reason(IntEnum):
    """``REASONS`` codes: the term group that contributed most to a candidate's score."""

    PAD = -1
    """A padding candidate."""
    SIMILAR = 0
    """Similar to the user's taste or recent items (user, history and retrieval cosines)."""
    QUERY = 1
    """Matches the last search query."""
    COVISIT = 2
    """Often viewed or bought together with the user's recent items."""
    POPULAR = 3
    """Trending: many recent events."""
    NONE = 4
    """No term contributed positively: nothing to explain."""
    BOUGHT_WITH = 5
    """After a purchase: often bought together with an item of the basket (co-purchase)."""
    SEEN_BEFORE = 6
    """The customer viewed, clicked or carted this item before (it is in their history), or
    it is in the memory of their whole past, which keeps no event types."""
    BOUGHT_BEFORE = 7
    """The customer bought this item before (a purchase of it is in their history)."""


@dataclass(frozen=True)
class FusionWeights:
    """Hand-set weights of the fixed fusion, until a trained ranker replaces them.

    Magnitudes are chosen so each term lives on a comparable [0, 1]-ish scale:
    MiniLM cosines between unrelated products sit near 0.0-0.2 and between
    closely related ones near 0.5-0.8; both squashes are in [0, 1).

    * ``user = 1.0`` -- the rolling embedding summarises the user's taste over
      days; the main semantic signal and the reference the others are scaled to.
    * ``query = 1.0`` -- a search is explicit intent, as strong as long-term
      taste; the worker sends zeros once the query is stale.
    * ``history = 0.8`` -- nearness to one recent item captures the current
      session; a max over items, not a mean, so one strong signal counts.
      Slightly below ``user`` because the max of many cosines is biased upward.
    * ``covis = 1.0``, ``covis_half = 3`` -- co-visitation is the strongest
      single behavioural predictor in session recommendation (item-kNN
      baselines are hard to beat); three co-visits give half its weight.
    * ``popularity = 0.3``, ``pop_half = 20`` -- a tie-breaker and the
      cold-start fallback, small so trending items do not drown personalisation.
    * ``retrieval = 0.25`` -- the ANN cosine mostly repeats ``cos(user, c)``;
      a small bonus keeps the signal in the interface for the learned model.
    * ``type_weights`` -- purchase > cart > click > view, as in the rolling
      embedding (DESIGN §5); a searched item (rare: searches carry no item)
      counts like a click.  Index = :class:`EventType` code.
    * ``history_half_life_s = 1800`` -- session-scale intent fades within the
      hour; older history still shapes the user embedding.
    """

    user: float = 1.0
    query: float = 1.0
    history: float = 0.8
    covis: float = 1.0
    popularity: float = 0.3
    retrieval: float = 0.25
    covis_half: float = 3.0
    pop_half: float = 20.0
    type_weights: tuple[float, ...] = (0.0, 0.5, 0.7, 0.9, 1.0, 0.7)
    history_half_life_s: float = 1800.0

    def __post_init__(self) -> None:
        if len(self.type_weights) != len(EventType):
            raise ValueError(f"type_weights needs {len(EventType)} entries (one per EventType)")
        if self.covis_half <= 0 or self.pop_half <= 0 or self.history_half_life_s <= 0:
            raise ValueError("covis_half, pop_half and history_half_life_s must be > 0")


DEFAULT_WEIGHTS = FusionWeights()


def _unit(x: F32) -> F32:
    """Rows scaled to unit length; zero rows stay zero (cosine 0 = no information)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    out: F32 = x / np.maximum(norm, np.float32(1e-12))
    return out


def _squash(x: F32, half: float) -> F32:
    z = np.log1p(np.maximum(x, np.float32(0.0)))
    out: F32 = z / (z + np.float32(np.log1p(half)))
    return out


def fused_scores(
    user_emb: F32,
    query_emb: F32,
    hist_embs: F32,
    hist_mask: Bools,
    hist_types: I32,
    hist_age_s: F32,
    cand_embs: F32,
    cand_has_emb: Bools,
    signals: F32,
    cand_mask: Bools,
    weights: FusionWeights = DEFAULT_WEIGHTS,
) -> tuple[F32, I32, I32]:
    """Score ``N`` candidates for each of ``B`` users.

    Shapes: ``user_emb``, ``query_emb`` ``[B, D]``; ``hist_*`` ``[B, H(, D)]``;
    ``cand_embs`` ``[B, N, D]``; ``cand_has_emb``, ``cand_mask`` ``[B, N]``;
    ``signals`` ``[B, N, 3]`` = (co-visitation count, popularity count,
    retrieval cosine).  ``H`` may be 0.  Item rows (``hist_embs``,
    ``cand_embs``) must be unit length or zero, as :meth:`ItemTable.lookup`
    returns them; user and query vectors are normalised here.

    Returns ``(scores [B, N] float32, reasons [B, N] int32, history_match [B, N] int32)``:
    ``reasons`` holds :class:`Reason` codes; ``history_match`` is the index
    into the history of the item that made the history term (the "similar to
    <item>" of an explanation), -1 when no history item contributed.
    Padding candidates get ``PAD_SCORE``, ``Reason.PAD`` and -1.
    """
    b, n = cand_mask.shape
    h = hist_mask.shape[1]
    if signals.shape != (b, n, 3):
        raise ValueError(f"signals must have shape ({b}, {n}, 3), got {signals.shape}")
    if not (hist_types.shape == hist_age_s.shape == (b, h)):
        raise ValueError("hist_mask, hist_types and hist_age_s must share one [B, H] shape")
    w = weights
    f32 = np.float32
    # Item rows come unit-length from ItemTable; normalising 3,200 rows again
    # would cost ~1 ms per B=32 batch on these CPUs.
    cand = cand_embs.astype(f32, copy=False) * cand_has_emb[..., None]

    cos_user = np.matmul(cand, _unit(user_emb.astype(f32, copy=False))[:, :, None])[..., 0]
    cos_query = np.matmul(cand, _unit(query_emb.astype(f32, copy=False))[:, :, None])[..., 0]

    if h:
        type_w = np.asarray(w.type_weights, dtype=f32)[np.clip(hist_types, 0, len(EventType) - 1)]
        age = np.maximum(hist_age_s.astype(f32, copy=False), f32(0.0))
        decay = np.exp2(-age / f32(w.history_half_life_s)).astype(f32)
        hist_w = type_w * decay * hist_mask
        sims = np.matmul(cand, hist_embs.astype(f32, copy=False).transpose(0, 2, 1))
        weighted = np.maximum(sims, f32(0.0)) * hist_w[:, None, :]
        best = weighted.argmax(axis=2).astype(np.int32)
        hist_term = np.take_along_axis(weighted, best[..., None], axis=2)[..., 0]
        history_match = np.where(hist_term > 0, best, np.int32(-1)).astype(np.int32)
    else:
        hist_term = np.zeros((b, n), f32)
        history_match = np.full((b, n), -1, np.int32)

    covis = _squash(signals[..., 0].astype(f32, copy=False), w.covis_half)
    pop = _squash(signals[..., 1].astype(f32, copy=False), w.pop_half)
    retrieval = np.clip(signals[..., 2], -1.0, 1.0).astype(f32, copy=False)

    groups = np.stack(
        [
            f32(w.user) * cos_user + f32(w.history) * hist_term + f32(w.retrieval) * retrieval,
            f32(w.query) * cos_query,
            f32(w.covis) * covis,
            f32(w.popularity) * pop,
        ],
        axis=-1,
    )
    scores = groups.sum(axis=-1, dtype=f32)
    reasons = groups.argmax(axis=-1).astype(np.int32)
    reasons[groups.max(axis=-1) <= 0] = Reason.NONE

    scores[~cand_mask] = PAD_SCORE
    reasons[~cand_mask] = Reason.PAD
    history_match[~cand_mask] = -1
    return scores.astype(f32, copy=False), reasons, history_match


# --- scoring a micro-batch's candidates ----------------------------------------------


def fusion_inputs(
    history: npt.NDArray[np.int64],
    history_types: I32,
    items: npt.NDArray[np.int64],
    table: ItemTable,
) -> tuple[F32, Bools, F32, Bools]:
    """Text rows of the history ``[B, H]`` and of ``items`` ``[B, N]`` (item numbers) with
    their masks, as :func:`fused_scores` takes them."""
    hist_embs, hist_has = table.text(history)
    cand_embs, cand_has = table.text(items)
    return hist_embs, hist_has & (history_types > 0), cand_embs, cand_has


def explain(
    request: RecommendRequest, items: npt.NDArray[np.int64], signals: F32, table: ItemTable
) -> tuple[I32, I32]:
    """Reason codes and history matches of ``items`` ``[B, k]``: the term group that
    contributed most to each under :data:`DEFAULT_WEIGHTS` (every ``fused_ranker`` version
    explains this way, so a reason keeps its meaning when the scoring changes)."""
    history = request.history.astype(np.int64)
    hist_embs, hist_mask, cand_embs, cand_has = fusion_inputs(
        history, request.history_types, items, table
    )
    _, reasons, match = fused_scores(
        request.user_emb,
        request.query_emb,
        hist_embs,
        hist_mask,
        request.history_types,
        request.history_age_s,
        cand_embs,
        cand_has,
        signals,
        items >= 0,
    )
    return reasons, match


class FusionScorer:
    """``fused_ranker`` v1: :func:`fused_scores` with fixed weights, as a pipeline scorer."""

    complements: int | None = None
    complement_order: ComplementOrder = "co-purchase"

    def __init__(self, weights: FusionWeights = DEFAULT_WEIGHTS) -> None:
        self.weights = weights

    def sync(self, table: ItemTable, changed: npt.NDArray[np.int64]) -> int:
        return 0  # nothing derived: the formula reads the table directly

    def score(self, request: RecommendRequest, cands: Mixed, table: ItemTable) -> F32:
        history = request.history.astype(np.int64)
        hist_embs, hist_mask, cand_embs, cand_has = fusion_inputs(
            history, request.history_types, cands.items, table
        )
        scores, _, _ = fused_scores(
            request.user_emb,
            request.query_emb,
            hist_embs,
            hist_mask,
            request.history_types,
            request.history_age_s,
            cand_embs,
            cand_has,
            cands.signals,
            cands.items >= 0,
            self.weights,
        )
        return scores

    def explain(
        self,
        request: RecommendRequest,
        items: npt.NDArray[np.int64],
        signals: F32,
        table: ItemTable,
    ) -> tuple[I32, I32]:
        return explain(request, items, signals, table)
