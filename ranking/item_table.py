"""The ranker's in-memory item-embedding table, kept fresh from Redis.

Requests to the ranker carry item ids, not vectors (DESIGN §6: 250 vectors
would cost ~2 ms on the wire alone), so whoever scores holds every item's
embedding in its own memory.  :class:`ItemTable` is that memory: an id -> row
map over one dense float32 matrix, plus each item's stock flag (the worker's
rules need it; the ranker itself only needs the vectors).

The pure parts (:meth:`ItemTable.upsert`, :meth:`ItemTable.remove`,
:meth:`ItemTable.lookup`, :meth:`ItemTable.apply`, :func:`parse_log_entries`,
:func:`parse_item_hash`) do no I/O, so they are tested without Redis and an
async refresher in the worker can reuse them.  :meth:`ItemTable.refresh_from_redis`
and :class:`ItemTableRefresher` are the synchronous I/O used inside Triton.

Redis layout (``features.keys``): the stream ``items:log`` gets one entry
(field ``id``) per item change; the hash ``{i:<id>}`` holds ``emb`` (raw
little-endian float32 bytes, absent for items without text) and ``in_stock``.
A deleted hash means the item left the catalogue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import redis

from features import keys

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
Bools = npt.NDArray[np.bool_]

FIRST_STREAM_ID = b"0-0"
_FALSE_WORDS = frozenset({b"", b"0", b"false", b"False", b"FALSE", b"no", b"n"})


@dataclass(frozen=True)
class ItemRecord:
    """What the table keeps per item: its text embedding (``None`` if it has no text)."""

    emb: F32 | None
    in_stock: bool = True


class ItemTable:
    """id -> row over a float32 matrix ``[n, dim]`` that grows by doubling.

    Removal moves the last row into the freed one, so rows ``0..n-1`` stay
    dense and a lookup is one fancy-index gather.  Not thread-safe: one
    writer and reader at a time (the Triton stub is single-threaded).
    """

    def __init__(self, dim: int = keys.EMB_DIM, capacity: int = 1024) -> None:
        if dim < 1 or capacity < 1:
            raise ValueError(f"dim and capacity must be >= 1, got {dim}, {capacity}")
        self.dim = dim
        self._index: dict[str, int] = {}
        self._ids: list[str] = []
        # One row beyond capacity stays zero/False forever: row -1 (unknown id)
        # then gathers a zero row without a masking pass.
        self._embs: F32 = np.zeros((capacity + 1, dim), dtype=np.float32)
        self._has_emb: Bools = np.zeros(capacity + 1, dtype=np.bool_)
        self._in_stock: Bools = np.zeros(capacity + 1, dtype=np.bool_)
        self.last_stream_id: bytes = FIRST_STREAM_ID
        """Last ``items:log`` entry applied; the next refresh reads after it."""

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    @property
    def ids(self) -> list[str]:
        """Item ids in row order (a copy)."""
        return list(self._ids)

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays (capacity, not just used rows)."""
        return int(self._embs.nbytes + self._has_emb.nbytes + self._in_stock.nbytes)

    # --- writes ---------------------------------------------------------------------

    def upsert(
        self,
        ids: Sequence[str],
        embs: npt.ArrayLike,
        *,
        has_emb: npt.ArrayLike | None = None,
        in_stock: npt.ArrayLike | None = None,
    ) -> None:
        """Insert or replace ``ids`` with rows of ``embs`` ``[len(ids), dim]``.

        Rows are stored L2-normalised, so lookups feed cosines directly.
        ``has_emb`` (default all True) marks rows that are real text
        embeddings; rows marked False, zero or non-finite are stored as zeros.  ``in_stock``
        defaults to True.  A repeated id keeps its last row.
        """
        n = len(ids)
        mat = np.asarray(embs, dtype=np.float32)
        if mat.shape != (n, self.dim):
            raise ValueError(f"embs must have shape ({n}, {self.dim}), got {mat.shape}")
        has = np.ones(n, np.bool_) if has_emb is None else np.asarray(has_emb, np.bool_)
        stock = np.ones(n, np.bool_) if in_stock is None else np.asarray(in_stock, np.bool_)
        if has.shape != (n,) or stock.shape != (n,):
            raise ValueError(f"has_emb and in_stock must have shape ({n},)")
        norms = np.linalg.norm(mat, axis=1)
        # A zero or non-finite vector carries no direction: store it as "no embedding".
        has = has & np.isfinite(norms) & (norms > 0)
        unit = mat / np.where(has, norms, np.float32(1.0))[:, None]
        rows = np.fromiter((self._row_for(i) for i in ids), dtype=np.int64, count=n)
        self._embs[rows] = np.where(has[:, None], unit, np.float32(0.0))
        self._has_emb[rows] = has
        self._in_stock[rows] = stock

    def remove(self, ids: Iterable[str]) -> int:
        """Forget ``ids``; unknown ids are ignored.  Returns how many were removed."""
        removed = 0
        for item_id in ids:
            row = self._index.pop(item_id, None)
            if row is None:
                continue
            removed += 1
            last = len(self._ids) - 1
            moved = self._ids.pop()
            if row != last:
                self._ids[row] = moved
                self._index[moved] = row
                self._embs[row] = self._embs[last]
                self._has_emb[row] = self._has_emb[last]
                self._in_stock[row] = self._in_stock[last]
            self._embs[last] = 0.0
            self._has_emb[last] = False
            self._in_stock[last] = False
        return removed

    def apply(self, changes: Mapping[str, ItemRecord | None]) -> None:
        """Apply a refresh's result: a record upserts its id, ``None`` removes it."""
        gone = [i for i, rec in changes.items() if rec is None]
        live = [(i, rec) for i, rec in changes.items() if rec is not None]
        self.remove(gone)
        if not live:
            return
        mat = np.zeros((len(live), self.dim), dtype=np.float32)
        has = np.zeros(len(live), dtype=np.bool_)
        for k, (_, rec) in enumerate(live):
            if rec.emb is not None:
                mat[k] = rec.emb
                has[k] = True
        self.upsert(
            [i for i, _ in live],
            mat,
            has_emb=has,
            in_stock=np.fromiter((rec.in_stock for _, rec in live), np.bool_, len(live)),
        )

    def _row_for(self, item_id: str) -> int:
        row = self._index.get(item_id)
        if row is not None:
            return row
        row = len(self._ids)
        if row == len(self._embs) - 1:
            self._grow()
        self._index[item_id] = row
        self._ids.append(item_id)
        return row

    def _grow(self) -> None:
        used = len(self._ids)
        cap = 2 * used
        embs = np.zeros((cap + 1, self.dim), dtype=np.float32)
        embs[:used] = self._embs[:used]
        has = np.zeros(cap + 1, dtype=np.bool_)
        has[:used] = self._has_emb[:used]
        stock = np.zeros(cap + 1, dtype=np.bool_)
        stock[:used] = self._in_stock[:used]
        self._embs, self._has_emb, self._in_stock = embs, has, stock

    # --- reads ----------------------------------------------------------------------

    def rows(self, ids: Sequence[str | bytes]) -> npt.NDArray[np.int64]:
        """Row of each id, -1 where unknown.  Accepts ``bytes`` (as Triton and Redis give)."""
        get = self._index.get
        # A list comprehension beats np.fromiter over a generator here (~20%);
        # this runs per ranker batch for every history and candidate id.
        return np.array(
            [get(i.decode() if isinstance(i, bytes) else i, -1) for i in ids], dtype=np.int64
        ).reshape(len(ids))

    def lookup(self, ids: Sequence[str | bytes]) -> tuple[F32, Bools]:
        """Embeddings ``[len(ids), dim]`` and a mask of which are real.

        Rows are unit length; unknown ids and items without text get a zero
        row and ``False``.
        """
        rows = self.rows(ids)
        return self._embs[rows], self._has_emb[rows]

    def in_stock(self, ids: Sequence[str | bytes]) -> Bools:
        """Stock flag per id; unknown ids are False (nothing to sell)."""
        stock: Bools = self._in_stock[self.rows(ids)]
        return stock

    # --- Redis ----------------------------------------------------------------------

    def refresh_from_redis(
        self, client: redis.Redis, *, max_entries: int = 10_000, chunk: int = 500
    ) -> int:
        """Apply the ``items:log`` entries after :attr:`last_stream_id`; returns items changed.

        ``client`` is a synchronous client with ``decode_responses=False``
        (embeddings are raw bytes).  Reads at most ``max_entries`` log entries
        per call so a catalogue burst cannot stall one scoring batch for long;
        call again (see :meth:`catch_up`) to read the rest.  The first call
        starts at the stream's beginning.  Raises ``redis.RedisError`` on I/O
        failure, leaving the table and :attr:`last_stream_id` as they were.
        """
        resp = client.xread({keys.ITEM_LOG: self.last_stream_id}, count=max_entries)
        last_id, changed = parse_log_entries(stream_entries(resp))
        if last_id is None:
            return 0
        fetched: dict[str, ItemRecord | None] = {}
        for start in range(0, len(changed), chunk):
            part = changed[start : start + chunk]
            pipe = client.pipeline(transaction=False)
            queue_item_reads(pipe, part)
            fetched |= records_from_replies(part, pipe.execute(), self.dim)
        self.apply(fetched)
        self.last_stream_id = last_id
        return len(fetched)

    def catch_up(self, client: redis.Redis, *, max_entries: int = 10_000) -> int:
        """Refresh until the log is exhausted (start-up); returns items changed."""
        total = 0
        while True:
            before = self.last_stream_id
            total += self.refresh_from_redis(client, max_entries=max_entries)
            if self.last_stream_id == before:
                return total


