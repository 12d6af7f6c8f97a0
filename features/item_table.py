"""The in-memory item table the ranker and the worker keep, fresh from Redis.

Requests to the ranker carry item numbers, not vectors or strings (DESIGN §6: 250
vectors would cost ~2 ms on the wire; 9,600 string ids cost 14 ms to serialise and
parse per 64 users, measured): every item has a number, assigned once in Redis
(``n`` in its hash, :func:`features.catalog.upsert_items`), and whoever scores or
retrieves holds every item's vector in its own memory, in the row of that number.
:class:`ItemTable` is that memory: float32 retrieval vectors (the BERT text embedding,
else the behavioural one of an item without text), text/vector/stock flags, and the
id <-> number maps the worker needs at its edges.

The pure parts (:meth:`ItemTable.upsert`, :meth:`ItemTable.remove`,
:meth:`ItemTable.text`, :meth:`ItemTable.apply`, :meth:`ItemTable.apply_changes`,
:class:`ItemChanges`, :func:`coalesce`, :func:`retry_delay`, :func:`parse_log_entries`,
:func:`parse_item_hash`) do no I/O, so they are tested without Redis and an
async refresher in the worker reuses them.  :func:`read_changes`,
:meth:`ItemTable.refresh_from_redis` and :class:`ItemLogFollower` are the synchronous
I/O used inside Triton.

Inside Triton the reading happens off the scoring path: an :class:`ItemLogFollower`
daemon thread polls ``items:log``, fetches and parses the changed items and prepares
them as :class:`ItemChanges` (unit rows, ready to copy in); ``execute`` calls
:meth:`ItemLogFollower.apply_pending`, which only copies those rows into the table.
The table therefore keeps a single writer, the thread that scores, and needs no lock;
only the hand-over between the two threads is locked.

Redis layout (``features.keys``): the stream ``items:log`` gets one entry
(field ``id``) per item change; the hash ``{i:<id>}`` holds ``n`` (the item's number),
``emb`` (raw little-endian float32 bytes, absent for items without text), ``bemb``
(behavioural vector), ``category`` and ``in_stock``.  A deleted hash means the item left
the catalogue.
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
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

FIRST_STREAM_ID = b"0-0"
_FALSE_WORDS = frozenset({b"", b"0", b"false", b"False", b"FALSE", b"no", b"n"})


@dataclass(frozen=True)
class ItemRecord:
    """What the table keeps per item.

    ``num`` is the item's number (``n`` in its Redis hash, :func:`features.catalog.upsert_items`
    assigns it once and never reuses it): requests to the ranker name items by number, so
    both sides of a call agree without sending strings.  ``emb`` is the BERT text embedding
    (``None`` without text); ``bemb`` the behavioural embedding an item without text gets
    from co-visitation (``features.behavioural``), used for retrieval only.
    """

    emb: F32 | None
    in_stock: bool = True
    num: int = -1
    bemb: F32 | None = None
    category: str | None = None


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

    Every id appears once, in ``removed`` or in ``ids``; ``vecs`` rows (one per id in
    ``ids``) are unit length: the text embedding where ``has_text``, else the behavioural
    one where ``has_vec``, else zero.  ``nums`` are the items' numbers (-1: let the table
    number it, for tables not fed from Redis).
    """

    last_stream_id: bytes
    removed: list[str]
    ids: list[str]
    nums: I64
    vecs: F32
    has_text: Bools
    has_vec: Bools
    in_stock: Bools

    def __len__(self) -> int:
        return len(self.removed) + len(self.ids)

    def split(self, n: int) -> tuple[ItemChanges, ItemChanges]:
        """The first ``n`` changes (removals first) and the rest, to apply in that order."""
        r = min(n, len(self.removed))
        u = max(0, n - r)

        def part(removed: slice, rows: slice) -> ItemChanges:
            return ItemChanges(
                last_stream_id=self.last_stream_id,
                removed=self.removed[removed],
                ids=self.ids[rows],
                nums=self.nums[rows],
                vecs=self.vecs[rows],
                has_text=self.has_text[rows],
                has_vec=self.has_vec[rows],
                in_stock=self.in_stock[rows],
            )

        return part(slice(None, r), slice(None, u)), part(slice(r, None), slice(u, None))

    @classmethod
    def from_records(
        cls,
        last_stream_id: bytes,
        records: Mapping[str, ItemRecord | None],
        dim: int = keys.EMB_DIM,
    ) -> ItemChanges:
        """A record upserts its id, ``None`` removes it."""
        live = [(i, rec) for i, rec in records.items() if rec is not None]
        text = np.zeros((len(live), dim), dtype=np.float32)
        has = np.zeros(len(live), dtype=np.bool_)
        behav = np.zeros((len(live), dim), dtype=np.float32)
        has_b = np.zeros(len(live), dtype=np.bool_)
        for k, (_, rec) in enumerate(live):
            if rec.emb is not None:
                text[k] = rec.emb
                has[k] = True
            elif rec.bemb is not None:
                behav[k] = rec.bemb
                has_b[k] = True
        text, has = unit_rows(text, has)
        behav, has_b = unit_rows(behav, has_b)
        return cls(
            last_stream_id=last_stream_id,
            removed=[i for i, rec in records.items() if rec is None],
            ids=[i for i, _ in live],
            nums=np.fromiter((rec.num for _, rec in live), np.int64, len(live)),
            vecs=np.where(has[:, None], text, behav),
            has_text=has,
            has_vec=has | has_b,
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

    def cat(name: str) -> Any:
        return np.concatenate([getattr(batch, name)[keep] for batch, keep in parts])

    return ItemChanges(
        last_stream_id=batches[-1].last_stream_id,
        removed=removed,
        ids=[batch.ids[k] for batch, keep in parts for k in keep],
        nums=cat("nums"),
        vecs=cat("vecs"),
        has_text=cat("has_text"),
        has_vec=cat("has_vec"),
        in_stock=cat("in_stock"),
    )


class ItemTable:
    """Item number -> row of float32 vectors, stock and text flags; item id <-> number.

    Rows are item numbers, so a request's numbers index the arrays directly (one fancy
    index, no dictionary).  Numbers come from Redis (``ItemRecord.num``); a table fed
    without them (tests, offline tools) numbers items itself.  A removed item's row is
    zeroed and its number is not reused.  The arrays keep one row beyond the highest
    number that stays zero/False forever, so number -1 (padding, unknown) gathers a zero
    row without a masking pass.  Not thread-safe: one writer and reader at a time (inside
    Triton, the thread that runs ``execute``; :class:`ItemLogFollower`'s thread never
    touches the table).
    """

    def __init__(self, dim: int = keys.EMB_DIM, capacity: int = 1024) -> None:
        if dim < 1 or capacity < 1:
            raise ValueError(f"dim and capacity must be >= 1, got {dim}, {capacity}")
        self.dim = dim
        self._index: dict[str, int] = {}
        self._ids: list[str | None] = []  # number -> id (None: a removed item's number)
        self._vecs: F32 = np.zeros((capacity + 1, dim), dtype=np.float32)
        self._has_text: Bools = np.zeros(capacity + 1, dtype=np.bool_)
        self._has_vec: Bools = np.zeros(capacity + 1, dtype=np.bool_)
        self._in_stock: Bools = np.zeros(capacity + 1, dtype=np.bool_)
        self.last_stream_id: bytes = FIRST_STREAM_ID
        """Last ``items:log`` entry applied; the next refresh reads after it."""
        self._changed: list[I64] = []
        self._changed_n = 0

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    @property
    def ids(self) -> list[str]:
        """Ids of the items in the table, by number."""
        return [i for i in self._ids if i is not None]

    @property
    def size(self) -> int:
        """One more than the highest item number ever stored: rows ``0..size-1`` are used."""
        return len(self._ids)

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays (capacity, not just used rows)."""
        arrays = (self._vecs, self._has_text, self._has_vec, self._in_stock)
        return int(sum(a.nbytes for a in arrays))

    # --- writes ---------------------------------------------------------------------

    def upsert(
        self,
        ids: Sequence[str],
        embs: npt.ArrayLike,
        *,
        has_emb: npt.ArrayLike | None = None,
        in_stock: npt.ArrayLike | None = None,
        nums: npt.ArrayLike | None = None,
    ) -> npt.NDArray[np.int64]:
        """Insert or replace ``ids`` with text embeddings ``embs`` ``[len(ids), dim]``.

        Rows are stored L2-normalised, so lookups feed cosines directly.  ``has_emb``
        (default all True) marks rows that are real text embeddings; rows marked False,
        zero or non-finite are stored as zeros.  ``in_stock`` defaults to True; ``nums``
        (default: the table numbers new ids itself).  Returns the items' numbers.
        """
        n = len(ids)
        mat = np.asarray(embs, dtype=np.float32)
        if mat.shape != (n, self.dim):
            raise ValueError(f"embs must have shape ({n}, {self.dim}), got {mat.shape}")
        has = np.ones(n, np.bool_) if has_emb is None else np.asarray(has_emb, np.bool_)
        stock = np.ones(n, np.bool_) if in_stock is None else np.asarray(in_stock, np.bool_)
        numbers = np.full(n, -1, np.int64) if nums is None else np.asarray(nums, np.int64)
        if has.shape != (n,) or stock.shape != (n,) or numbers.shape != (n,):
            raise ValueError(f"has_emb, in_stock and nums must have shape ({n},)")
        unit, has = unit_rows(mat, has)
        return self._store(list(ids), numbers, unit, has, has, stock)

    def _store(
        self, ids: list[str], nums: I64, vecs: F32, has_text: Bools, has_vec: Bools, stock: Bools
    ) -> npt.NDArray[np.int64]:
        """Write prepared rows: ``vecs`` already unit length and zero where not ``has_vec``."""
        rows = self._rows_for(ids, nums)
        self._vecs[rows] = vecs
        self._has_text[rows] = has_text
        self._has_vec[rows] = has_vec
        self._in_stock[rows] = stock
        self._note(rows)
        return rows

    def remove(self, ids: Iterable[str]) -> int:
        """Forget ``ids``; unknown ids are ignored.  Returns how many were removed."""
        gone = []
        for item_id in ids:
            row = self._index.pop(item_id, None)
            if row is not None:
                self._clear(row)
                gone.append(row)
        self._note(np.asarray(gone, np.int64))
        return len(gone)

    def clear(self) -> None:
        """Forget every item: Redis lost the catalogue (see :class:`SeqWatch`), and the
        numbers it hands out next name other items.  The rows keep their place (so
        :attr:`size` does not shrink) and all count as changed: whatever is derived from
        the table drops them.  The next refresh reads ``items:log`` from its start."""
        self._index.clear()
        self._ids = [None] * len(self._ids)
        used = len(self._ids)
        self._vecs[:used] = 0.0
        self._has_text[:used] = self._has_vec[:used] = self._in_stock[:used] = False
        self.last_stream_id = FIRST_STREAM_ID
        self._note(np.arange(used, dtype=np.int64))

    def _clear(self, row: int) -> None:
        self._ids[row] = None
        self._vecs[row] = 0.0
        self._has_text[row] = self._has_vec[row] = self._in_stock[row] = False

    def apply(self, changes: Mapping[str, ItemRecord | None]) -> None:
        """Apply a refresh's result: a record upserts its id, ``None`` removes it."""
        self.apply_changes(ItemChanges.from_records(self.last_stream_id, changes, self.dim))

    def apply_changes(self, changes: ItemChanges) -> int:
        """Apply prepared changes and move :attr:`last_stream_id`; returns items changed.

        Only copies rows (the normalising happened in :meth:`ItemChanges.from_records`),
        so it is cheap enough for the scoring thread: ~1 ms per thousand items.
        """
        if changes.vecs.shape[1:] != (self.dim,):
            raise ValueError(f"changes have dim {changes.vecs.shape[1:]}, table has {self.dim}")
        self.remove(changes.removed)
        self._store(
            changes.ids,
            changes.nums,
            changes.vecs,
            changes.has_text,
            changes.has_vec,
            changes.in_stock,
        )
        self.last_stream_id = changes.last_stream_id
        return len(changes)

    def _note(self, rows: I64) -> None:
        if rows.size:
            self._changed.append(rows)
            self._changed_n += int(rows.size)

    def take_changed(self) -> I64:
        """Numbers of the items changed (added, replaced, removed) since the last call, for
        the one cache derived from this table (the ranker's item projections, a retrieval
        index); many changes come back as every row."""
        parts, self._changed, n = self._changed, [], self._changed_n
        self._changed_n = 0
        if not parts:
            return np.zeros(0, np.int64)
        if n > len(self._ids):
            return np.arange(len(self._ids), dtype=np.int64)
        return np.unique(np.concatenate(parts))

    def _rows_for(self, ids: list[str], nums: I64) -> npt.NDArray[np.int64]:
        """Row (= number) of each id: the given number, else the one it has, else a new one."""
        index = self._index
        out = np.empty(len(ids), np.int64)
        top = int(nums.max(initial=-1))
        self._reserve(max(top + 1, len(self._ids) + len(ids)))
        for k, (item_id, num) in enumerate(zip(ids, nums.tolist(), strict=True)):
            had = index.get(item_id)
            if num < 0:
                num = had if had is not None else len(self._ids)
            elif had is not None and had != num:
                self._clear(had)  # removed and added again: Redis gave it a new number
            if num >= len(self._ids):
                self._ids.extend([None] * (num + 1 - len(self._ids)))
            other = self._ids[num]
            if other is not None and other != item_id and index.get(other) == num:
                # One number names one item: a Redis that lost its data hands numbers out
                # again before a follower notices (SeqWatch) and reloads.
                del index[other]
            self._ids[num] = item_id
            index[item_id] = num
            out[k] = num
        return out

    def _reserve(self, n: int) -> None:
        """Room for rows ``0..n-1``, doubling at least, so growth stays amortised O(1) a row."""
        capacity = len(self._vecs) - 1
        if n <= capacity:
            return
        used = len(self._ids)
        cap = max(2 * capacity, n)
        vecs = np.zeros((cap + 1, self.dim), dtype=np.float32)
        vecs[:used] = self._vecs[:used]
        flags = []
        for old in (self._has_text, self._has_vec, self._in_stock):
            new = np.zeros(cap + 1, dtype=np.bool_)
            new[:used] = old[:used]
            flags.append(new)
        self._vecs = vecs
        self._has_text, self._has_vec, self._in_stock = flags

    # --- reads ----------------------------------------------------------------------

    def rows(self, ids: Sequence[str | bytes]) -> npt.NDArray[np.int64]:
        """Number of each id, -1 where unknown.  Accepts ``bytes`` (as Redis gives)."""
        get = self._index.get
        # A list comprehension beats np.fromiter over a generator here (~20%).
        return np.array(
            [get(i.decode() if isinstance(i, bytes) else i, -1) for i in ids], dtype=np.int64
        ).reshape(len(ids))

    def id_of(self, nums: npt.ArrayLike) -> list[str | None]:
        """The id of each number (None for -1 or a removed item)."""
        ids = self._ids
        top = len(ids)
        return [ids[k] if 0 <= k < top else None for k in np.asarray(nums).ravel().tolist()]

    def _safe(self, nums: npt.ArrayLike) -> I64:
        """Rows for item numbers; -1, and numbers this table has not seen yet (the other
        side of a request may have read the catalogue further), read the zero row."""
        rows = np.asarray(nums, np.int64)
        return np.where((rows >= 0) & (rows < len(self._ids)), rows, -1)

    def text(self, nums: npt.ArrayLike) -> tuple[F32, Bools]:
        """Text embeddings ``[..., dim]`` of item numbers and which are real (-1: none)."""
        rows = self._safe(nums)
        has = self._has_text[rows]
        return self._vecs[rows] * has[..., None], has

    def vectors(self, nums: npt.ArrayLike) -> tuple[F32, Bools]:
        """Retrieval vectors (text, else behavioural) of item numbers and which exist."""
        rows = self._safe(nums)
        return self._vecs[rows], self._has_vec[rows]

    def stock(self, nums: npt.ArrayLike) -> Bools:
        """In-stock flag per item number (unknown: False, nothing to sell)."""
        out: Bools = self._in_stock[self._safe(nums)]
        return out

    def eligible(self) -> Bools:
        """Per number ``0..size-1``: retrieval may return it (a vector, in stock)."""
        n = len(self._ids)
        out: Bools = self._has_vec[:n] & self._in_stock[:n]
        return out

    def matrix(self) -> F32:
        """Retrieval vectors of rows ``0..size-1`` (a view: do not keep it across changes)."""
        return self._vecs[: len(self._ids)]

    def lookup(self, ids: Sequence[str | bytes]) -> tuple[F32, Bools]:
        """Text embeddings ``[len(ids), dim]`` by id, and a mask of which are real.

        Rows are unit length; unknown ids and items without text get a zero row and
        ``False``.
        """
        return self.text(self.rows(ids))

    def in_stock(self, ids: Sequence[str | bytes]) -> Bools:
        """Stock flag per id; unknown ids are False (nothing to sell)."""
        return self.stock(self.rows(ids))

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


def log_after(last_id: bytes) -> bytes:
    """The XRANGE lower bound for the ``items:log`` entries after ``last_id`` (exclusive).

    XRANGE, not XREAD: XREAD's key is "moveable", and redis-py's cluster client asks one
    fixed node (COMMAND GETKEYS) where such a command's key is; once that node died it kept
    asking it, and every read of the log failed until the worker restarted (found killing a
    Redis Cluster primary).  XRANGE's key is its first argument.
    """
    return b"(" + last_id


def log_entries(resp: Any) -> list[tuple[bytes, Mapping[bytes, bytes]]]:
    """The entries of an XRANGE reply (a client with ``decode_responses=False``)."""
    return list(resp or [])


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


ITEM_FIELDS = ("emb", "in_stock", "n", "bemb", "category")
"""The item hash fields an item table reads, in :func:`queue_item_reads`'s order."""


def queue_item_reads(pipe: Any, item_ids: Sequence[str]) -> None:
    """Queue, on a sync or async pipeline, what :func:`records_from_replies` parses:
    one HMGET per item (a hash without ``in_stock`` is not a catalogue item)."""
    for item_id in item_ids:
        pipe.hmget(keys.item(item_id), ITEM_FIELDS)


def records_from_replies(
    item_ids: Sequence[str], replies: Sequence[Any], dim: int = keys.EMB_DIM
) -> dict[str, ItemRecord | None]:
    """Each item's record from the replies to :func:`queue_item_reads`; None = removed."""
    out: dict[str, ItemRecord | None] = {}
    for item_id, fields in zip(item_ids, replies, strict=True):
        out[item_id] = parse_item_hash(*fields, dim=dim, item_id=item_id)
    return out


def parse_item_hash(
    emb: bytes | None,
    in_stock: bytes | None,
    num: bytes | None = None,
    bemb: bytes | None = None,
    category: bytes | None = None,
    *,
    dim: int = keys.EMB_DIM,
    item_id: str = "?",
) -> ItemRecord | None:
    """An item hash's fields (:data:`ITEM_FIELDS`) as an :class:`ItemRecord`; None when the
    hash is not a catalogue item yet or any more.

    A missing or wrongly sized ``emb`` means "no text embedding" (the item
    still ranks by behaviour).  ``in_stock`` is written with every catalogue
    record, so its absence means the item is gone (a late behavioural write
    can leave a hash with ``bemb`` alone).  A hash without ``n`` predates item
    numbers: the worker numbers it (:func:`features.catalog.number_items`) and
    logs it again, and it is read then.
    """
    if in_stock is None or not num:
        return None
    vec = _vector(emb, dim, item_id, "emb")
    behavioural = None if vec is not None else _vector(bemb, dim, item_id, "bemb")
    return ItemRecord(
        emb=vec,
        in_stock=in_stock.strip() not in _FALSE_WORDS,
        num=int(num),
        bemb=behavioural,
        category=category.decode() if category else None,
    )


def _vector(raw: bytes | None, dim: int, item_id: str, field: str) -> F32 | None:
    if raw is None:
        return None
    if len(raw) != 4 * dim:
        log.warning(
            "item %s: %s has %d bytes, expected %d; ignored", item_id, field, len(raw), 4 * dim
        )
        return None
    vec = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(vec)):
        log.warning("item %s: non-finite %s ignored", item_id, field)
        return None
    return vec


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
    entries = log_entries(client.xrange(keys.ITEM_LOG, min=log_after(after), count=max_entries))
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


