"""Offline data for the ranker: load a dataset, replay it as the worker would, split by time.

The replay (:func:`replay`) walks every event in event-time order and keeps the same
state the online feature store keeps (``features/``): each user's capped history and
rolling embedding (same event weights and half-life), co-visitation pairs (same span,
same 24 h window), hourly popularity.  Right after each user's event group (events of
one user sharing a timestamp: a basket) it snapshots what the worker would send the
ranker at that moment -- a :class:`Query` -- and labels it with the items of the user's
*next* group.  Every feature of a query is therefore computed from events at or before
its trigger time; the label always lies in the future.  Queries are assigned to the
train, validation or test period by the time of their label.

The catalogue is every item of ``items.jsonl.gz`` plus any item seen only in events;
items without text get a zero BERT row and rank from behaviour (co-visitation,
popularity, the model's learned item vectors).
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import logging
import pickle
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt
import orjson
from tqdm import tqdm

from features.candidates import JUST_PURCHASED_MS
from features.decay import (
    COVIS_HALF_LIFE_MS,
    DAY_MS,
    HOUR_MS,
    decayed_value,
    forward_weight,
    window_buckets,
)
from features.keys import EMB_DIM
from features.store import COVIS_SOURCES, COVIS_SPAN, COVIS_WINDOW_MS
from shoprec.errors import DatasetError
from shoprec.events import EVENT_TYPES, EVENT_WEIGHTS, CatalogItem, EventType, event_code
from shoprec.settings import Settings

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

HISTORY_LEN: int = int(Settings.model_fields["history_len"].default)
HALF_LIFE_MS: float = 1000.0 * float(Settings.model_fields["embedding_half_life_s"].default)
RETRIEVAL_K: int = int(Settings.model_fields["n_candidates"].default) // 2
"""Online retrieval takes this many nearest items to the user embedding (recommend.py)."""
COVIS_PER_ITEM = 20
COVIS_WIDE = 200
TRENDING_N = 50
RECENT_SEEN = 5
"""The update script hands co-visitation the user's five latest history entries."""


class Period(IntEnum):
    TRAIN = 0
    VALID = 1
    TEST = 2


@dataclass(frozen=True)
class Catalogue:
    """Items, row ``i`` = ``ids[i]``; ``text`` empty where the shop gave none."""

    ids: list[str]
    text: list[str]

    @property
    def has_text(self) -> npt.NDArray[np.bool_]:
        return np.array([bool(t) for t in self.text], dtype=np.bool_)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Events:
    """Events sorted by time (stable: file order within a timestamp)."""

    user: I64
    item: I64
    type: npt.NDArray[np.int8]
    ts: I64
    n_users: int

    def __len__(self) -> int:
        return int(self.ts.shape[0])


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
    user_emb: F32  # unit length, zeros when the user has no text-bearing event yet
    covis: dict[int, float]
    popularity: dict[int, float]
    retrieval: dict[int, float]
    covis_wide: tuple[I64, F32]
    """Co-visitation over the same sources with ``COVIS_WIDE`` neighbours each (baseline)."""
    targets: list[int] = field(default_factory=list)

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

    def sparse_signals(self) -> tuple[I64, F32]:
        """Items with any non-zero online signal and their ``[k, 3]`` signals."""
        keys = sorted(set(self.covis) | set(self.popularity) | set(self.retrieval))
        sig = np.zeros((len(keys), 3), np.float32)
        for r, k in enumerate(keys):
            sig[r] = (
                self.covis.get(k, 0.0),
                self.popularity.get(k, 0.0),
                self.retrieval.get(k, 0.0),
            )
        return np.asarray(keys, np.int64), sig

    def dense_signals(self, n_items: int) -> F32:
        out = np.zeros((n_items, 3), np.float32)
        keys, sig = self.sparse_signals()
        out[keys] = sig
        return out