def stream_entries(resp: Any) -> list[tuple[bytes, Mapping[bytes, bytes]]]:
    """The entries of the one stream an XREAD asked for, under RESP2 or RESP3."""
    if not resp:
        return []
    if isinstance(resp, Mapping):
        return list(next(iter(resp.values())))
    return list(resp[0][1])


def parse_log_entries(
    entries: Sequence[tuple[bytes, Mapping[bytes, bytes]]],
) -> tuple[bytes | None, list[str]]:
    """``(last entry id, changed item ids in first-seen order)`` from ``items:log`` entries.

    Entries without an ``id`` field are skipped; an item changed several
    times is fetched once.  The last id is None when there were no entries.
    """
    if not entries:
        return None, []
    seen: dict[str, None] = {}
    for _, fields in entries:
        raw = fields.get(b"id")
        if raw:
            seen[raw.decode("utf-8", errors="replace")] = None
    last = entries[-1][0]
    return (last if isinstance(last, bytes) else str(last).encode()), list(seen)


def queue_item_reads(pipe: Any, item_ids: Sequence[str]) -> None:
    """Queue, on a sync or async pipeline, what :func:`records_from_replies` parses."""
    for item_id in item_ids:
        key = keys.item(item_id)
        pipe.exists(key)
        pipe.hmget(key, ["emb", "in_stock"])


