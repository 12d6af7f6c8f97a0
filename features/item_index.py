"""The worker's in-memory item index: an :class:`ItemTable`, followed asynchronously.

Every worker follows ``items:log`` (whatever catalogue partitions it owns) so it knows
every item: its number (requests to the ranker name items by number), its vector (the
rolling user embedding adds it per event), its category (popularity by category), and
whether it is in stock.  The refresh reuses the table's pure parsing; only the I/O here
is async.

Retrieval over the table (``features.ann.TableIndex``: exact below ``ANN_MIN_ITEMS``
eligible items, faiss IVF above) runs inside Triton on the hot path; the worker keeps
its own for the categories nearest a search query (cold start of a user who has only
searched) and for the fallback when Triton is down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from redis.asyncio import Redis

from features import keys
from features.ann import ANN_MIN_ITEMS, TableIndex
from features.behavioural import refresh_behavioural
from features.catalog import item_titles, number_items
from features.item_table import (
    ItemRecord,
    ItemTable,
    SeqWatch,
    log_after,
    log_entries,
    parse_log_entries,
    queue_item_reads,
    records_from_replies,
)
from features.user_state import Vector

REFRESH_CHUNK = 500
# Behavioural embeddings move slowly (co-visitation accumulates): a slice a minute,
# round-robin over the items without text, keeps the pass to a few milliseconds.
BEHAVIOURAL_EVERY_S = 60.0
BEHAVIOURAL_CHUNK = 500
NAMES_KEPT = 200_000


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
        # The fallback path must not stop the event loop for an IVF build (about 100 s
        # at 1M items): rebuilds run in a thread while the old index serves.
        self.retrieval = TableIndex(self.table, ann_min_items, background=True)
        self._next_refresh = 0.0
        # The catalogue agent and the event path both refresh; one at a time, or both
        # would apply the same log entries and rebuild the index twice.
        self._refreshing = asyncio.Lock()
        # Behavioural item embeddings live in the shared catalogue hashes: only a live
        # worker computes them (a replay's shadow state must not leak into live retrieval).
        self._write_behavioural = write_behavioural
        self._categories: dict[str, str] = {}
        # Display names for explanations ("similar to <name>"), read from Redis on first
        # use and forgotten when the item changes: one round trip less per batch.
        self._names: dict[str, str] = {}
        self._seq = SeqWatch()
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
        if self._seq.went_back(await self._redis.get(keys.ITEM_SEQ)):
            self.table.clear()
            self._names.clear()
            self._categories.clear()
            self.retrieval.changed(self.table.take_changed())
        while True:
            entries = await self._redis.xrange(
                keys.ITEM_LOG, min=log_after(self.table.last_stream_id), count=10_000
            )
            last_id, changed = parse_log_entries(log_entries(entries))
            if last_id is None:
                return total
            self.table.apply(await self._fetch(changed))
            self.table.last_stream_id = last_id
            for item_id in changed:
                self._names.pop(item_id, None)
            self.retrieval.changed(self.table.take_changed())
            total += len(changed)

    async def _fetch(self, item_ids: list[str]) -> dict[str, ItemRecord | None]:
        out: dict[str, ItemRecord | None] = {}
        for start in range(0, len(item_ids), REFRESH_CHUNK):
            part = item_ids[start : start + REFRESH_CHUNK]
            async with self._redis.pipeline(transaction=False) as pipe:
                queue_item_reads(pipe, part)
                replies = await pipe.execute()
            records = records_from_replies(part, replies, self.table.dim)
            # Stored before items had numbers: number them; the log brings them back.
            unnumbered = [
                i for i, (_, stock, n, *_) in zip(part, replies, strict=True) if stock and not n
            ]
            if unnumbered:
                await number_items(self._redis, unnumbered)
            for item_id, rec in records.items():
                if rec is not None and rec.category:
                    self._categories[item_id] = rec.category
                else:
                    self._categories.pop(item_id, None)
            out |= records
        return out

    # --- what ingest, the request and the fallback read ---------------------------------

    async def names(self, item_ids: Sequence[str]) -> dict[str, str]:
        """Each item's display name (``features.catalog.display_name``); Redis is read only
        for names not seen since the item last changed."""
        missing = [i for i in item_ids if i not in self._names]
        if missing:
            if len(self._names) + len(missing) > NAMES_KEPT:
                self._names.clear()  # bounded: a cache, not a copy of the catalogue
            self._names |= await item_titles(self._redis, missing)
        return {i: self._names.get(i, i) for i in item_ids}

    def number(self, item_id: str) -> int:
        """The item's number, -1 when unknown."""
        return int(self.table.rows([item_id])[0])

    def text_vector(self, item_id: str) -> Vector | None:
        mat, has = self.table.lookup([item_id])
        return mat[0] if has[0] else None

    def vector(self, item_id: str) -> Vector | None:
        """The item's text embedding, else its behavioural one, else None."""
        vec, has = self.table.vectors(self.table.rows([item_id]))
        return vec[0] if has[0] else None

    def category(self, item_id: str) -> str | None:
        return self._categories.get(item_id)

    def categories_near(self, vector: Vector, n: int = 5) -> list[str]:
        """Categories of the ``n`` items nearest ``vector`` (most common first); [] for zeros."""
        if not np.any(vector):
            return []
        nums, _ = self.retrieval.search(vector[None, :].astype(np.float32), n)
        counts: dict[str, int] = {}
        for item_id in self.table.id_of(nums[0][nums[0] >= 0]):
            cat = self._categories.get(item_id) if item_id else None
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

    def nearest(self, vectors: npt.NDArray[np.float32], k: int) -> list[list[tuple[str, float]]]:
        """Each row's ``k`` nearest eligible items as (id, cosine), for the operator tools."""
        nums, scores = self.retrieval.search(vectors, k)
        out = []
        for row, row_scores in zip(nums, scores, strict=True):
            keep = row >= 0
            ids = self.table.id_of(row[keep])
            out.append(
                [(i, float(s)) for i, s in zip(ids, row_scores[keep], strict=True) if i is not None]
            )
        return out

    def __len__(self) -> int:
        return len(self.table)