@dataclass
class Dataset:
    name: str
    catalogue: Catalogue
    item_emb: F32  # [I, 384], zero rows for items without text
    events: Events
    queries: list[Query]
    cut_ts: tuple[int, int]  # start of validation, start of test (ms)

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
    ids: list[str] = []
    text: list[str] = []
    for rec in _read_jsonl(folder / "items.jsonl.gz"):
        item = CatalogItem(
            item_id=str(rec["item_id"]),
            title=_opt(rec.get("title")),
            description=_opt(rec.get("description")),
            category=_opt(rec.get("category")),
            brand=_opt(rec.get("brand")),
        )
        ids.append(item.item_id)
        text.append(item.text())
    return Catalogue(ids, text)


def _opt(v: object) -> str | None:
    return str(v) if v not in (None, "") else None


def load_events(folder: Path, catalogue: Catalogue) -> Events:
    """Events with an item, in time order; items missing from the catalogue are appended."""
    index = {i: r for r, i in enumerate(catalogue.ids)}
    users: dict[str, int] = {}
    rows: list[tuple[int, int, int, int]] = []
    for rec in _read_jsonl(folder / "events.jsonl.gz"):
        etype, item = str(rec.get("type")), rec.get("item_id")
        if item is None or etype not in EVENT_TYPES or etype == "search":
            continue
        item_id = str(item)
        if item_id not in index:
            index[item_id] = len(catalogue.ids)
            catalogue.ids.append(item_id)
            catalogue.text.append("")
        uid = users.setdefault(str(rec["user_id"]), len(users))
        ts = rec["ts"]
        if not isinstance(ts, int):
            raise DatasetError(f"event {rec.get('event_id')} has a non-integer ts")
        rows.append((ts, uid, index[item_id], event_code(etype)))
    if not rows:
        raise DatasetError(f"{folder} has no item events")
    arr = np.array(rows, dtype=np.int64)
    order = np.argsort(arr[:, 0], kind="stable")
    arr = arr[order]
    return Events(
        user=arr[:, 1],
        item=arr[:, 2],
        type=arr[:, 3].astype(np.int8),
        ts=arr[:, 0],
        n_users=len(users),
    )


def embed_catalogue(catalogue: Catalogue, cache_dir: Path | None) -> F32:
    """MiniLM vectors of every item with text (cached by text digest); zero rows otherwise."""
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
            vecs[s : s + step] = encoder.encode(distinct[s : s + step])
        pos = {t: k for k, t in enumerate(distinct)}
        out[rows] = vecs[[pos[catalogue.text[r]] for r in rows]]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, out)
    return out


# --- splitting and replay --------------------------------------------------------------


def time_cuts(ts: I64, valid_frac: float, test_frac: float) -> tuple[int, int]:
    """Timestamps at which validation and test start, at event-count quantiles."""
    n = ts.shape[0]
    v = int(ts[min(n - 1, int(n * (1.0 - valid_frac - test_frac)))])
    t = int(ts[min(n - 1, int(n * (1.0 - test_frac)))])
    if not v < t:
        raise DatasetError("the dataset's time span is too short to split into three periods")
    return v, t


@dataclass
class _UserState:
    hist: deque[tuple[int, int, int]]  # (item, type, ts), newest last
    emb: F32 | None = None
    ref_ts: int = -1
    pending: Query | None = None


