"""Candidate retrieval: mix sources with quotas, filter, and attach the ranker's signals.

Sources, each with a quota of the ``n`` candidates:
* ``semantic`` — nearest items to the rolling user embedding and to the last
  search query (exact inner product over the in-memory item table);
* ``covis`` — co-visitation neighbours of the user's latest items;
* ``trending`` — the most popular items of the trigger's hour and the one before.
Unused quota is refilled from whatever the other sources have left.

Filters: the item must be in the catalogue and in stock, not bought by the user
recently, not the item the user is looking at, and not listed twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from features.store import UserContext

SEMANTIC_SHARE = 0.5
COVIS_SHARE = 0.3


class ItemCatalog(Protocol):
    """What retrieval needs from the in-memory item table."""

    def semantic_view(self) -> tuple[npt.NDArray[np.float32], list[str]]:
        """Embeddings of eligible items (with text, in stock) and their ids."""
        ...

    def in_stock(self, item_id: str) -> bool:
        """True for a known item that can be sold now."""
        ...


@dataclass(slots=True)
class Candidates:
    """One user's candidates, in retrieval order, with the ranker's signals."""

    item_ids: list[str] = field(default_factory=list)
    covis: list[float] = field(default_factory=list)
    popularity: list[float] = field(default_factory=list)
    retrieval: list[float] = field(default_factory=list)
    source: list[str] = field(default_factory=list)

    def signals(self) -> npt.NDArray[np.float32]:
        return np.array([self.covis, self.popularity, self.retrieval], dtype=np.float32).T.reshape(
            -1, 3
        )


def nearest(
    matrix: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Top-k rows of ``matrix`` by inner product for each query row (exact)."""
    if matrix.shape[0] == 0 or k <= 0:
        empty = np.zeros((queries.shape[0], 0))
        return empty.astype(np.int64), empty.astype(np.float32)
    scores = queries @ matrix.T
    k = min(k, matrix.shape[0])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1)
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)


def semantic_neighbours(
    catalog: ItemCatalog, vectors: npt.NDArray[np.float32], k: int
) -> list[list[tuple[str, float]]]:
    """For each vector (a zero vector means none), its k nearest eligible items."""
    out: list[list[tuple[str, float]]] = [[] for _ in range(vectors.shape[0])]
    known = np.flatnonzero(np.linalg.norm(vectors, axis=1) > 0)
    if known.size == 0:
        # Most batches carry no search query: skip the product over the whole catalogue.
        return out
    matrix, ids = catalog.semantic_view()
    rows, scores = nearest(matrix, vectors[known], k)
    for i, r, sc in zip(known, rows, scores, strict=True):
        out[i] = [(ids[j], float(s)) for j, s in zip(r, sc, strict=True)]
    return out


def blocked_items(ctx: UserContext, item_in_view: str | None) -> set[str]:
    """Items this user must not be shown now."""
    blocked = {h.item_id for h in ctx.history if h.type == "purchase"}
    if item_in_view:
        blocked.add(item_in_view)
    return blocked


def mix_candidates(
    ctx: UserContext,
    semantic: Sequence[tuple[str, float]],
    trending: dict[str, float],
    catalog: ItemCatalog,
    item_in_view: str | None,
    n: int,
) -> Candidates:
    """Merge the sources with quotas, apply the filters, attach signals."""
    blocked = blocked_items(ctx, item_in_view)
    retrieval = dict(semantic)
    covis_ranked = sorted(ctx.covis.items(), key=lambda kv: -kv[1])
    trending_ranked = sorted(trending.items(), key=lambda kv: -kv[1])
    sources = [
        ("semantic", [i for i, _ in semantic], int(n * SEMANTIC_SHARE)),
        ("covis", [i for i, _ in covis_ranked], int(n * COVIS_SHARE)),
        ("trending", [i for i, _ in trending_ranked], n),
    ]
    out = Candidates()
    seen: set[str] = set()

    def take(item: str, source: str) -> None:
        seen.add(item)
        out.item_ids.append(item)
        out.source.append(source)
        out.covis.append(ctx.covis.get(item, 0.0))
        out.popularity.append(trending.get(item, 0.0))
        out.retrieval.append(retrieval.get(item, 0.0))

    leftovers: list[tuple[str, str]] = []
    for name, items, quota in sources:
        taken = 0
        for item in items:
            if item in seen or item in blocked or not catalog.in_stock(item):
                continue
            if taken < quota and len(out.item_ids) < n:
                take(item, name)
                taken += 1
            else:
                leftovers.append((item, name))
    for item, name in leftovers:
        if len(out.item_ids) >= n:
            break
        if item not in seen:
            take(item, name)
    return out