def records_from_replies(
    item_ids: Sequence[str], replies: Sequence[Any], dim: int = keys.EMB_DIM
) -> dict[str, ItemRecord | None]:
    """Each item's record from the replies to :func:`queue_item_reads`; None = removed."""
    out: dict[str, ItemRecord | None] = {}
    for k, item_id in enumerate(item_ids):
        exists, (emb, stock) = replies[2 * k], replies[2 * k + 1]
        out[item_id] = parse_item_hash(emb, stock, dim, item_id) if exists else None
    return out


def parse_item_hash(
    emb: bytes | None, in_stock: bytes | None, dim: int = keys.EMB_DIM, item_id: str = "?"
) -> ItemRecord:
    """An existing item hash's ``emb`` and ``in_stock`` fields as an :class:`ItemRecord`.

    A missing or wrongly sized ``emb`` means "no text embedding" (the item
    still ranks by behaviour).  A missing ``in_stock`` counts as in stock:
    the catalogue contract requires the field, so absence is an old writer,
    not a sold-out item.
    """
    vec: F32 | None = None
    if emb is not None:
        if len(emb) == 4 * dim:
            vec = np.frombuffer(emb, dtype="<f4").astype(np.float32)
            if not np.all(np.isfinite(vec)):
                log.warning("item %s: non-finite embedding ignored", item_id)
                vec = None
        else:
            log.warning(
                "item %s: emb has %d bytes, expected %d; ignored", item_id, len(emb), 4 * dim
            )
    stock = True if in_stock is None else in_stock.strip() not in _FALSE_WORDS
    return ItemRecord(emb=vec, in_stock=stock)


class ItemTableRefresher:
    """Refreshes an :class:`ItemTable` from Redis at most every ``interval_s``.

    Meant to be called before scoring each batch.  Redis failures never
    propagate: the table keeps serving what it has, the outage is logged
    once (and its end once), and retries back off up to ``max_backoff_s``
    so a hung Redis costs at most one socket timeout per backoff period.
    """

    def __init__(
        self,
        table: ItemTable,
        client: redis.Redis,
        *,
        interval_s: float = 0.5,
        max_backoff_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self.client = client
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        self._next_at = float("-inf")
        self._failures = 0

    @classmethod
    def from_url(
        cls, table: ItemTable, url: str, *, timeout_s: float = 0.1, **kwargs: Any
    ) -> ItemTableRefresher:
        """Connect lazily to ``url`` with short timeouts and no client-side retries.

        redis-py's default policy retries a failed command 10 times with
        backoff, which would stall a scoring batch for seconds while Redis is
        down; this class does its own spacing instead.
        """
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        return cls(table, client, **kwargs)

    @property
    def healthy(self) -> bool:
        return self._failures == 0

    def maybe_refresh(self) -> int:
        """Refresh if due; returns items changed (0 when not due or on failure)."""
        now = self._clock()
        if now < self._next_at:
            return 0
        try:
            changed = self.table.refresh_from_redis(self.client)
        except redis.RedisError as exc:
            if self._failures == 0:
                log.warning(
                    "item table: Redis unavailable (%s); scoring with %d known items",
                    exc,
                    len(self.table),
                )
            self._failures += 1
            backoff = min(self.interval_s * 2**self._failures, self.max_backoff_s)
            self._next_at = now + backoff
            return 0
        if self._failures:
            log.warning("item table: Redis back after %d failed refreshes", self._failures)
            self._failures = 0
        self._next_at = now + self.interval_s
        return changed

    def catch_up(self) -> int:
        """Read the whole log now (start-up); returns 0 and logs if Redis is down."""
        try:
            changed = self.table.catch_up(self.client)
        except redis.RedisError as exc:
            log.warning("item table: initial load failed (%s); will retry while serving", exc)
            return 0
        self._next_at = self._clock() + self.interval_s
        return changed

    def close(self) -> None:
        self.client.close()
