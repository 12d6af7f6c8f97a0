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

import logging
import threading
from typing import Protocol

import faiss
import numpy as np
import numpy.typing as npt

from features.item_table import ItemTable
from shoprec.errors import describe

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

ANN_MIN_ITEMS = 50_000
DEFAULT_NPROBE = 32
# Retrain when the index has grown this much since its centroids were fitted.
RETRAIN_GROWTH = 4.0
MAX_LISTS = 2048
TRAIN_PER_LIST = 39


Keys = npt.NDArray[np.int64]

log = logging.getLogger(__name__)


class RetrievalIndex(Protocol):
    """A vector index keyed by integers (item numbers) that answers top-k by inner product."""

    def __len__(self) -> int: ...

    def search(self, queries: F32, k: int) -> tuple[Keys, F32]:
        """For each query row, up to k keys and inner products, best first, padded with
        key -1 and score -inf."""
        ...


SCORE_DECIMALS = 4
"""Inner products are compared at this many decimals (:func:`exact_top_k`)."""


def exact_top_k(matrix: F32, queries: F32, k: int) -> tuple[I64, F32]:
    """Top-k rows of ``matrix`` by inner product for each query row (exact)."""
    if matrix.shape[0] == 0 or k <= 0:
        empty = np.zeros((queries.shape[0], 0))
        return empty.astype(np.int64), empty.astype(np.float32)
    scores = queries @ matrix.T
    # Compared rounded, ties to the lower row: items of the same text have the same vector,
    # and the matrix product gives their scores last-bit differences that depend on the
    # BLAS kernel the CPU picks, so unrounded, which of them make the cut (and their order)
    # would differ from machine to machine.  Seen: replaying the same 1,500 rees46 events,
    # an AMD EPYC and the machine that recorded tests/integration/golden_rees46.json
    # disagreed on 538 of 1,164 lists, through the retrieval cosine the ranker reads.
    # The key is one int64 (score, then row), negated so the best comes first, built in
    # place: exact, for 64 queries 2.6 ms more than the float selection at 50,000 items
    # (94.3 against 91.7 ms, product included) and 0.7 ms more at 6,500 (9.6 against 8.9).
    n = matrix.shape[0]
    key = np.rint(scores * np.float32(10**SCORE_DECIMALS)).astype(np.int64)
    key *= -n
    key -= np.arange(n - 1, -1, -1, dtype=np.int64)
    k = min(k, n)
    top = np.argpartition(key, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(key, top, axis=1), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    return top, np.take_along_axis(scores, top, axis=1)


def _padded(keys: Keys, scores: F32, k: int) -> tuple[Keys, F32]:
    """``keys``/``scores`` ``[B, <=k]`` padded to ``[B, k]`` with -1 / -inf."""
    missing = k - keys.shape[1]
    if missing <= 0:
        return keys, scores
    return (
        np.pad(keys, ((0, 0), (0, missing)), constant_values=-1),
        np.pad(scores, ((0, 0), (0, missing)), constant_values=-np.inf).astype(np.float32),
    )


class ExactIndex:
    """A dense matrix and the key of each row; rebuilt, not updated (cheap below
    ANN_MIN_ITEMS)."""

    def __init__(self, matrix: F32, keys: npt.ArrayLike) -> None:
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        self.keys = np.asarray(keys, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def search(self, queries: F32, k: int) -> tuple[Keys, F32]:
        rows, scores = exact_top_k(self.matrix, queries, k)
        return _padded(self.keys[rows], scores.astype(np.float32, copy=False), k)


class IvfIndex:
    """faiss IVF-Flat over inner product, keyed by item number, updated in place."""

    def __init__(self, dim: int, nprobe: int = DEFAULT_NPROBE) -> None:
        self.dim = dim
        self.nprobe = nprobe
        self._index: faiss.IndexIVFFlat | None = None
        self._trained_on = 0
        self._keys: set[int] = set()

    def __len__(self) -> int:
        return len(self._keys)

    @staticmethod
    def n_lists(n: int) -> int:
        """About 4·√n lists (faiss's guideline), capped so training stays seconds, not minutes.

        k-means costs lists x training points (39 per list, faiss's minimum); at
        1M items 4·√n = 4,000 lists would train for minutes on 2 cores, 2,048 for seconds.
        """
        return max(1, min(MAX_LISTS, int(4 * np.sqrt(n)), n // TRAIN_PER_LIST))

    def build(self, matrix: F32, keys: npt.ArrayLike, seed: int = 0) -> None:
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
        self._index, self._trained_on, self._keys = index, n, set()
        self.upsert(keys, matrix)

    def upsert(self, keys: npt.ArrayLike, vectors: F32) -> None:
        """Insert or replace rows (a repeated key keeps its last row)."""
        k = np.asarray(keys, dtype=np.int64)
        if self._index is None:
            self.build(vectors, k)
            return
        last = {int(key): row for row, key in enumerate(k.tolist())}
        if len(last) < len(k):
            k, vectors = np.fromiter(last, np.int64, len(last)), vectors[list(last.values())]
        self.remove(k)
        self._keys.update(k.tolist())
        self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), k)

    def remove(self, keys: npt.ArrayLike) -> None:
        k = [key for key in np.asarray(keys, dtype=np.int64).tolist() if key in self._keys]
        self._keys.difference_update(k)
        if k and self._index is not None:
            # faiss's Python wrapper takes an id array; its stubs only know IDSelector.
            self._index.remove_ids(np.array(k, dtype=np.int64))  # type: ignore[arg-type]

    def needs_retrain(self) -> bool:
        return len(self) > RETRAIN_GROWTH * max(1, self._trained_on)

    def search(self, queries: F32, k: int) -> tuple[Keys, F32]:
        if self._index is None or len(self) == 0 or k <= 0:
            return _padded(
                np.zeros((queries.shape[0], 0), np.int64),
                np.zeros((queries.shape[0], 0), np.float32),
                k,
            )
        scores, found = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return found.astype(np.int64), np.where(found >= 0, scores, -np.inf).astype(np.float32)


class TableIndex:
    """Retrieval over an :class:`~features.item_table.ItemTable`'s eligible items (a vector,
    in stock), keyed by item number: exact below ``ann_min_items``, faiss IVF above.

    The exact index is a copy of the eligible rows, rebuilt at the first search after a
    change; the IVF index is updated in place with the rows that changed (and rebuilt
    once it has grown :data:`RETRAIN_GROWTH`-fold since its centroids were fitted).
    Call :meth:`changed` with :meth:`ItemTable.take_changed`'s numbers after each change.

    With ``background=True`` (serving) an IVF build after the first never runs inside a
    search: it runs in a thread on a snapshot of the table (faiss releases the GIL) while
    searches go on against the index in use (the old IVF, or the exact copy when the
    catalogue first crosses ``ann_min_items``); the changes made meanwhile are replayed
    into the new index when it is swapped in.  A 1M-item build takes about 100 s: inline,
    that was 100 s without recommendations.  Without it (offline tools, tests) every
    build is inline, so results do not depend on timing.
    """

    def __init__(
        self, table: ItemTable, ann_min_items: int = ANN_MIN_ITEMS, *, background: bool = False
    ) -> None:
        self.table = table
        self.ann_min_items = ann_min_items
        self.background = background
        self._exact: ExactIndex | None = None
        self._ivf: IvfIndex | None = None
        self._build: _Build | None = None

    def changed(self, nums: Keys) -> None:
        """Rows ``nums`` of the table changed (added, replaced, removed, restocked)."""
        if nums.size == 0:
            return
        self._exact = None
        if self._build is not None:
            self._build.since.append(nums)
        if self._ivf is None:
            return
        self._apply(self._ivf, nums)
        if self._ivf.needs_retrain():
            if not self.background:
                self._ivf = None  # rebuilt from the whole table at the next search
            elif self._build is None:
                self._build = _Build.start(self.table)

    def _apply(self, ivf: IvfIndex, nums: Keys) -> None:
        vecs, has = self.table.vectors(nums)
        ok = has & self.table.stock(nums)
        ivf.remove(nums[~ok])
        if ok.any():
            ivf.upsert(nums[ok], vecs[ok])

    def _swap_if_built(self) -> None:
        build = self._build
        if build is None or build.thread.is_alive():
            return
        self._build = None
        if build.error is not None:
            log.warning(
                "retrieval index: background build failed (%s); keeping the old",
                describe(build.error),
            )
            return
        for nums in build.since:  # what changed while it was being built
            self._apply(build.ivf, nums)
        self._ivf, self._exact = build.ivf, None

    def wait_built(self, timeout_s: float | None = None) -> None:
        """Wait for a background build (tests, start-up) and swap it in."""
        if self._build is not None:
            self._build.thread.join(timeout_s)
        self._swap_if_built()

    def index(self) -> RetrievalIndex:
        self._swap_if_built()
        if self._ivf is not None:
            return self._ivf
        if self._exact is not None:
            return self._exact
        eligible = np.flatnonzero(self.table.eligible())
        if eligible.size >= self.ann_min_items:
            if not self.background:
                self._ivf = IvfIndex(self.table.dim)
                self._ivf.build(self.table.matrix()[eligible], eligible)
                return self._ivf
            if self._build is None:
                self._build = _Build.start(self.table)
        self._exact = ExactIndex(self.table.matrix()[eligible], eligible)
        return self._exact

    def __len__(self) -> int:
        return len(self.index())

    def search(self, queries: F32, k: int) -> tuple[Keys, F32]:
        """Top-k eligible item numbers per query row; a zero query row finds nothing."""
        b = queries.shape[0]
        keys = np.full((b, k), -1, np.int64)
        scores = np.full((b, k), -np.inf, np.float32)
        known = np.flatnonzero(np.linalg.norm(queries, axis=1) > 0)
        if known.size == 0 or k <= 0:
            # Most batches carry no search query: skip the product over the catalogue.
            return keys, scores
        found, found_scores = self.index().search(queries[known], k)
        keys[known], scores[known] = found, found_scores
        return keys, scores


class _Build:
    """An IVF index being built in a thread from a snapshot of the table's eligible rows,
    and the changed row numbers to replay into it before it serves."""

    def __init__(self, matrix: F32, keys: Keys, dim: int) -> None:
        self.ivf = IvfIndex(dim)
        self.since: list[Keys] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(matrix, keys), name="ivf-build", daemon=True
        )

    @classmethod
    def start(cls, table: ItemTable) -> _Build:
        eligible = np.flatnonzero(table.eligible())
        build = cls(table.matrix()[eligible], eligible, table.dim)  # a copy: the snapshot
        log.info("retrieval index: building IVF over %d items in the background", eligible.size)
        build.thread.start()
        return build

    def _run(self, matrix: F32, keys: Keys) -> None:
        try:
            self.ivf.build(matrix, keys)
        except Exception as exc:  # reported by the serving side, which keeps the old index
            self.error = exc
