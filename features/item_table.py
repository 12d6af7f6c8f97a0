"""The ranker's in-memory item-embedding table, kept fresh from Redis.

Requests to the ranker carry item ids, not vectors (DESIGN §6: 250 vectors
would cost ~2 ms on the wire alone), so whoever scores holds every item's
embedding in its own memory.  :class:`ItemTable` is that memory: an id -> row
map over one dense float32 matrix, plus each item's stock flag (the worker's
rules need it; the ranker itself only needs the vectors).

The pure parts (:meth:`ItemTable.upsert`, :meth:`ItemTable.remove`,
:meth:`ItemTable.lookup`, :meth:`ItemTable.apply`, :meth:`ItemTable.apply_changes`,
:class:`ItemChanges`, :func:`coalesce`, :func:`retry_delay`, :func:`parse_log_entries`,
:func:`parse_item_hash`) do no I/O, so they are tested without Redis and an
async refresher in the worker can reuse them.  :func:`read_changes`,
:meth:`ItemTable.refresh_from_redis` and :class:`ItemLogFollower` are the synchronous
I/O used inside Triton.

Inside Triton the reading happens off the scoring path: an :class:`ItemLogFollower`
daemon thread polls ``items:log``, fetches and parses the changed items and prepares
them as :class:`ItemChanges` (unit rows, ready to copy in); ``execute`` calls
:meth:`ItemLogFollower.apply_pending`, which only copies those rows into the table.
The table therefore keeps a single writer, the thread that scores, and needs no lock;
only the hand-over between the two threads is locked.

Redis layout (``features.keys``): the stream ``items:log`` gets one entry
(field ``id``) per item change; the hash ``{i:<id>}`` holds ``emb`` (raw
little-endian float32 bytes, absent for items without text) and ``in_stock``.
A deleted hash means the item left the catalogue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
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


def unit_rows(mat: F32, has: Bools) -> tuple[F32, Bools]:
    """``mat``'s rows scaled to unit length, zero where ``has`` is False; and the new ``has``.

    A zero or non-finite row carries no direction, so it counts as "no embedding".
    """
    norms = np.linalg.norm(mat, axis=1)
    has = has & np.isfinite(norms) & (norms > 0)
    unit = mat / np.where(has, norms, np.float32(1.0))[:, None]
    return np.where(has[:, None], unit, np.float32(0.0)).astype(np.float32, copy=False), has


@dataclass(frozen=True, eq=False)
class ItemChanges:
    """Item changes up to ``last_stream_id``, prepared so applying them is only a row copy.

    Every id appears once, in ``removed`` or in ``ids``; ``embs`` rows (one per id in
    ``ids``) are unit length, zero where ``has_emb`` is False.
    """

    last_stream_id: bytes
    removed: list[str]
    ids: list[str]
    embs: F32
    has_emb: Bools
    in_stock: Bools

    def __len__(self) -> int:
        return len(self.removed) + len(self.ids)

    @classmethod
    def from_records(
        cls,
        last_stream_id: bytes,
        records: Mapping[str, ItemRecord | None],
        dim: int = keys.EMB_DIM,
    ) -> ItemChanges:
        """A record upserts its id, ``None`` removes it."""
        live = [(i, rec) for i, rec in records.items() if rec is not None]
        mat = np.zeros((len(live), dim), dtype=np.float32)
        has = np.zeros(len(live), dtype=np.bool_)
        for k, (_, rec) in enumerate(live):
            if rec.emb is not None:
                mat[k] = rec.emb
                has[k] = True
        unit, has = unit_rows(mat, has)
        return cls(
            last_stream_id=last_stream_id,
            removed=[i for i, rec in records.items() if rec is None],
            ids=[i for i, _ in live],
            embs=unit,
            has_emb=has,
            in_stock=np.fromiter((rec.in_stock for _, rec in live), np.bool_, len(live)),
        )


def coalesce(batches: Sequence[ItemChanges]) -> ItemChanges:
    """One :class:`ItemChanges` with the effect of applying ``batches`` in order.

    The newest word on each id wins, so the result holds at most one row per item
    however many batches went in: what bounds the memory of changes nobody applied yet.
    """
    if not batches:
        raise ValueError("nothing to coalesce")
    if len(batches) == 1:
        return batches[0]
    seen: set[str] = set()
    removed: list[str] = []
    parts: list[tuple[ItemChanges, list[int]]] = []
    for batch in reversed(batches):
        removed += [i for i in batch.removed if i not in seen]
        parts.append((batch, [k for k, i in enumerate(batch.ids) if i not in seen]))
        seen.update(batch.removed)
        seen.update(batch.ids)
    parts.reverse()
    return ItemChanges(
        last_stream_id=batches[-1].last_stream_id,
        removed=removed,
        ids=[batch.ids[k] for batch, keep in parts for k in keep],
        embs=np.concatenate([batch.embs[keep] for batch, keep in parts]),
        has_emb=np.concatenate([batch.has_emb[keep] for batch, keep in parts]),
        in_stock=np.concatenate([batch.in_stock[keep] for batch, keep in parts]),
    )


class ItemTable:
    """id -> row over a float32 matrix ``[n, dim]`` that grows by doubling.

    Removal moves the last row into the freed one, so rows ``0..n-1`` stay
    dense and a lookup is one fancy-index gather.  Not thread-safe: one
    writer and reader at a time (inside Triton, the stub thread that runs
    ``execute``; :class:`ItemLogFollower`'s thread never touches the table).
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
        unit, has = unit_rows(mat, has)
        self._store(ids, unit, has, stock)

    def _store(self, ids: Sequence[str], unit: F32, has: Bools, stock: Bools) -> None:
        """Write prepared rows: ``unit`` already normalised and zero where not ``has``."""
        rows = self._rows_for(ids)
        self._embs[rows] = unit
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
        prepared = ItemChanges.from_records(self.last_stream_id, changes, self.dim)
        self.remove(prepared.removed)
        self._store(prepared.ids, prepared.embs, prepared.has_emb, prepared.in_stock)

    def apply_changes(self, changes: ItemChanges) -> int:
        """Apply prepared changes and move :attr:`last_stream_id`; returns items changed.

        Only copies rows (the normalising happened in :meth:`ItemChanges.from_records`),
        so it is cheap enough for the scoring thread: ~1 ms per thousand items.
        """
        if changes.embs.shape[1:] != (self.dim,):
            raise ValueError(f"changes have dim {changes.embs.shape[1:]}, table has {self.dim}")
        self.remove(changes.removed)
        self._store(changes.ids, changes.embs, changes.has_emb, changes.in_stock)
        self.last_stream_id = changes.last_stream_id
        return len(changes)

    def _rows_for(self, ids: Sequence[str]) -> npt.NDArray[np.int64]:
        """Row of each id, new ids appended; in bulk (a per-id loop cost ~1 µs an item)."""
        index = self._index
        fresh = [i for i in dict.fromkeys(ids) if i not in index]
        if fresh:
            start = len(self._ids)
            self._reserve(start + len(fresh))
            index.update(zip(fresh, range(start, start + len(fresh)), strict=True))
            self._ids.extend(fresh)
        return np.array([index[i] for i in ids], dtype=np.int64).reshape(len(ids))

    def _reserve(self, n: int) -> None:
        """Room for ``n`` rows, doubling at least, so growth stays amortised O(1) a row."""
        capacity = len(self._embs) - 1
        if n <= capacity:
            return
        used = len(self._ids)
        cap = max(2 * capacity, n)
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
        changes, _ = read_changes(
            client, self.last_stream_id, dim=self.dim, max_entries=max_entries, chunk=chunk
        )
        return 0 if changes is None else self.apply_changes(changes)

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


def read_changes(
    client: redis.Redis,
    after: bytes,
    *,
    dim: int = keys.EMB_DIM,
    max_entries: int = 10_000,
    chunk: int = 500,
) -> tuple[ItemChanges | None, bool]:
    """The ``items:log`` entries after ``after``, their items fetched and prepared.

    Returns ``(None, False)`` when nothing is new; the flag is True when the read
    stopped at ``max_entries``, so more are probably waiting.  ``client`` is a
    synchronous client with ``decode_responses=False``.  Raises ``redis.RedisError``.
    """
    entries = stream_entries(client.xread({keys.ITEM_LOG: after}, count=max_entries))
    last_id, changed = parse_log_entries(entries)
    if last_id is None:
        return None, False
    fetched: dict[str, ItemRecord | None] = {}
    for start in range(0, len(changed), chunk):
        part = changed[start : start + chunk]
        pipe = client.pipeline(transaction=False)
        queue_item_reads(pipe, part)
        fetched |= records_from_replies(part, pipe.execute(), dim)
    return ItemChanges.from_records(last_id, fetched, dim), len(entries) >= max_entries


def retry_delay(failures: int, interval_s: float, max_backoff_s: float) -> float:
    """Seconds to wait after ``failures`` failed reads in a row: doubling, capped."""
    return float(min(interval_s * 2**failures, max_backoff_s))


class ItemLogFollower:
    """Follows ``items:log`` on a daemon thread, so scoring never waits on Redis.

    Every ``interval_s`` (at once again when a read came back full) the thread reads
    what changed, prepares it as :class:`ItemChanges` and hands it over; the thread
    that owns the table applies it with :meth:`apply_pending`, which does no I/O.
    Redis failures never leave the thread: the table keeps serving what it has, the
    outage is logged once (and its end once), and retries back off up to
    ``max_backoff_s``.  Changes nobody applies (no traffic) are coalesced once more
    than ``max_pending`` reads wait, so they hold at most one row per item.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        dim: int = keys.EMB_DIM,
        interval_s: float = 0.5,
        max_backoff_s: float = 5.0,
        max_entries: int = 10_000,
        max_pending: int = 16,
    ) -> None:
        if interval_s <= 0 or max_entries < 1 or max_pending < 1:
            raise ValueError("interval_s must be > 0, max_entries and max_pending >= 1")
        self.client = client
        self.dim = dim
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self.max_entries = max_entries
        self.max_pending = max_pending
        self._after = FIRST_STREAM_ID
        self._failures = 0
        self._pending: list[ItemChanges] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 1.0, **kwargs: Any) -> ItemLogFollower:
        """Connect lazily to ``url`` with bounded timeouts and no client-side retries.

        redis-py's default policy retries a failed command 10 times with backoff;
        this class does its own spacing, and a short socket timeout lets
        :meth:`close` stop the thread promptly even when Redis hangs.
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
        return cls(client, **kwargs)

    @property
    def healthy(self) -> bool:
        """False while Redis reads fail."""
        return self._failures == 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        """Item changes read but not applied yet."""
        with self._lock:
            return sum(len(batch) for batch in self._pending)

    def catch_up(self, table: ItemTable) -> int:
        """Load the whole log into ``table`` on the caller's thread (start-up, before
        :meth:`start`); returns items loaded, 0 with a warning if Redis is down."""
        if self._thread is not None:
            raise RuntimeError("catch_up() writes the table itself: call it before start()")
        try:
            changed = table.catch_up(self.client, max_entries=self.max_entries)
        except redis.RedisError as exc:
            log.warning("item table: initial load failed (%s); will retry while serving", exc)
            changed = 0
        self._after = table.last_stream_id
        return changed

    def start(self) -> None:
        """Start following after what :meth:`catch_up` loaded (the log's start without it)."""
        if self._thread is not None:
            raise RuntimeError("the item-log follower is already started")
        self._thread = threading.Thread(target=self._run, name="item-log-follower", daemon=True)
        self._thread.start()

    def apply_pending(self, table: ItemTable) -> int:
        """Apply what the thread has read to ``table``; returns items changed.  No I/O."""
        with self._lock:
            batches, self._pending = self._pending, []
        return sum(table.apply_changes(batch) for batch in batches)

    def poll_once(self) -> float:
        """Read and hand over what is new; returns seconds until the next read."""
        try:
            changes, full = read_changes(
                self.client, self._after, dim=self.dim, max_entries=self.max_entries
            )
        except redis.RedisError as exc:
            if self._failures == 0:
                log.warning(
                    "item table: Redis unavailable (%s); scoring with the items known so far",
                    exc,
                )
            return self._failed()
        except Exception:  # a bug here must not freeze the table without a word
            log.exception("item table: reading items:log failed")
            return self._failed()
        if self._failures:
            log.warning("item table: Redis back after %d failed refreshes", self._failures)
            self._failures = 0
        if changes is not None:
            self._hand_over(changes)
            self._after = changes.last_stream_id
        return 0.0 if full else self.interval_s

    def close(self, timeout_s: float = 2.0) -> bool:
        """Stop the thread, waiting up to ``timeout_s``, and close the connection.

        Returns whether the thread has stopped (it is a daemon: one stuck in a Redis
        call cannot keep the process alive).
        """
        self._stop.set()
        stopped = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            stopped = not self._thread.is_alive()
            if not stopped:
                log.warning("item table: follower thread still busy after %.1f s", timeout_s)
        self.client.close()
        return stopped

    def _run(self) -> None:
        delay = self.interval_s
        while not self._stop.wait(delay):
            delay = self.poll_once()

    def _failed(self) -> float:
        self._failures += 1
        return retry_delay(self._failures, self.interval_s, self.max_backoff_s)

    def _hand_over(self, changes: ItemChanges) -> None:
        with self._lock:
            self._pending.append(changes)
            if len(self._pending) <= self.max_pending:
                return
            backlog, self._pending = self._pending, []
        # Outside the lock, so a scoring call never waits on it; safe because this
        # thread is the only one that adds: meanwhile a taker can only find nothing.
        merged = coalesce(backlog)
        with self._lock:
            self._pending.insert(0, merged)
