"""Nearest items by inner product: exact (numpy) for small catalogues, faiss IVF for large.

Why faiss ``IndexIVFFlat`` (numbers from ``bench/ann_choice.py`` on these 2 shared cores):
at 100k random 384-d unit vectors it built in 4.9 s against 42 s for hnswlib and 66 s for
usearch (HNSW, M=16, ef_construction=100), and answered one top-100 query in 0.34 ms p50
against 1.2 and 2.4 ms; at 1M items it builds in about 100 s (``shoprec bench features``),
where HNSW would take about ten minutes on 2 cores.  Items leave and enter in place
(``remove_ids``/``add_with_ids``), which the catalogue stream needs; hnswlib only marks
deletions and has a fixed capacity.  The price is recall: on the real item embeddings
(6,394 distinct vectors) IVF at nprobe 32 finds 0.905 of the exact top-100 in 0.07 ms,
HNSW at ef 200 finds 0.98 in 0.18 ms.  ``nprobe`` buys recall back (0.92 at 64), and the
choice is isolated behind :class:`RetrievalIndex` should HNSW's recall be worth its build
time.  Redis vector search would keep the index beside the item hashes, but it needs the
RediSearch module, which Debian's redis-server 7.0 does not ship.

Below :data:`ANN_MIN_ITEMS` the exact product is both faster to keep fresh
(no training) and fast enough (about 1 ms per query at 10k items).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import faiss
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

ANN_MIN_ITEMS = 50_000
DEFAULT_NPROBE = 32
# Retrain when the index has grown this much since its centroids were fitted.
RETRAIN_GROWTH = 4.0
MAX_LISTS = 2048
TRAIN_PER_LIST = 39


class RetrievalIndex(Protocol):
    """An id-keyed vector index that answers top-k by inner product."""

    def __len__(self) -> int: ...

    def search(self, queries: F32, k: int) -> list[list[tuple[str, float]]]:
        """For each query row, up to k (item id, inner product), best first."""
        ...


def exact_top_k(matrix: F32, queries: F32, k: int) -> tuple[I64, F32]:
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


class ExactIndex:
    """A dense matrix and its ids; rebuilt, not updated (cheap below ANN_MIN_ITEMS)."""

    def __init__(self, matrix: F32, ids: Sequence[str]) -> None:
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: F32, k: int) -> list[list[tuple[str, float]]]:
        rows, scores = exact_top_k(self.matrix, queries, k)
        return [
            [(self.ids[j], float(s)) for j, s in zip(r, sc, strict=True)]
            for r, sc in zip(rows, scores, strict=True)
        ]


class IvfIndex:
    """faiss IVF-Flat over inner product, keyed by item id, updated in place."""

    def __init__(self, dim: int, nprobe: int = DEFAULT_NPROBE) -> None:
        self.dim = dim
        self.nprobe = nprobe
        self._index: faiss.IndexIVFFlat | None = None
        self._trained_on = 0
        self._key: dict[str, int] = {}
        self._name: dict[int, str] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._key)

    @staticmethod
    def n_lists(n: int) -> int:
        """About 4·√n lists (faiss's guideline), capped so training stays seconds, not minutes.

        k-means costs lists x training points (39 per list, faiss's minimum); at
        1M items 4·√n = 4,000 lists would train for minutes on 2 cores, 2,048 for seconds.
        """
        return max(1, min(MAX_LISTS, int(4 * np.sqrt(n)), n // TRAIN_PER_LIST))

    def build(self, matrix: F32, ids: Sequence[str], seed: int = 0) -> None:
        """Fit the centroids on (a sample of) ``matrix`` and add every row."""
        n = matrix.shape[0]
        nlist = self.n_lists(n)
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        cap = TRAIN_PER_LIST * nlist
        sample = matrix if n <= cap else matrix[rng.choice(n, cap, replace=False)]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        index.nprobe = self.nprobe
        self._index, self._trained_on = index, n
        self._key, self._name, self._next = {}, {}, 0
        self.upsert(ids, matrix)

    def upsert(self, ids: Sequence[str], vectors: F32) -> None:
        """Insert or replace items (a repeated id keeps its last row)."""
        if self._index is None:
            self.build(vectors, ids)
            return
        last = {name: row for row, name in enumerate(ids)}
        if len(last) < len(ids):
            ids, vectors = list(last), vectors[list(last.values())]
        self.remove(list(dict.fromkeys(i for i in ids if i in self._key)))
        keys = np.arange(self._next, self._next + len(ids), dtype=np.int64)
        self._next += len(ids)
        for name, key in zip(ids, keys, strict=True):
            self._key[name] = int(key)
            self._name[int(key)] = name
        self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), keys)

    def remove(self, ids: Sequence[str]) -> None:
        keys = [self._key.pop(i) for i in ids if i in self._key]
        for key in keys:
            del self._name[key]
        if keys and self._index is not None:
            # faiss's Python wrapper takes an id array; its stubs only know IDSelector.
            self._index.remove_ids(np.array(keys, dtype=np.int64))  # type: ignore[arg-type]

    def needs_retrain(self) -> bool:
        return len(self) > RETRAIN_GROWTH * max(1, self._trained_on)

    def search(self, queries: F32, k: int) -> list[list[tuple[str, float]]]:
        if self._index is None or len(self) == 0 or k <= 0:
            return [[] for _ in range(queries.shape[0])]
        scores, found = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return [
            [(self._name[int(j)], float(s)) for j, s in zip(r, sc, strict=True) if j >= 0]
            for r, sc in zip(found, scores, strict=True)
        ]
