"""Offline data for the ranker: load a dataset, replay it through the feature store, split by time.

The replay (:func:`replay`) feeds every event, in event-time order (equal times ordered by
a hash of the event id, :func:`shoprec.events.tie_break`), into the in-memory feature
store (:class:`features.fold.MemoryStore`): the same state the live worker keeps in Redis,
by the same code, held equal to it by a property test (capped histories, rolling
embeddings, co-visitation with its 200-neighbour cap, hourly and daily popularity overall
and per category, behavioural vectors for items without text, refreshed every minute of
event time as the worker refreshes them).  Events of one timestamp are applied as one
batch; right after it, for each user of the batch, the state is read as the worker reads
it (``read_context``: co-visitation of the three latest distinct items, trending overall
and in the user's categories) and the retrieval the worker runs (the 50 items nearest the
user embedding, text or behavioural vectors) is added: a :class:`Query`, labelled with
the items of the user's *next* batch.  Every feature of a query is therefore computed from
events at or before its trigger time; the label always lies in the future.  Queries are
assigned to the train, validation or test period by the time of their label.

The catalogue is every item of ``items.jsonl.gz`` plus any item seen only in events;
items without text get a zero BERT row and rank from behaviour (co-visitation,
popularity, behavioural vectors, the model's learned item vectors).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import orjson
from tqdm import tqdm

from features.ann import ExactIndex
from features.candidates import JUST_PURCHASED_MS, ranked
from features.fold import MemoryStore
from features.item_index import BEHAVIOURAL_CHUNK, BEHAVIOURAL_EVERY_S
from features.keys import EMB_DIM
from features.store import ALWAYS_EMIT, Context, UpdatePolicy, UserUpdate
from shoprec.errors import DatasetError, Interrupted
from shoprec.events import EVENT_TYPES, CatalogItem, EventType, event_code, tie_break
from shoprec.settings import Settings

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

_DEFAULTS = Settings.model_fields
POLICY = UpdatePolicy.of(Settings.model_construct())
"""The worker's update policy under the default settings (``model_construct``: the
defaults, never the environment)."""
HISTORY_LEN: int = POLICY.history_len
RETRIEVAL_K: int = int(_DEFAULTS["n_candidates"].default) // 2
"""Online retrieval takes this many nearest items to the user embedding."""
COVIS_PER_ITEM = 20
"""Neighbours per source item the worker reads (``FeatureStore.read_context``)."""
COVIS_WIDE = 200
"""Neighbours per source item for the co-visitation baseline: all the store keeps."""
TRENDING_N = 50
SOURCE_FILES = ("data.py", "../features/ann.py", "../features/fold.py", "../features/store.py")
"""What the replay's result depends on besides the data (the dataset cache key)."""

Order = Literal["hash", "file"]
"""How events of one timestamp are ordered: by a hash of their id (always, except to
measure what that changes: ``file`` keeps the dataset file's order)."""
Step = Literal["timestamp", "event"]
"""What one step of the replay is: all events of one timestamp (training and the held-out
judgement: a basket is one trigger, labelled with the next basket), or each event alone,
labelled with the user's next event (what the live stream asks: every event gets a list,
and the next event is scored against it; :func:`event_steps`)."""


class Period(IntEnum):
    TRAIN = 0
    VALID = 1
    TEST = 2


@dataclass(frozen=True)
class Catalogue:
    """Items, row ``i`` = ``ids[i]``; ``text`` empty where the shop gave none."""

    ids: list[str]
    text: list[str]
    category: dict[str, str] = field(default_factory=dict)

    @property
    def has_text(self) -> npt.NDArray[np.bool_]:
        return np.array([bool(t) for t in self.text], dtype=np.bool_)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Events:
    """Events in replay order: by time, equal times by :func:`~shoprec.events.tie_break`."""

    user: I64
    item: I64
    type: npt.NDArray[np.int8]
    ts: I64
    n_users: int
    event_ids: list[str] = field(default_factory=list)
    user_ids: list[str] = field(default_factory=list)
    """Original user id of each user number."""

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def subset(self, keep: npt.NDArray[np.bool_] | slice) -> Events:
        """The events selected by a mask or slice, in the same order."""
        idx = np.arange(len(self))[keep]
        return Events(
            self.user[keep],
            self.item[keep],
            self.type[keep],
            self.ts[keep],
            self.n_users,
            [self.event_ids[i] for i in idx.tolist()] if self.event_ids else [],
            self.user_ids,
        )