class _Replay:
    """The online state, updated event by event exactly as ``features/`` does it."""

    def __init__(self, ds_emb: F32, has_text: npt.NDArray[np.bool_], history_len: int) -> None:
        self.emb = ds_emb
        self.has_text = has_text
        self.history_len = history_len
        self.users: dict[int, _UserState] = {}
        self.covis: defaultdict[int, defaultdict[int, float]] = defaultdict(_zeros)
        self.pop_hour: defaultdict[int, defaultdict[int, float]] = defaultdict(_zeros)
        self.pop_day: defaultdict[int, defaultdict[int, float]] = defaultdict(_zeros)
        self.text_rows = np.flatnonzero(has_text)
        self.text_matrix = ds_emb[self.text_rows]

    def user(self, u: int) -> _UserState:
        st = self.users.get(u)
        if st is None:
            st = self.users[u] = _UserState(deque(maxlen=self.history_len))
        return st

    def apply(self, u: int, item: int, etype: int, ts: int) -> None:
        st = self.user(u)
        weight = EVENT_WEIGHTS[EventType(etype).label]
        if self.has_text[item]:
            vec = self.emb[item]
            if st.emb is None or st.ref_ts < 0:
                st.emb = vec * weight
            elif ts >= st.ref_ts:
                st.emb = st.emb * 2.0 ** (-(ts - st.ref_ts) / HALF_LIFE_MS) + vec * weight
            else:
                st.emb = st.emb + vec * (weight * 2.0 ** (-(st.ref_ts - ts) / HALF_LIFE_MS))
        st.ref_ts = max(st.ref_ts, ts)
        recent = list(st.hist)[-RECENT_SEEN:][::-1]
        self.pop_hour[ts // HOUR_MS][item] += weight
        self.pop_day[ts // DAY_MS][item] += weight
        seen: list[int] = []
        for other, _, ots in recent:
            if abs(ts - ots) <= COVIS_WINDOW_MS and other != item and other not in seen:
                seen.append(other)
            if len(seen) >= COVIS_SPAN:
                break
        pair = forward_weight(ts)
        for other in seen:
            self.covis[item][other] += pair
            self.covis[other][item] += pair
        st.hist.append((item, etype, ts))

    def snapshot(self, u: int, ts: int) -> Query:
        st = self.users[u]
        hist = list(st.hist)[::-1]
        items = np.array([h[0] for h in hist], np.int64)
        user_emb = np.zeros(self.emb.shape[1], np.float32)
        if st.emb is not None:
            norm = float(np.linalg.norm(st.emb))
            if norm > 0:
                user_emb = (st.emb / norm).astype(np.float32)
        return Query(
            user=u,
            trigger_ts=ts,
            target_ts=-1,
            period=Period.TRAIN,
            hist_items=items,
            hist_types=np.array([h[1] for h in hist], np.int8),
            hist_age_s=np.array([max(0.0, (ts - h[2]) / 1000.0) for h in hist], np.float32),
            user_emb=user_emb,
            covis=self._covis_signal(items, COVIS_PER_ITEM, ts),
            covis_wide=_as_arrays(self._covis_signal(items, COVIS_WIDE, ts)),
            popularity=self._trending(ts),
            retrieval=self._retrieval(user_emb),
        )

    def _covis_signal(self, items: I64, per_item: int, at: int) -> dict[int, float]:
        """Forward-decayed counts read at ``at``, as ``FeatureStore._read_neighbourhood``."""
        sources: list[int] = []
        for i in items.tolist():
            if i not in sources:
                sources.append(i)
                if len(sources) == COVIS_SOURCES:
                    break
        out: dict[int, float] = {}
        for src in sources:
            row = self.covis.get(src)
            if not row:
                continue
            for item, score in _top(row, per_item):
                value = decayed_value(score, at, COVIS_HALF_LIFE_MS)
                out[item] = out.get(item, 0.0) + value
        return out

    def _trending(self, ts: int) -> dict[int, float]:
        """``Popularity.trending()``: trailing hour plus the trailing day's hourly mean."""
        out: dict[int, float] = {}
        for buckets, size, scale in (
            (self.pop_day, DAY_MS, 1.0 / 24.0),
            (self.pop_hour, HOUR_MS, 1.0),
        ):
            now, prev, prev_w = window_buckets(ts, size)
            for b, w in ((now, scale), (prev, scale * prev_w)):
                row = buckets.get(b)
                if row:
                    for item, score in _top(row, TRENDING_N):
                        out[item] = out.get(item, 0.0) + w * score
        return out

    def _retrieval(self, user_emb: F32) -> dict[int, float]:
        if not user_emb.any() or self.text_rows.size == 0:
            return {}
        scores = self.text_matrix @ user_emb
        k = min(RETRIEVAL_K, scores.shape[0])
        top = np.argpartition(-scores, k - 1)[:k]
        return {int(self.text_rows[j]): float(scores[j]) for j in top}


def _zeros() -> defaultdict[int, float]:
    return defaultdict(float)


def _top(row: dict[int, float], n: int) -> list[tuple[int, float]]:
    """The ``n`` largest entries, like ``ZREVRANGE key 0 n-1 WITHSCORES``."""
    return heapq.nlargest(n, row.items(), key=lambda kv: kv[1])


def _as_arrays(sparse: dict[int, float]) -> tuple[I64, F32]:
    return np.fromiter(sparse.keys(), np.int64, len(sparse)), np.fromiter(
        sparse.values(), np.float32, len(sparse)
    )


def replay(
    events: Events,
    item_emb: F32,
    has_text: npt.NDArray[np.bool_],
    cuts: tuple[int, int],
    history_len: int = HISTORY_LEN,
    progress: bool = True,
) -> list[Query]:
    """Replay events in time order; one labelled :class:`Query` per user group with a successor.

    All events of one timestamp are applied before any snapshot of that timestamp, so a
    snapshot sees other users' simultaneous events (never later ones) and a basket is
    one trigger.
    """
    state = _Replay(item_emb, has_text, history_len)
    queries: list[Query] = []
    users, items, types, tss = (
        events.user.tolist(),
        events.item.tolist(),
        events.type.tolist(),
        events.ts.tolist(),
    )
    bar = tqdm(total=len(events), desc="replay", unit="ev", disable=not progress, mininterval=1.0)
    k, n = 0, len(events)
    while k < n:
        ts = tss[k]
        end = k
        groups: dict[int, list[int]] = {}
        while end < n and tss[end] == ts:
            state.apply(users[end], items[end], types[end], ts)
            groups.setdefault(users[end], []).append(items[end])
            end += 1
        for u, group_items in groups.items():
            st = state.users[u]
            if st.pending is not None:
                q = st.pending
                q.target_ts = ts
                q.period = _period(ts, cuts)
                q.targets = list(dict.fromkeys(group_items))
                queries.append(q)
            st.pending = state.snapshot(u, ts)
        bar.update(end - k)
        k = end
    bar.close()
    return queries


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
    history_len: int = HISTORY_LEN,
    progress: bool = True,
) -> Dataset:
    """Everything training and evaluation need from one dataset folder.

    With a ``cache_dir`` the replayed dataset is kept there, keyed by the input files,
    the split, the history length and this module's source, so ``shoprec train`` and
    ``shoprec evaluate`` replay a dataset once.
    """
    cached = _cache_path(folder, cache_dir, (valid_frac, test_frac, history_len))
    if cached is not None and cached.is_file():
        ds: Dataset = pickle.loads(cached.read_bytes())
        return ds
    ds = _build(folder, valid_frac, test_frac, cache_dir, history_len, progress)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(pickle.dumps(ds, protocol=pickle.HIGHEST_PROTOCOL))
    return ds


def _cache_path(folder: Path, cache_dir: Path | None, params: tuple[object, ...]) -> Path | None:
    if cache_dir is None:
        return None
    h = hashlib.sha256(Path(__file__).read_bytes())
    for name in ("events.jsonl.gz", "items.jsonl.gz"):
        st = (folder / name).stat()
        h.update(f"{folder.resolve()}/{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(repr(params).encode())
    return cache_dir / f"dataset-{folder.name}-{h.hexdigest()[:16]}.pkl"


def _build(
    folder: Path,
    valid_frac: float,
    test_frac: float,
    cache_dir: Path | None,
    history_len: int,
    progress: bool,
) -> Dataset:
    catalogue = load_catalogue(folder)
    events = load_events(folder, catalogue)
    item_emb = embed_catalogue(catalogue, cache_dir)
    cuts = time_cuts(events.ts, valid_frac, test_frac)
    queries = replay(events, item_emb, catalogue.has_text, cuts, history_len, progress)
    log.info(
        "dataset %s: %d items (%d with text), %d events, %d users, %d queries",
        folder.name,
        len(catalogue),
        int(catalogue.has_text.sum()),
        len(events),
        events.n_users,
        len(queries),
    )
    return Dataset(folder.name, catalogue, item_emb, events, queries, cuts)