class SeqWatch:
    """Notices Redis losing the catalogue: ``items:seq``, the count of item numbers handed
    out, never goes down in a Redis that keeps its data.

    A Redis restarted without persistence (or restored from an older snapshot) starts
    numbering at 0 again, and its numbers then name items a follower's table holds at
    those rows: the worker and the ranker would show one item for another.  Every reader
    of ``items:log`` reads the counter before the log and starts over (an empty table,
    the log from its start) when it went down.  Counting down only (not comparing with
    the table) means a log whose numbers disagree with the counter can never make a
    follower reload in a loop.
    """

    def __init__(self) -> None:
        self.seen = -1
        """The counter's last value; -1 before the first read."""

    def went_back(self, reply: bytes | str | int | None) -> bool:
        """Record the counter's value (``GET items:seq``'s reply, None when missing);
        whether it is lower than the value read before it."""
        now = int(reply) if reply is not None else 0
        back = now < self.seen
        self.seen = now
        if back:
            log.warning(
                "item table: items:seq went back to %d (Redis lost its data); "
                "reloading the item table from items:log",
                now,
            )
        return back


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
        self._deferred: list[ItemChanges] = []  # read but held back by apply_pending's limit
        self._seq = SeqWatch()
        self._reset = False  # Redis lost the catalogue: the table starts over
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_url(
        cls, url: str, *, cluster: bool = False, timeout_s: float = 1.0, **kwargs: Any
    ) -> ItemLogFollower:
        """Connect lazily to ``url`` with bounded timeouts and no client-side retries.

        redis-py's default policy retries a failed command 10 times with backoff;
        this class does its own spacing, and a short socket timeout lets
        :meth:`close` stop the thread promptly even when Redis hangs.  ``cluster``:
        ``url`` is a node of a Redis Cluster (``SHOPREC_REDIS_CLUSTER``).
        """
        from features.connection import open_sync_redis

        client = open_sync_redis(url, cluster=cluster, timeout_s=timeout_s, retries=False)
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
            return sum(len(batch) for batch in [*self._deferred, *self._pending])

    def catch_up(self, table: ItemTable) -> int:
        """Load the whole log into ``table`` on the caller's thread (start-up, before
        :meth:`start`); returns items loaded, 0 with a warning if Redis is down."""
        if self._thread is not None:
            raise RuntimeError("catch_up() writes the table itself: call it before start()")
        try:
            self._seq.went_back(self.client.get(keys.ITEM_SEQ))
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

    def apply_pending(self, table: ItemTable, limit: int | None = None) -> int:
        """Apply what the thread has read to ``table``; returns items changed.  No I/O.

        ``limit`` caps the items applied per call (what is left waits for the next call,
        in order), so a catalogue burst is absorbed over several scoring calls instead of
        stalling one: the caller also recomputes whatever it derives from changed rows.
        """
        with self._lock:
            batches, self._pending = self._pending, []
            reset, self._reset = self._reset, False
        if reset:
            self._deferred = []  # read from the Redis that was lost
            table.clear()
        batches = [*self._deferred, *batches]
        self._deferred = []
        applied = 0
        for k, batch in enumerate(batches):
            if limit is not None and applied + len(batch) > limit:
                head, tail = batch.split(limit - applied)
                applied += table.apply_changes(head)
                # Only the applying thread touches _deferred: the follower's own backlog
                # merging (_hand_over) never reorders it behind newer changes.
                self._deferred = [tail, *batches[k + 1 :]]
                break
            applied += table.apply_changes(batch)
        return applied

    def poll_once(self) -> float:
        """Read and hand over what is new; returns seconds until the next read."""
        try:
            if self._seq.went_back(self.client.get(keys.ITEM_SEQ)):
                self._after = FIRST_STREAM_ID
                with self._lock:
                    self._pending, self._reset = [], True
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