@dataclass
class Query:
    """What the ranker sees right after a user's trigger event, and what came next."""

    user: int
    trigger_ts: int
    target_ts: int
    period: Period
    hist_items: I64  # newest first, at most HISTORY_LEN
    hist_types: npt.NDArray[np.int8]
    hist_age_s: F32
    user_emb: F32  # unit length, zeros when the user has no event with a vector yet
    signals: tuple[I64, F32]
    """The items with any online signal, ascending, and their ``[k, 3]`` signals
    (:data:`SIGNALS`): arrays, not three dicts per query, which held three quarters of a
    replayed query's memory (19 of 25 kB on uci-online-retail)."""
    covis_wide: tuple[I64, F32]
    """Co-visitation over the same sources with ``COVIS_WIDE`` neighbours each (baseline)."""
    seen: int
    """How many of the dataset's events (in replay order) the state had taken when this
    query was read: the baselines that count events count these.  Not the trigger time:
    in a one-event step, later events of the same timestamp (often the label itself) are
    still to come."""
    targets: list[int] = field(default_factory=list)
    memory: tuple[I64, F32] = field(
        default_factory=lambda: (np.zeros(0, np.int64), np.zeros(0, np.float32))
    )
    """The user's memory (``UserContext.memory``): items, strongest first, and their counts."""
    bought_with: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    """After a purchase: what others bought together with the basket (co-purchase), best
    first, as the worker sends them (``UserContext.bought_with``); empty otherwise."""

    def blocked(self) -> set[int]:
        """Items the worker never shows: bought within a day of the latest event, in view."""
        if not self.hist_items.size:
            return set()
        since_latest = self.hist_age_s - self.hist_age_s.min()
        just = (self.hist_types == EventType.PURCHASE) & (
            since_latest * 1000.0 <= JUST_PURCHASED_MS
        )
        out = {int(i) for i in self.hist_items[just]}
        out.add(int(self.hist_items[0]))
        return out

    def signal(self, name: str) -> dict[int, float]:
        """One online signal (a name of :data:`SIGNALS`) of the items that have it."""
        keys, sig = self.signals
        col = sig[:, SIGNALS.index(name)]
        has = col != 0
        return dict(zip(keys[has].tolist(), col[has].tolist(), strict=True))

    def signals_at(self, items: I64) -> F32:
        """``[len(items), 3]``: the online signals of ``items`` (zeros where none)."""
        keys, sig = self.signals
        out = np.zeros((items.size, len(SIGNALS)), np.float32)
        if keys.size:
            at = np.minimum(np.searchsorted(keys, items), keys.size - 1)
            found = keys[at] == items
            out[found] = sig[at[found]]
        return out

    def dense_signals(self, n_items: int) -> F32:
        out = np.zeros((n_items, len(SIGNALS)), np.float32)
        keys, sig = self.signals
        out[keys] = sig
        return out


SIGNALS = ("covis", "popularity", "retrieval")
"""The online signals a :class:`Query` holds, by column: co-visitation (the worker's
``COVIS_PER_ITEM`` neighbours per source), popularity (the trending list and the user's
categories'), retrieval (the score of the items nearest the user's embedding)."""


def signals_of(
    covis: dict[int, float], popularity: dict[int, float], retrieval: dict[int, float]
) -> tuple[I64, F32]:
    """:attr:`Query.signals` from one dict per signal (item -> value): every item any of
    them names, ascending."""
    by_item = (covis, popularity, retrieval)
    keys = np.asarray(sorted(set().union(*by_item)), np.int64)
    sig = np.zeros((keys.size, len(SIGNALS)), np.float32)
    for c, values in enumerate(by_item):
        if values:
            at = np.searchsorted(keys, np.fromiter(values, np.int64, len(values)))
            sig[at, c] = np.fromiter(values.values(), np.float64, len(values))
    return keys, sig


@dataclass
class Dataset:
    name: str
    catalogue: Catalogue
    item_emb: F32  # [I, 384], zero rows for items without text
    events: Events
    queries: list[Query]
    cut_ts: tuple[int, int]  # start of validation, start of test (ms)
    policy: UpdatePolicy = POLICY
    """How the replay folded the events: the shop's settings where the learner built it."""

    def period(self, p: Period) -> list[Query]:
        return [q for q in self.queries if q.period == p]


