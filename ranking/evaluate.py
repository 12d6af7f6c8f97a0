"""Ranking metrics over the full catalogue, and the evaluation of every model on one dataset.

For a query (a user right after a trigger event) every item of the next event group is
one positive.  It is ranked against *every* item the worker could show that user --
the whole catalogue minus the items it never shows (bought recently, the item in view)
and minus the group's other positives -- not against a hundred sampled negatives.
A positive the worker could never show is not counted (``skipped`` in the report).
Ties count half (the expected rank under random tie-breaking), so a model that gives
many items the same score gains nothing from the catalogue order.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from ranking.data import Dataset, Period, Query, sample_positions
from ranking.pipeline import ComplementOrder, by_score, turns

F32 = npt.NDArray[np.float32]
K = 10
F64 = npt.NDArray[np.float64]
Scorer = Callable[[Sequence[Query]], F32]
"""Scores ``[len(queries), n_items]`` for a batch of queries; higher is better."""


View = Callable[[F32, Sequence[Query]], F32]
"""One way to serve a scorer: its scores for a batch of queries -> the scores the served
order ranks by (:func:`evaluate_views` scores once and ranks by several)."""

Where = Callable[[Query], bool]
"""Which queries a view is judged on."""


def as_scored(scores: F32, queries: Sequence[Query]) -> F32:
    """The scorer's own order."""
    return scores


def with_complements(n: int, order: ComplementOrder = "co-purchase") -> View:
    """A scorer as the worker serves it after a purchase: the first ``n`` complements of
    each query that it may show (``Query.bought_with``, none blocked) take turns with the
    scorer's picks in ``order`` (``ranking.pipeline.turns``, ``by_score``).  The scores are
    minus each item's place in that list, so the evaluation ranks by the served order;
    ``n`` = 0 is the scorer's own order with ties broken by item, as served."""

    def view(scores: F32, queries: Sequence[Query]) -> F32:
        rank = np.full(scores.shape, -1, np.int64)
        for r, q in enumerate(queries):
            hidden = q.blocked()
            picks = [i for i in q.bought_with.tolist() if i not in hidden][:n]
            rank[r, picks] = np.arange(len(picks))
        if order == "ranker":
            rank = by_score(scores, rank)
        out: F32 = (-turns(scores, rank)).astype(np.float32)
        return out

    return view


def served_with_complements(
    scorer: Scorer, n: int, order: ComplementOrder = "co-purchase"
) -> Scorer:
    """``scorer`` served :func:`with_complements` ``n`` in ``order``."""
    view = with_complements(n, order)
    return lambda queries: view(scorer(queries), queries)


BOOTSTRAP_DRAWS = 2000
"""Bootstrap samples behind every confidence interval."""


