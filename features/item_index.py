"""The worker's in-memory item index: the ranker's :class:`ItemTable`, followed asynchronously.

Every worker follows ``items:log`` (whatever catalogue partitions it owns)
so retrieval sees every item: nearest-neighbour search over the embeddings,
and the in-stock rule.  The refresh reuses the table's pure parsing; only the
I/O here is async.
"""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt
from redis.asyncio import Redis

from features import keys
from features.user_state import Vector
from ranking.item_table import (
    ItemRecord,
    ItemTable,
    parse_log_entries,
    queue_item_reads,
    records_from_replies,
    stream_entries,
)

REFRESH_CHUNK = 500


class ItemIndex:
    """What the agents know of the catalogue, fresh to within a refresh interval."""

    def __init__(self, redis: Redis, dim: int = keys.EMB_DIM) -> None:
        self._redis = redis
        self.table = ItemTable(dim)
        self._next_refresh = 0.0
        self._view: tuple[npt.NDArray[np.float32], list[str]] | None = None

    def mark_stale(self) -> None:
        """The catalogue changed (this worker wrote to it): refresh before the next batch."""
        self._next_refresh = 0.0

    async def maybe_refresh(self, interval_s: float) -> int:
        if time.monotonic() < self._next_refresh:
            return 0
        changed = await self.refresh()
        self._next_refresh = time.monotonic() + interval_s
        return changed

    async def refresh(self) -> int:
        """Apply every ``items:log`` entry not seen yet; returns items changed."""
        total = 0
        while True:
            resp = await self._redis.xread({keys.ITEM_LOG: self.table.last_stream_id}, count=10_000)
            last_id, changed = parse_log_entries(stream_entries(resp))
            if last_id is None:
                return total
            self.table.apply(await self._fetch(changed))
            self.table.last_stream_id = last_id
            self._view = None
            total += len(changed)

    async def _fetch(self, item_ids: list[str]) -> dict[str, ItemRecord | None]:
        out: dict[str, ItemRecord | None] = {}
        for start in range(0, len(item_ids), REFRESH_CHUNK):
            part = item_ids[start : start + REFRESH_CHUNK]
            async with self._redis.pipeline(transaction=False) as pipe:
                queue_item_reads(pipe, part)
                out |= records_from_replies(part, await pipe.execute(), self.table.dim)
        return out

    # --- what retrieval and the rules read --------------------------------------------

    def vector(self, item_id: str) -> Vector | None:
        mat, has = self.table.lookup([item_id])
        return mat[0] if has[0] else None

    def in_stock(self, item_id: str) -> bool:
        return bool(self.table.in_stock([item_id])[0])

    def semantic_view(self) -> tuple[npt.NDArray[np.float32], list[str]]:
        """Embeddings of the items retrieval may return (with text, in stock), cached."""
        if self._view is None:
            ids = self.table.ids
            mat, has = self.table.lookup(ids)
            eligible = has & self.table.in_stock(ids)
            self._view = (
                np.ascontiguousarray(mat[eligible]),
                [i for i, ok in zip(ids, eligible, strict=True) if ok],
            )
        return self._view

    def __len__(self) -> int:
        return len(self.table)