# --- loading ---------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[dict[str, object]]:
    if not path.is_file():
        raise DatasetError(
            f"{path} not found: a dataset folder holds events.jsonl.gz and items.jsonl.gz"
        )
    with gzip.open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                yield orjson.loads(line)


def load_catalogue(folder: Path) -> Catalogue:
    return catalogue_of(
        CatalogItem(
            item_id=str(rec["item_id"]),
            title=_opt(rec.get("title")),
            description=_opt(rec.get("description")),
            category=_opt(rec.get("category")),
            brand=_opt(rec.get("brand")),
        )
        for rec in _read_jsonl(folder / "items.jsonl.gz")
    )


def catalogue_of(items: Iterable[CatalogItem]) -> Catalogue:
    """The catalogue of these items, with the text the catalogue agent embeds."""
    ids: list[str] = []
    text: list[str] = []
    category: dict[str, str] = {}
    for item in items:
        ids.append(item.item_id)
        text.append(item.text())
        if item.category:
            category[item.item_id] = item.category
    return Catalogue(ids, text, category)


def _opt(v: object) -> str | None:
    return str(v) if v not in (None, "") else None


def load_events(folder: Path, catalogue: Catalogue, order: Order = "hash") -> Events:
    """The events of a dataset folder with an item, in replay order (:func:`make_events`)."""
    return make_events(load_rows(folder), catalogue, order)


def load_rows(folder: Path) -> list[EventRow]:
    """The events of a dataset folder as the rows the topics give (file order)."""
    rows: list[EventRow] = []
    for n, rec in enumerate(_read_jsonl(folder / "events.jsonl.gz")):
        ts = rec["ts"]
        if not isinstance(ts, int):
            raise DatasetError(f"event {rec.get('event_id')} has a non-integer ts")
        item = rec.get("item_id")
        eid = str(rec.get("event_id") or f"{folder.name}-{n}")
        rows.append(
            (
                eid,
                str(rec.get("type")),
                str(rec["user_id"]),
                None if item is None else str(item),
                ts,
            )
        )
    if not any(r[3] is not None for r in rows):
        raise DatasetError(f"{folder} has no item events")
    return rows


EventRow = tuple[str, str, str, str | None, int]
"""``(event_id, type, user_id, item_id, ts)``: one shop event, from a file or a topic."""


def make_events(rows: Sequence[EventRow], catalogue: Catalogue, order: Order = "hash") -> Events:
    """Events with an item, sorted by time, equal times by :func:`~shoprec.events.tie_break`
    of the event id (``order="file"``: as given); items missing from the catalogue are
    appended to it without text.  Searches carry no item and are left out: the training
    replay has no query embeddings (none of the public datasets has a search)."""
    index = {i: r for r, i in enumerate(catalogue.ids)}
    kept: list[tuple[int, int, str, int, int, str]] = []
    for n, (eid, etype, user_id, item_id, ts) in enumerate(rows):
        if item_id is None or etype not in EVENT_TYPES or etype == "search":
            continue
        if item_id not in index:
            index[item_id] = len(catalogue.ids)
            catalogue.ids.append(item_id)
            catalogue.text.append("")
        tie = tie_break(eid) if order == "hash" else n
        kept.append((ts, tie, user_id, index[item_id], event_code(etype), eid))
    # Ties are 64-bit hashes: sorted as Python ints (numpy's int64 would overflow).
    kept.sort(key=lambda r: (r[0], r[1]))
    # Users are numbered in event order, not in the order the rows were read: the same
    # events read from a topic's partitions in another order get the same numbers, and the
    # bootstrap over users (which draws by user number) the same intervals.
    users: dict[str, int] = {}
    arr = np.array(
        [(r[0], users.setdefault(r[2], len(users)), r[3], r[4]) for r in kept], dtype=np.int64
    ).reshape(-1, 4)
    return Events(
        user=arr[:, 1],
        item=arr[:, 2],
        type=arr[:, 3].astype(np.int8),
        ts=arr[:, 0],
        n_users=len(users),
        event_ids=[r[5] for r in kept],
        user_ids=list(users),
    )