@dataclass
class Metrics:
    hr: float = 0.0
    ndcg: float = 0.0
    mrr: float = 0.0
    n: int = 0
    skipped: int = 0
    ranks: list[float] = field(default_factory=list, repr=False)
    users: list[int] = field(default_factory=list, repr=False)
    """The user of each rank: confidence intervals resample users, not positives."""

    def add(self, rank: float, user: int = -1) -> None:
        self.ranks.append(rank)
        self.users.append(user)

    @classmethod
    def pooled(cls, parts: Sequence[Metrics]) -> Metrics:
        """One evaluation of every part's positives (rolling origins: one per origin).

        A user keeps one number across the parts, so the intervals resample each user with
        all their positives from every origin.
        """
        out = cls(skipped=sum(p.skipped for p in parts))
        for p in parts:
            out.ranks.extend(p.ranks)
            out.users.extend(p.users)
        return out.finish()

    def finish(self) -> Metrics:
        r = np.asarray(self.ranks, dtype=np.float64)
        self.n = int(r.size)
        if r.size:
            self.hr = float((r <= K).mean())
            self.ndcg = float(ndcg_gains(r).mean())
            self.mrr = float((1.0 / r).mean())
        return self

    def per_user(self) -> tuple[npt.NDArray[np.int64], F64, F64]:
        """Users, the sum of their positives' NDCG@10 gains, and how many positives each has."""
        users, inverse = np.unique(np.asarray(self.users, np.int64), return_inverse=True)
        gains = np.bincount(inverse, weights=ndcg_gains(np.asarray(self.ranks))).astype(np.float64)
        counts = np.bincount(inverse).astype(np.float64)
        return users, gains, counts

    def ci(self, level: float = 0.95, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> Interval:
        """Bootstrap interval of NDCG@10 over users (each draw resamples the test users)."""
        _, gains, counts = self.per_user()
        return Interval.of(self.ndcg, _resampled(gains, counts, draws, seed), level)

    def hr_ci(self, level: float = 0.95, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> Interval:
        """Bootstrap interval of HR@10 over users, as :meth:`ci` for NDCG@10."""
        _, inverse = np.unique(np.asarray(self.users, np.int64), return_inverse=True)
        hit = (np.asarray(self.ranks) <= K).astype(np.float64)
        hits = np.bincount(inverse, weights=hit).astype(np.float64)
        counts = np.bincount(inverse).astype(np.float64)
        return Interval.of(self.hr, _resampled(hits, counts, draws, seed), level)

    def to_json(self) -> dict[str, Any]:
        lo, hi = self.ci().bounds if self.n else (0.0, 0.0)
        return {
            f"hr@{K}": round(self.hr, 4),
            f"ndcg@{K}": round(self.ndcg, 4),
            f"ndcg@{K}_ci95": [round(lo, 4), round(hi, 4)],
            "mrr": round(self.mrr, 4),
            "n": self.n,
            "users": len(set(self.users)),
        }


def ndcg_gains(ranks: npt.NDArray[np.float64]) -> F64:
    """NDCG@10 of each positive from its (expected) rank: one relevant item per list."""
    out: F64 = np.where(ranks <= K, 1.0 / np.log2(ranks + 1.0), 0.0)
    return out


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap percentile interval."""

    value: float
    lo: float
    hi: float
    level: float

    @property
    def bounds(self) -> tuple[float, float]:
        return self.lo, self.hi

    @classmethod
    def of(cls, value: float, draws: F64, level: float) -> Interval:
        tail = 100.0 * (1.0 - level) / 2.0
        lo, hi = np.percentile(draws, [tail, 100.0 - tail]) if draws.size else (value, value)
        return cls(value, float(lo), float(hi), level)

    def to_json(self) -> dict[str, Any]:
        return {"value": round(self.value, 4), "ci95": [round(self.lo, 4), round(self.hi, 4)]}


def _weights(n_users: int, draws: int, seed: int) -> npt.NDArray[np.int64]:
    """``[draws, n_users]``: how often each user is drawn in each bootstrap sample."""
    rng = np.random.default_rng(seed)
    out: npt.NDArray[np.int64] = rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), draws)
    return out


def _resampled(gains: F64, counts: F64, draws: int, seed: int) -> F64:
    if gains.size == 0:
        return np.zeros(0)
    w = _weights(gains.size, draws, seed)
    out: F64 = (w @ gains) / np.maximum(w @ counts, 1.0)
    return out


def paired_difference(
    a: Metrics, b: Metrics, level: float = 0.95, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> Interval:
    """NDCG@10 of ``a`` minus ``b`` on the same positives, with a bootstrap interval that
    resamples users once for both (so what the two share cancels)."""
    if a.users != b.users:
        raise ValueError("paired_difference needs two evaluations of the same positives")
    _, gains_a, counts = a.per_user()
    _, gains_b, _ = b.per_user()
    return _paired(gains_a, gains_b, counts, level, draws, seed)


def _paired(
    gains_a: F64, gains_b: F64, counts: F64, level: float, draws: int, seed: int
) -> Interval:
    total = float(counts.sum())
    value = float((gains_a - gains_b).sum()) / total if total else 0.0
    if gains_a.size == 0:
        return Interval(value, value, value, level)
    w = _weights(gains_a.size, draws, seed)
    return Interval.of(value, (w @ (gains_a - gains_b)) / np.maximum(w @ counts, 1.0), level)


def ranks_for_query(scores: F32, query: Query) -> list[float]:
    """Expected rank of each showable positive among the showable non-positive items."""
    blocked = query.blocked()
    positives = [t for t in query.targets if t not in blocked]
    if not positives:
        return []
    allowed = np.ones(scores.shape[0], dtype=np.bool_)
    allowed[list(blocked)] = False
    allowed[query.targets] = False
    pool = np.sort(scores[allowed])
    out: list[float] = []
    for p in positives:
        s = scores[p]
        lo = int(np.searchsorted(pool, s, side="left"))
        hi = int(np.searchsorted(pool, s, side="right"))
        greater, ties = pool.size - hi, hi - lo
        out.append(1.0 + greater + ties / 2.0)
    return out


def evaluate_scorer(
    scorer: Scorer,
    queries: Sequence[Query],
    *,
    batch: int = 16,
    desc: str = "evaluate",
    progress: bool = True,
) -> Metrics:
    views: dict[str, tuple[View, Where | None]] = {"": (as_scored, None)}
    return evaluate_views(scorer, queries, views, batch=batch, desc=desc, progress=progress)[""]


def evaluate_views(
    scorer: Scorer,
    queries: Sequence[Query],
    views: Mapping[str, tuple[View, Where | None]],
    *,
    batch: int = 16,
    desc: str = "evaluate",
    progress: bool = False,
) -> dict[str, Metrics]:
    """Each view's metrics (on the queries its ``Where`` keeps; None: all) from one pass of
    the scorer: a model's forward passes are most of a judgement's time, and one ranking
    served several ways (its own order, with and without complements) needs them once."""
    out = {name: Metrics() for name in views}
    for s in tqdm(range(0, len(queries), batch), desc=desc, disable=not progress, leave=False):
        part = queries[s : s + batch]
        scores = scorer(part)
        for name, (view, where) in views.items():
            rows = [r for r, q in enumerate(part) if where is None or where(q)]
            if not rows:
                continue
            kept = part if len(rows) == len(part) else [part[r] for r in rows]
            served = view(scores if len(rows) == len(part) else scores[rows], kept)
            m = out[name]
            for row, q in enumerate(kept):
                ranks = ranks_for_query(served[row], q)
                m.skipped += len(q.targets) - len(ranks)
                for r in ranks:
                    m.add(r, q.user)
    return {name: m.finish() for name, m in out.items()}


def sample_queries(queries: Sequence[Query], limit: int | None, seed: int) -> list[Query]:
    """At most ``limit`` queries, a fixed random sample (all when ``limit`` is None)."""
    return [queries[i] for i in sample_positions(len(queries), limit, seed)]


def split_of(dataset: Dataset) -> dict[str, int]:
    """Where ``dataset``'s periods start and its last event's time (ms), and its test
    queries (all, before sampling)."""
    return {
        "valid_from_ts": dataset.cut_ts[0],
        "test_from_ts": dataset.cut_ts[1],
        "test_to_ts": int(dataset.events.ts[-1]) if len(dataset.events) else dataset.cut_ts[1],
        "test_queries": len(dataset.period(Period.TEST)),
    }


def merge_report(
    path: Path,
    origins: Sequence[Dataset],
    name: str,
    metrics: Metrics,
    info: dict[str, object],
    common: dict[str, object],
) -> None:
    """Add one model's metrics to the JSON at ``path`` (created if absent), under a lock.

    ``origins``: the dataset of each rolling origin the metrics pool, the latest first
    (one for a single time split).

    Shape: ``{"dataset", "split", "origins", "models": {name: {"hr@10", "ndcg@10",
    "ndcg@10_ci95", "mrr", "n", "users"}}, "details": {name: {...}}, "per_user": {"users",
    "positives", "ndcg_sum": {name: [...]}}, "versus_fused": {name: {"value", "ci95"}},
    ...common}``: ``split`` is the latest origin's periods, ``origins`` every origin's;
    ``per_user`` keeps what the paired comparisons need, so models evaluated in separate
    processes are still compared user by user; ``versus_fused`` is fused minus each other
    model with a paired bootstrap interval over users.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = origins[0].name
    splits = [split_of(ds) for ds in origins]
    # The lock lives in the temp dir so results folders hold results only.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"shoprec-eval-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        payload: dict[str, Any] = {}
        if path.is_file():
            payload = json.loads(path.read_text())
            if payload.get("dataset") != dataset or payload.get("origins") != splits:
                payload = {}  # another dataset or other periods: nothing in it pairs up
        payload.update({"dataset": dataset, "split": splits[0], "origins": splits, **common})
        payload.setdefault("models", {})[name] = metrics.to_json()
        payload.setdefault("details", {})[name] = info
        users, gains, counts = metrics.per_user()
        per_user = payload.get("per_user", {})
        if per_user.get("users") != users.tolist() or per_user.get("positives") != counts.tolist():
            # Another test sample: earlier models' per-user sums no longer pair with these.
            per_user = {"users": users.tolist(), "positives": counts.tolist(), "ndcg_sum": {}}
        per_user["ndcg_sum"][name] = [round(float(g), 6) for g in gains]
        payload["per_user"] = per_user
        payload["versus_fused"] = _versus_fused(per_user)
        path.write_text(json.dumps(payload, indent=2) + "\n")


def _versus_fused(per_user: dict[str, Any]) -> dict[str, Any]:
    sums = per_user["ndcg_sum"]
    if "fused" not in sums:
        return {}
    counts = np.asarray(per_user["positives"], np.float64)
    fused = np.asarray(sums["fused"], np.float64)
    return {
        name: _paired(
            fused, np.asarray(other, np.float64), counts, 0.95, BOOTSTRAP_DRAWS, 0
        ).to_json()
        for name, other in sums.items()
        if name != "fused"
    }
