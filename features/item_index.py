"""The worker's in-memory item index: the ranker's :class:`ItemTable`, followed asynchronously.

Every worker follows ``items:log`` (whatever catalogue partitions it owns)
so retrieval sees every item: nearest-neighbour search over the embeddings,
the in-stock rule, and each item's category (for category popularity).  The
refresh reuses the table's pure parsing; only the I/O here is async.

Retrieval searches text embeddings and, for items without text, their
behavioural embeddings (``features.behavioural``).  Below
``ann.ANN_MIN_ITEMS`` eligible items it is an exact product over a matrix
rebuilt after each change; above, a faiss IVF index updated in place with the
items each refresh changed, so a new item can be retrieved as soon as the
refresh after its catalogue record has run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
from redis.asyncio import Redis

from features import keys
from features.ann import ANN_MIN_ITEMS, ExactIndex, IvfIndex, RetrievalIndex
from features.behavioural import refresh_behavioural
from features.item_table import (
    ItemRecord,
    ItemTable,
    parse_log_entries,
    queue_item_reads,
    records_from_replies,
    stream_entries,
)
from features.user_state import Vector, vector_from_bytes

REFRESH_CHUNK = 500
# Behavioural embeddings move slowly (co-visitation accumulates): a slice a minute,
# round-robin over the items without text, keeps the pass to a few milliseconds.
BEHAVIOURAL_EVERY_S = 60.0
BEHAVIOURAL_CHUNK = 500


class ItemIndex:
    """What the agents know of the catalogue, fresh to within a refresh interval."""

    def __init__(
        self,
        redis: Redis,
        dim: int = keys.EMB_DIM,
        ann_min_items: int = ANN_MIN_ITEMS,
        *,
        write_behavioural: bool = True,
    ) -> None:
        self._redis = redis
        self.table = ItemTable(dim)
        self._next_refresh = 0.0
        # The catalogue agent and the event path both refresh; one at a time, or both
        # would apply the same log entries and rebuild the index twice.
        self._refreshing = asyncio.Lock()
        # Behavioural item embeddings live in the shared catalogue hashes: only a live
        # worker computes them (a replay's shadow state must not leak into live retrieval).
        self._write_behavioural = write_behavioural
        self._view: tuple[npt.NDArray[np.float32], list[str]] | None = None
        self._categories: dict[str, str] = {}
        self._behavioural: dict[str, Vector] = {}
        self._ann_min_items = ann_min_items
        self._ivf: IvfIndex | None = None
        self._exact: ExactIndex | None = None
        self._next_behavioural = 0.0
        self._behavioural_cursor = 0

    async def maybe_refresh(self, interval_s: float) -> int:
        """Refresh if ``interval_s`` has passed; skipped (0) while another refresh runs, so
        an event batch never queues behind a catalogue burst: it serves what is loaded."""
        if time.monotonic() < self._next_refresh or self._refreshing.locked():
            return 0
        changed = await self.refresh()
        if self._write_behavioural and time.monotonic() >= self._next_behavioural:
            if await self.refresh_behavioural(BEHAVIOURAL_CHUNK):
                changed += await self.refresh()
            self._next_behavioural = time.monotonic() + BEHAVIOURAL_EVERY_S
        self._next_refresh = time.monotonic() + interval_s
        return changed

    async def refresh_behavioural(self, limit: int | None = None) -> int:
        """Recompute behavioural embeddings of (the next ``limit``) items without text."""
        ids = self.textless_ids()
        if not ids:
            return 0
        if limit is not None and limit < len(ids):
            start = self._behavioural_cursor % len(ids)
            ids = (ids[start:] + ids[:start])[:limit]
            self._behavioural_cursor = start + limit
        return await refresh_behavioural(self._redis, ids, self.text_vector)

    async def refresh(self) -> int:
        """Apply every ``items:log`` entry not seen yet; returns items changed."""
        async with self._refreshing:
            return await self._apply_log()

    async def _apply_log(self) -> int:
        total = 0
        while True:
            resp = await self._redis.xread({keys.ITEM_LOG: self.table.last_stream_id}, count=10_000)
            last_id, changed = parse_log_entries(stream_entries(resp))
            if last_id is None:
                return total
            self.table.apply(await self._fetch(changed))
            self.table.last_stream_id = last_id
            self._after_change(changed)
            total += len(changed)

    async def _fetch(self, item_ids: list[str]) -> dict[str, ItemRecord | None]:
        out: dict[str, ItemRecord | None] = {}
        for start in range(0, len(item_ids), REFRESH_CHUNK):
            part = item_ids[start : start + REFRESH_CHUNK]
            async with self._redis.pipeline(transaction=False) as pipe:
                queue_item_reads(pipe, part)
                for item_id in part:
                    pipe.hmget(keys.item(item_id), ["category", "bemb"])
                replies = await pipe.execute()
            n = 2 * len(part)
            out |= records_from_replies(part, replies[:n], self.table.dim)
            for item_id, (cat, bemb) in zip(part, replies[n:], strict=True):
                self._remember(item_id, cat, vector_from_bytes(bemb))
        return out

    def _remember(self, item_id: str, category: bytes | None, bemb: Vector | None) -> None:
        if category:
            self._categories[item_id] = category.decode()
        else:
            self._categories.pop(item_id, None)
        if bemb is not None and bemb.shape == (self.table.dim,) and np.all(np.isfinite(bemb)):
            self._behavioural[item_id] = bemb
        else:
            self._behavioural.pop(item_id, None)

    def _after_change(self, changed: Iterable[str]) -> None:
        self._view = None
        self._exact = None
        if self._ivf is None:
            return
        ids = list(changed)
        mat, ok = self._vectors(ids)
        keep = [i for i, good in zip(ids, ok, strict=True) if good]
        self._ivf.remove([i for i, good in zip(ids, ok, strict=True) if not good])
        if keep:
            self._ivf.upsert(keep, mat[ok])
        if self._ivf.needs_retrain():
            self._ivf = None  # rebuilt from the whole view at the next search

    # --- what retrieval and the rules read --------------------------------------------

    def text_vector(self, item_id: str) -> Vector | None:
        mat, has = self.table.lookup([item_id])
        return mat[0] if has[0] else None

    def vector(self, item_id: str) -> Vector | None:
        """The item's text embedding, else its behavioural one, else None."""
        text = self.text_vector(item_id)
        return text if text is not None else self._behavioural.get(item_id)

    def category(self, item_id: str) -> str | None:
        return self._categories.get(item_id)

    def categories_near(self, vector: Vector, n: int = 5) -> list[str]:
        """Categories of the ``n`` items nearest ``vector`` (most common first); [] for zeros."""
        if not np.any(vector):
            return []
        counts: dict[str, int] = {}
        for item_id, _ in self.nearest(vector[None, :].astype(np.float32), n)[0]:
            cat = self._categories.get(item_id)
            if cat:
                counts[cat] = counts.get(cat, 0) + 1
        return sorted(counts, key=lambda c: -counts[c])

    def textless_ids(self) -> list[str]:
        """Items the catalogue gave no text: their embedding must come from behaviour."""
        ids = self.table.ids
        _, has = self.table.lookup(ids)
        return [i for i, h in zip(ids, has, strict=True) if not h]

    def in_stock(self, item_id: str) -> bool:
        return bool(self.table.in_stock([item_id])[0])

    def _vectors(self, ids: list[str]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """Search vectors of ``ids`` and which of them are eligible (a vector, in stock)."""
        mat, has = self.table.lookup(ids)
        mat = mat.copy()
        for row, item_id in enumerate(ids):
            if not has[row] and item_id in self._behavioural:
                mat[row] = self._behavioural[item_id]
                has[row] = True
        return mat, has & self.table.in_stock(ids)

    def semantic_view(self) -> tuple[npt.NDArray[np.float32], list[str]]:
        """Vectors of the items retrieval may return (a vector, in stock), cached."""
        if self._view is None:
            ids = self.table.ids
            mat, eligible = self._vectors(ids)
            self._view = (
                np.ascontiguousarray(mat[eligible]),
                [i for i, ok in zip(ids, eligible, strict=True) if ok],
            )
        return self._view

    def retrieval_index(self) -> RetrievalIndex:
        """Exact below the ANN threshold, faiss IVF above (built once, then updated)."""
        if self._ivf is not None:
            return self._ivf
        if self._exact is not None:
            return self._exact
        matrix, ids = self.semantic_view()
        if len(ids) >= self._ann_min_items:
            self._ivf = IvfIndex(self.table.dim)
            self._ivf.build(matrix, ids)
            return self._ivf
        self._exact = ExactIndex(matrix, ids)
        return self._exact

    def nearest(self, vectors: npt.NDArray[np.float32], k: int) -> list[list[tuple[str, float]]]:
        return self.retrieval_index().search(vectors, k)

    def __len__(self) -> int:
        return len(self.table)