def embed_catalogue(
    catalogue: Catalogue, cache_dir: Path | None, stop: threading.Event | None = None
) -> F32:
    """MiniLM vectors of every item with text (cached by text digest); zero rows otherwise.
    ``stop`` is looked at before every chunk of texts (:class:`Interrupted`)."""
    digest = hashlib.sha256("\n".join(catalogue.text).encode()).hexdigest()[:16]
    cache = cache_dir / f"item-emb-{digest}.npy" if cache_dir else None
    if cache is not None and cache.is_file():
        cached: F32 = np.load(cache)
        return cached
    out = np.zeros((len(catalogue), EMB_DIM), np.float32)
    rows = [r for r, t in enumerate(catalogue.text) if t]
    if rows:
        from ranking.encoder import TextEncoder

        encoder = TextEncoder.from_pretrained()
        distinct = sorted({catalogue.text[r] for r in rows})
        vecs = np.zeros((len(distinct), EMB_DIM), np.float32)
        step = 512
        for s in tqdm(range(0, len(distinct), step), desc="BERT item texts", unit="chunk"):
            Interrupted.check(stop, "embedding the catalogue")
            vecs[s : s + step] = encoder.encode(distinct[s : s + step])
        pos = {t: k for k, t in enumerate(distinct)}
        out[rows] = vecs[[pos[catalogue.text[r]] for r in rows]]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, out)
    return out


# --- splitting and replay --------------------------------------------------------------


def time_cuts(ts: I64, valid_frac: float, test_frac: float, origin: int = 0) -> tuple[int, int]:
    """Timestamps at which validation and test start, at event-count quantiles.

    ``origin`` k > 0 is a rolling origin: every period moves k test windows back in time,
    so origin k's test period ends where origin k-1's begins (:func:`origin_end`).
    """
    end = 1.0 - origin * test_frac
    if origin < 0 or end - valid_frac - test_frac <= 0.0:
        raise DatasetError(
            f"origin {origin}: {origin} test windows of {test_frac:.0%} back in time leave "
            f"no training period before a {valid_frac:.0%} validation period"
        )
    v, t = _quantile_ts(ts, end - valid_frac - test_frac), _quantile_ts(ts, end - test_frac)
    if not v < t:
        raise DatasetError("the dataset's time span is too short to split into three periods")
    return v, t


def origin_end(ts: I64, test_frac: float, origin: int) -> int | None:
    """The timestamp at which rolling origin ``origin``'s test period ends (None: never,
    the latest origin's test period runs to the last event)."""
    return _quantile_ts(ts, 1.0 - origin * test_frac) if origin > 0 else None


def _quantile_ts(ts: I64, q: float) -> int:
    n = ts.shape[0]
    return int(ts[min(n - 1, int(n * q))])


