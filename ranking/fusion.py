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

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from features.item_table import ItemTable
from features.keys import EMB_DIM
from shoprec.events import EventType

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


# --- the ranker's request contract -----------------------------------------------------

Ids = npt.NDArray[np.object_]

TRITON_INPUTS: tuple[tuple[str, str], ...] = (
    ("USER_EMB", "user_emb"),
    ("QUERY_EMB", "query_emb"),
    ("HISTORY_IDS", "history_ids"),
    ("HISTORY_TYPES", "history_types"),
    ("HISTORY_AGE_S", "history_age_s"),
    ("CANDIDATE_IDS", "candidate_ids"),
    ("SIGNALS", "signals"),
)
"""(Triton input name, :class:`RankBatch` field) of ``fused_ranker``, in config order."""

TRITON_OUTPUTS = ("SCORES", "REASONS", "HISTORY_MATCH")
N_REQUEST_SIGNALS = 3
"""Per candidate in a ranking request (``SIGNALS``): co-visitation, popularity, retrieval
cosine.  The learned model adds two of its own (``ranking.model.N_MODEL_SIGNALS``)."""


@dataclass(frozen=True)
class HistoryEvent:
    """One recent event of a user, as the ranker sees it."""

    item_id: str
    type: EventType | int
    age_s: float


@dataclass(frozen=True)
class RankRow:
    """One user's ranking request before padding (see :meth:`RankBatch.from_rows`)."""

    candidates: Sequence[str]
    signals: npt.ArrayLike
    """``[len(candidates), 3]``: co-visitation count, popularity count, retrieval cosine."""
    history: Sequence[HistoryEvent] = ()
    """Newest first."""
    user_emb: npt.ArrayLike | None = None
    query_emb: npt.ArrayLike | None = None


