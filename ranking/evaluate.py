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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from ranking.data import Dataset, Period, Query

F32 = npt.NDArray[np.float32]
K = 10
Scorer = Callable[[Sequence[Query]], F32]
"""Scores ``[len(queries), n_items]`` for a batch of queries; higher is better."""


@dataclass
class Metrics:
    hr: float = 0.0
    ndcg: float = 0.0
    mrr: float = 0.0
    n: int = 0
    skipped: int = 0
    ranks: list[float] = field(default_factory=list, repr=False)

    def add(self, rank: float) -> None:
        self.ranks.append(rank)

    def finish(self) -> Metrics:
        r = np.asarray(self.ranks, dtype=np.float64)
        self.n = int(r.size)
        if r.size:
            self.hr = float((r <= K).mean())
            self.ndcg = float(np.where(r <= K, 1.0 / np.log2(r + 1.0), 0.0).mean())
            self.mrr = float((1.0 / r).mean())
        return self

    def to_json(self) -> dict[str, float | int]:
        return {
            f"hr@{K}": round(self.hr, 4),
            f"ndcg@{K}": round(self.ndcg, 4),
            "mrr": round(self.mrr, 4),
            "n": self.n,
        }


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
    m = Metrics()
    for s in tqdm(range(0, len(queries), batch), desc=desc, disable=not progress, leave=False):
        part = queries[s : s + batch]
        scores = scorer(part)
        for row, q in enumerate(part):
            ranks = ranks_for_query(scores[row], q)
            m.skipped += len(q.targets) - len(ranks)
            for r in ranks:
                m.add(r)
    return m.finish()


def sample_queries(queries: Sequence[Query], limit: int | None, seed: int) -> list[Query]:
    """At most ``limit`` queries, a fixed random sample (all when ``limit`` is None)."""
    if limit is None or len(queries) <= limit:
        return list(queries)
    idx = np.random.default_rng(seed).choice(len(queries), size=limit, replace=False)
    return [queries[i] for i in sorted(idx)]


def merge_report(
    path: Path,
    dataset: Dataset,
    name: str,
    metrics: Metrics,
    info: dict[str, object],
    common: dict[str, object],
) -> None:
    """Add one model's metrics to the JSON at ``path`` (created if absent), under a lock.

    Shape: ``{"dataset", "split", "models": {name: {"hr@10", "ndcg@10", "mrr", "n"}},
    "details": {name: {...}}, ...common}``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # The lock lives in the temp dir so results folders hold results only.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"shoprec-eval-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        payload: dict[str, Any] = {}
        if path.is_file():
            payload = json.loads(path.read_text())
            if payload.get("dataset") != dataset.name:
                payload = {}
        payload.update(
            {
                "dataset": dataset.name,
                "split": {
                    "valid_from_ts": dataset.cut_ts[0],
                    "test_from_ts": dataset.cut_ts[1],
                    "test_queries": len(dataset.period(Period.TEST)),
                },
                **common,
            }
        )
        payload.setdefault("models", {})[name] = metrics.to_json()
        payload.setdefault("details", {})[name] = info
        path.write_text(json.dumps(payload, indent=2) + "\n")