class _Replay:
    """The live feature state, in memory, plus the retrieval the worker runs."""

    def __init__(
        self,
        catalogue: Catalogue,
        item_emb: F32,
        policy: UpdatePolicy,
        item_ids: Sequence[str],
    ) -> None:
        self.catalogue = catalogue
        self.emb = item_emb
        self.has_text = catalogue.has_text
        self.policy = policy
        self.item_ids = item_ids
        self.row = {i: r for r, i in enumerate(catalogue.ids)}
        self.store = MemoryStore(policy, category_of=catalogue.category.get)
        self.textless = [i for i, t in zip(catalogue.ids, self.has_text, strict=True) if not t]
        self._cursor = 0
        self._next_behavioural = -1
        self._build_retrieval()

    def vector(self, item_id: str) -> F32 | None:
        """``ItemIndex.vector``: the text embedding, else the behavioural one."""
        r = self.row[item_id]
        return self.emb[r] if self.has_text[r] else self.store.behavioural.get(item_id)

    def text_vector(self, item_id: str) -> F32 | None:
        r = self.row.get(item_id)
        return self.emb[r] if r is not None and self.has_text[r] else None

    def _build_retrieval(self) -> None:
        # Rows ascending, as the worker's index holds item numbers ascending, so that
        # exact_top_k gives tied scores to the same items in training as in serving.
        behavioural = np.asarray([self.row[i] for i in self.store.behavioural], np.int64)
        rows = np.sort(np.concatenate([np.flatnonzero(self.has_text), behavioural]))
        matrix = np.zeros((rows.size, self.emb.shape[1]), np.float32)
        text = self.has_text[rows]
        matrix[text] = self.emb[rows[text]]
        for j in np.flatnonzero(~text):
            matrix[j] = self.store.behavioural[self.catalogue.ids[rows[j]]]
        self.retrieval = ExactIndex(matrix, rows)

    def apply(
        self,
        users: Sequence[int],
        items: Sequence[int],
        types: Sequence[int],
        event_ids: Sequence[str],
        ts: int,
    ) -> None:
        """One batch of events (one timestamp) into the store."""
        if ts >= self._next_behavioural and self.textless:
            # ItemIndex.maybe_refresh: a slice of the items without text every minute.
            ids = self.textless
            start = self._cursor % len(ids)
            chunk = (ids[start:] + ids[:start])[:BEHAVIOURAL_CHUNK]
            self._cursor = start + BEHAVIOURAL_CHUNK
            if self.store.refresh_behavioural(chunk, self.text_vector, lambda _: True):
                self._build_retrieval()
            self._next_behavioural = ts + int(1000 * BEHAVIOURAL_EVERY_S)
        updates = []
        for u, i, t, eid in zip(users, items, types, event_ids, strict=True):
            label = EventType(t).label
            item_id = self.catalogue.ids[i]
            updates.append(
                UserUpdate(
                    eid,
                    self.item_ids[u],
                    label,
                    ts,
                    item_id,
                    self.vector(item_id),
                    label in ALWAYS_EMIT,
                )
            )
        self.store.apply_events(updates)

    def snapshots(self, users: Sequence[int], ts: int, seen: int) -> list[Query]:
        """What the worker would read and retrieve for ``users`` right after ``ts``, the
        first ``seen`` events applied."""
        names = [self.item_ids[u] for u in users]
        at = dict.fromkeys(names, ts)
        wide, narrow = self.store.read_contexts(
            names, at, covis_per_item=(COVIS_WIDE, COVIS_PER_ITEM), trending_n=TRENDING_N
        )
        embs = np.stack([wide.users[n].embedding for n in names])
        retrieved = self._retrieve(embs)
        return [
            self._query(u, ts, seen, wide, narrow, n, found)
            for u, n, found in zip(users, names, retrieved, strict=True)
        ]

    def _retrieve(self, embs: F32) -> list[dict[int, float]]:
        out: list[dict[int, float]] = [{} for _ in range(embs.shape[0])]
        known = np.flatnonzero(np.abs(embs).sum(axis=1) > 0)
        if known.size == 0 or len(self.retrieval) == 0:
            return out
        found, scores = self.retrieval.search(embs[known], RETRIEVAL_K)
        for r, keys, row_scores in zip(known.tolist(), found, scores, strict=True):
            out[r] = {
                int(key): float(score)
                for key, score in zip(keys.tolist(), row_scores.tolist(), strict=True)
                if key >= 0
            }
        return out

    def _query(
        self,
        u: int,
        ts: int,
        seen: int,
        wide: Context,
        narrow: Context,
        name: str,
        retrieval: dict[int, float],
    ) -> Query:
        ctx = narrow.users[name]
        row = self.row
        hist = ctx.history
        popularity = {row[i]: v for i, v in ctx.category_trending.items()}
        popularity |= {row[i]: v for i, v in narrow.trending.items()}
        covis_wide = wide.users[name].covis
        return Query(
            user=u,
            trigger_ts=ts,
            target_ts=-1,
            period=Period.TRAIN,
            hist_items=np.array([row[h.item_id] for h in hist], np.int64),
            hist_types=np.array([event_code(h.type) for h in hist], np.int8),
            hist_age_s=np.array([max(0.0, (ts - h.ts) / 1000.0) for h in hist], np.float32),
            user_emb=ctx.embedding.astype(np.float32),
            signals=signals_of({row[i]: v for i, v in ctx.covis.items()}, popularity, retrieval),
            covis_wide=(
                np.fromiter((row[i] for i in covis_wide), np.int64, len(covis_wide)),
                np.fromiter(covis_wide.values(), np.float32, len(covis_wide)),
            ),
            seen=seen,
            memory=(
                np.fromiter((row[i] for i in ctx.memory), np.int64, len(ctx.memory)),
                np.fromiter(ctx.memory.values(), np.float32, len(ctx.memory)),
            ),
            bought_with=np.array([row[i] for i in ranked(ctx.bought_with)], np.int64),
        )