@dataclass(frozen=True)
class RankBatch:
    """The ranker's input for ``B`` users, padded to one ``H`` and one ``N``.

    Ids are ``object`` arrays of ``str`` (as the worker fills them) or
    ``bytes`` (as Triton delivers them); the empty id is padding.  The arrays
    are filled in place after :meth:`empty`, so nothing is checked on
    construction: :meth:`validate` is called by the client before sending
    and by the Triton model on receipt, so a malformed request is rejected
    with the same message on either side.
    """

    user_emb: F32
    query_emb: F32
    history_ids: Ids
    history_types: I32
    history_age_s: F32
    candidate_ids: Ids
    signals: F32

    @classmethod
    def empty(cls, b: int, history_len: int, n_candidates: int, dim: int = EMB_DIM) -> RankBatch:
        """All-padding arrays for ``b`` users, to be filled in place."""
        return cls(
            user_emb=np.zeros((b, dim), np.float32),
            query_emb=np.zeros((b, dim), np.float32),
            history_ids=np.full((b, history_len), "", dtype=object),
            history_types=np.zeros((b, history_len), np.int32),
            history_age_s=np.zeros((b, history_len), np.float32),
            candidate_ids=np.full((b, n_candidates), "", dtype=object),
            signals=np.zeros((b, n_candidates, N_REQUEST_SIGNALS), np.float32),
        )

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[RankRow],
        *,
        history_len: int,
        n_candidates: int,
        dim: int = EMB_DIM,
    ) -> RankBatch:
        """Pad python-level rows to fixed ``H`` and ``N`` so requests batch together on Triton.

        History longer than ``history_len`` keeps its newest events; more
        candidates than ``n_candidates`` is a caller bug and raises
        ``ValueError``.  A missing user or query embedding becomes zeros.
        """
        if history_len < 1 or n_candidates < 1:
            raise ValueError("history_len and n_candidates must be >= 1")
        batch = cls.empty(len(rows), history_len, n_candidates, dim)
        for i, row in enumerate(rows):
            if row.user_emb is not None:
                batch.user_emb[i] = np.asarray(row.user_emb, np.float32)
            if row.query_emb is not None:
                batch.query_emb[i] = np.asarray(row.query_emb, np.float32)
            for j, ev in enumerate(row.history[:history_len]):
                batch.history_ids[i, j] = ev.item_id
                batch.history_types[i, j] = int(ev.type)
                batch.history_age_s[i, j] = ev.age_s
            k = len(row.candidates)
            if k > n_candidates:
                raise ValueError(
                    f"row {i} has {k} candidates, more than n_candidates={n_candidates}"
                )
            if k:
                sig = np.asarray(row.signals, np.float32)
                if sig.shape != (k, N_REQUEST_SIGNALS):
                    raise ValueError(
                        f"row {i}: signals must be [{k}, {N_REQUEST_SIGNALS}], got {sig.shape}"
                    )
                batch.candidate_ids[i, :k] = list(row.candidates)
                batch.signals[i, :k] = sig
        return batch

    @property
    def size(self) -> int:
        """``B``, the number of users."""
        return int(self.user_emb.shape[0])

    @property
    def history_len(self) -> int:
        return int(self.history_ids.shape[1])

    @property
    def n_candidates(self) -> int:
        return int(self.candidate_ids.shape[1])

    @property
    def candidate_mask(self) -> Bools:
        """True for real candidates, False for padding."""
        return _non_empty(self.candidate_ids)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first broken input (shape, dtype, NaN)."""
        if self.user_emb.ndim != 2:
            raise ValueError(f"USER_EMB must be [B, D], got shape {self.user_emb.shape}")
        b, d = self.user_emb.shape
        if self.query_emb.shape != (b, d):
            raise ValueError(f"QUERY_EMB must have shape {(b, d)}, got {self.query_emb.shape}")
        if self.history_ids.ndim != 2 or self.history_ids.shape[0] != b:
            raise ValueError(f"HISTORY_IDS must be [{b}, H], got {self.history_ids.shape}")
        h = self.history_ids.shape[1]
        for name, arr in (
            ("HISTORY_TYPES", self.history_types),
            ("HISTORY_AGE_S", self.history_age_s),
        ):
            if arr.shape != (b, h):
                raise ValueError(
                    f"{name} must have shape {(b, h)} like HISTORY_IDS, got {arr.shape}"
                )
        if self.candidate_ids.ndim != 2 or self.candidate_ids.shape[0] != b:
            raise ValueError(f"CANDIDATE_IDS must be [{b}, N], got {self.candidate_ids.shape}")
        n = self.candidate_ids.shape[1]
        if self.signals.shape != (b, n, N_REQUEST_SIGNALS):
            raise ValueError(
                f"SIGNALS must have shape {(b, n, N_REQUEST_SIGNALS)}, got {self.signals.shape}"
            )
        for name, arr in (
            ("USER_EMB", self.user_emb),
            ("QUERY_EMB", self.query_emb),
            ("HISTORY_AGE_S", self.history_age_s),
            ("SIGNALS", self.signals),
        ):
            if arr.dtype != np.float32:
                raise ValueError(f"{name} must be float32, got {arr.dtype}")
            if not np.isfinite(arr).all():
                raise ValueError(f"{name} holds NaN or infinite values")
        if self.history_types.dtype != np.int32:
            raise ValueError(f"HISTORY_TYPES must be int32, got {self.history_types.dtype}")
        for name, ids in (("HISTORY_IDS", self.history_ids), ("CANDIDATE_IDS", self.candidate_ids)):
            if ids.dtype != np.object_ or not all(isinstance(x, str | bytes) for x in ids.flat):
                raise ValueError(f"{name} must be an object array of str or bytes")

    def rows(self, start: int, stop: int) -> RankBatch:
        """Users ``start:stop`` (views, no copies)."""
        return RankBatch(**{f: getattr(self, f)[start:stop] for _, f in TRITON_INPUTS})

    def pad_to(self, history_len: int, n_candidates: int) -> RankBatch:
        """The same batch padded (never truncated) to ``H = history_len``, ``N = n_candidates``."""
        dh, dn = history_len - self.history_len, n_candidates - self.n_candidates
        if dh < 0 or dn < 0:
            raise ValueError("pad_to cannot shrink a batch")
        if dh == dn == 0:
            return self
        return RankBatch(
            user_emb=self.user_emb,
            query_emb=self.query_emb,
            history_ids=np.pad(self.history_ids, ((0, 0), (0, dh)), constant_values=""),
            history_types=np.pad(self.history_types, ((0, 0), (0, dh))),
            history_age_s=np.pad(self.history_age_s, ((0, 0), (0, dh))),
            candidate_ids=np.pad(self.candidate_ids, ((0, 0), (0, dn)), constant_values=""),
            signals=np.pad(self.signals, ((0, 0), (0, dn), (0, 0))),
        )

    @classmethod
    def concat(cls, batches: Sequence[RankBatch]) -> RankBatch:
        """Stack users of several batches, padding all to the largest ``H`` and ``N``."""
        if not batches:
            raise ValueError("concat needs at least one batch")
        if len(batches) == 1:
            return batches[0]
        h = max(x.history_len for x in batches)
        n = max(x.n_candidates for x in batches)
        padded = [x.pad_to(h, n) for x in batches]
        return cls(**{f: np.concatenate([getattr(x, f) for x in padded]) for _, f in TRITON_INPUTS})


def _non_empty(ids: Ids) -> Bools:
    mask: Bools = (ids != "") & (ids != b"")
    return mask


@dataclass(frozen=True)
class RankOutputs:
    """Per user and candidate: ``scores`` float32, ``reasons`` and ``history_match`` int32."""

    scores: F32
    reasons: I32
    history_match: I32

    def arrays(self) -> tuple[F32, I32, I32]:
        """The outputs in :data:`TRITON_OUTPUTS` order."""
        return self.scores, self.reasons, self.history_match


def score_batch(
    batch: RankBatch, table: ItemTable, weights: FusionWeights = DEFAULT_WEIGHTS
) -> RankOutputs:
    """Look the batch's ids up in ``table`` and fuse: the whole ranker in one call.

    ``batch`` must be valid (:meth:`RankBatch.validate`).
    """
    b, h, n = batch.size, batch.history_len, batch.n_candidates
    hist_embs, hist_has = table.lookup(batch.history_ids.ravel().tolist())
    cand_embs, cand_has = table.lookup(batch.candidate_ids.ravel().tolist())
    scores, reasons, match = fused_scores(
        batch.user_emb,
        batch.query_emb,
        hist_embs.reshape(b, h, table.dim),
        hist_has.reshape(b, h) & (batch.history_types > 0),
        batch.history_types,
        batch.history_age_s,
        cand_embs.reshape(b, n, table.dim),
        cand_has.reshape(b, n),
        batch.signals,
        batch.candidate_mask,
        weights,
    )
    return RankOutputs(scores, reasons, match)