def replay(
    events: Events,
    catalogue: Catalogue,
    item_emb: F32,
    cuts: tuple[int, int],
    policy: UpdatePolicy = POLICY,
    progress: bool = True,
    step: Step = "timestamp",
    labels_in: Period | None = None,
    stop: threading.Event | None = None,
    only: frozenset[int] | None = None,
) -> list[Query]:
    """Replay events in order; one labelled :class:`Query` per user batch with a successor.

    By ``step="timestamp"``, all events of one timestamp are applied as one batch before
    any snapshot of that timestamp, so a snapshot sees other users' simultaneous events
    (never later ones) and a basket is one trigger.  By ``step="event"``, each event is
    applied and snapshotted alone, in replay order, as the live worker meets them.
    ``labels_in`` keeps only the queries whose label falls in that period, and skips the
    snapshots (most of the replay's time) of every other step.  ``stop`` is looked at
    before every step (:class:`Interrupted`): a learner asked to stop does not replay a
    large shop to the end first.  ``only`` (by ``step="event"``): snapshot only the steps of
    these event indices (:func:`event_steps` samples them before the replay).
    """
    state = _Replay(catalogue, item_emb, policy, events.user_ids)
    queries: list[Query] = []
    pending: dict[int, Query] = {}
    users, items, types, tss = (
        events.user.tolist(),
        events.item.tolist(),
        events.type.tolist(),
        events.ts.tolist(),
    )
    if only is not None and step != "event":
        raise ValueError("only= picks single events: it needs step='event'")
    # Each event's user's next event time (-1 for none): whether a step's label falls in
    # ``labels_in`` is known before its snapshot is taken.
    after = next_event_index(events)
    next_ts = np.where(after >= 0, events.ts[after], -1)
    bar = tqdm(total=len(events), desc="replay", unit="ev", disable=not progress, mininterval=1.0)
    k, n = 0, len(events)
    while k < n:
        Interrupted.check(stop, "replaying the events")
        ts = tss[k]
        end = k
        while end < n and tss[end] == ts and (step == "timestamp" or end == k):
            end += 1
        state.apply(users[k:end], items[k:end], types[k:end], events.event_ids[k:end], ts)
        groups: dict[int, list[int]] = {}
        last: dict[int, int] = {}
        for j in range(k, end):
            groups.setdefault(users[j], []).append(items[j])
            last[users[j]] = j
        for u, group_items in groups.items():
            q = pending.pop(u, None)
            if q is not None:
                q.target_ts = ts
                q.period = _period(ts, cuts)
                q.targets = list(dict.fromkeys(group_items))
                queries.append(q)
        wanted = [
            u
            for u, j in last.items()
            if (
                labels_in is None
                or (next_ts[j] >= 0 and _period(int(next_ts[j]), cuts) == labels_in)
            )
            and (only is None or j in only)
        ]
        for q in state.snapshots(wanted, ts, end) if wanted else []:
            pending[q.user] = q
        bar.update(end - k)
        k = end
    bar.close()
    return queries


def next_event_index(events: Events) -> I64:
    """Each event's user's next event, by index in ``events`` (-1: the user's last)."""
    by_user = np.argsort(events.user, kind="stable")
    same = events.user[by_user[1:]] == events.user[by_user[:-1]]
    after = np.full(len(events), -1, np.int64)
    after[by_user[:-1][same]] = by_user[1:][same]
    return after


def sample_positions(n: int, limit: int | None, seed: int) -> list[int]:
    """Which of ``n`` things a fixed random sample of at most ``limit`` keeps, ascending
    (all when ``limit`` is None)."""
    if limit is None or n <= limit:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=limit, replace=False).tolist())


def event_steps(
    ds: Dataset,
    period: Period,
    progress: bool = False,
    stop: threading.Event | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Query]:
    """``ds``'s events replayed one event per step (:data:`Step`), the queries whose label
    falls in ``period``: each labelled with the user's next event's item.

    The live stream's task, offline: the learner judges a candidate on it beside the
    basket steps, because the two can disagree (``ops.learn.decide`` says where).  A label
    equal to the item in view is never scored (``Query.blocked``), as the stream scores
    new items only.  ``stop``: as :func:`replay`.

    ``limit``: at most that many queries, the very ones ``ranking.evaluate.sample_queries``
    would keep of all of them with ``seed``, sampled before the replay so that only their
    snapshots are taken (the snapshots are most of its time: on uci-online-retail's first
    50,000 events, 5,000 of them took 36 s where the 1,500 kept take 11).  The replay
    returns a query when its label comes, so their order is their labels' order.
    """
    only = None
    if limit is not None:
        after = next_event_index(ds.events)
        labelled = np.flatnonzero(after >= 0)
        labelled = labelled[
            [_period(int(t), ds.cut_ts) == period for t in ds.events.ts[after[labelled]].tolist()]
        ]
        in_order = labelled[np.argsort(after[labelled], kind="stable")]
        only = frozenset(in_order[sample_positions(len(in_order), limit, seed)].tolist())
    return replay(
        ds.events,
        ds.catalogue,
        ds.item_emb,
        ds.cut_ts,
        ds.policy,
        progress,
        "event",
        period,
        stop,
        only,
    )


def _period(ts: int, cuts: tuple[int, int]) -> Period:
    if ts < cuts[0]:
        return Period.TRAIN
    return Period.VALID if ts < cuts[1] else Period.TEST


def load_dataset(
    folder: Path,
    *,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    cache_dir: Path | None = None,
    order: Order = "hash",
    progress: bool = True,
    origin: int = 0,
) -> Dataset:
    """Everything training and evaluation need from one dataset folder.

    With a ``cache_dir`` the replayed dataset is kept there, keyed by the input files,
    the split, the order and the replay's source (:data:`SOURCE_FILES`), so ``shoprec
    train`` and ``shoprec evaluate`` replay a dataset once.  ``origin``: as in
    :func:`build_dataset`.
    """
    cached = _cache_path(folder, cache_dir, (valid_frac, test_frac, order, origin))
    if cached is not None and cached.is_file():
        ds: Dataset = pickle.loads(cached.read_bytes())
        return ds
    catalogue = load_catalogue(folder)
    events = load_events(folder, catalogue, order)
    item_emb = embed_catalogue(catalogue, cache_dir)
    ds = build_dataset(
        folder.name, catalogue, events, item_emb, valid_frac, test_frac, progress, origin=origin
    )
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(pickle.dumps(ds, protocol=pickle.HIGHEST_PROTOCOL))
    return ds


def _cache_path(folder: Path, cache_dir: Path | None, params: tuple[object, ...]) -> Path | None:
    if cache_dir is None:
        return None
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for source in SOURCE_FILES:
        h.update((here / source).read_bytes())
    for name in ("events.jsonl.gz", "items.jsonl.gz"):
        st = (folder / name).stat()
        h.update(f"{folder.resolve()}/{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(repr(params).encode())
    return cache_dir / f"dataset-{folder.name}-{h.hexdigest()[:16]}.pkl"


def build_dataset(
    name: str,
    catalogue: Catalogue,
    events: Events,
    item_emb: F32,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    progress: bool = True,
    policy: UpdatePolicy = POLICY,
    origin: int = 0,
    stop: threading.Event | None = None,
) -> Dataset:
    """Split ``events`` by time and replay them into labelled queries, folded as ``policy``
    folds them (a shop's own settings: ``UpdatePolicy.of``).

    ``origin`` k > 0 evaluates as if the data ended k test windows earlier: the events from
    :func:`origin_end` on are dropped before the replay, so no feature and no label sees
    them, and the periods are :func:`time_cuts`' for that origin.  Several origins give
    disjoint test periods back to back (rolling-origin evaluation, ``shoprec evaluate
    --origins``) and so more test users on a small shop.  ``stop``: as :func:`replay`.
    """
    cuts = time_cuts(events.ts, valid_frac, test_frac, origin)
    end = origin_end(events.ts, test_frac, origin)
    if end is not None:
        events = events.subset(events.ts < end)
    queries = replay(events, catalogue, item_emb, cuts, policy, progress, stop=stop)
    log.info(
        "dataset %s: %d items (%d with text), %d events, %d users, %d queries",
        name,
        len(catalogue),
        int(catalogue.has_text.sum()),
        len(events),
        events.n_users,
        len(queries),
    )
    return Dataset(name, catalogue, item_emb, events, queries, cuts, policy)
