"""Catalogue size in ``shoprec bench``: a catalogue grown to N items, and one loaded while
events stream.

**Grown catalogue** (``shoprec bench --items 10000,100000,1000000``).  After the dataset's
own catalogue has been embedded by ``item_encoder`` as usual (rees46-sample: 6,493 items,
5,657 with text), the benchmark writes copies of the embedded items straight to Redis
through the catalogue's own write path (:func:`features.catalog.upsert_items`: the item
hash with its number ``n``, ``emb``, stock and category, and an ``items:log`` entry) until
the store holds N items.  Copy *j* (counted from 0 over all sizes) is real embedded item
*j mod m* (m of them) under the id ``<id>~c<j div m>``, with every field copied and the
vector *v + 0.05·g*, *g* ~ N(0, I), renormalised: the recipe ``bench/ranker.py`` uses, so
the grown catalogue keeps the real one's clusters (each copy lies about 0.71 in cosine
from its original, in a cloud around it) without duplicate vectors.  Then Triton is restarted, so
``fused_ranker`` loads all N items at ``initialize`` as a server does at start-up and
builds its retrieval index there (faiss IVF at or above
:data:`features.ann.ANN_MIN_ITEMS` eligible items, exact below), and the rates are
measured with fresh workers, which load the N items before they report ready.  The events
stay the dataset's real ones (they name real items).  Per size the JSON gets the items in
the table (loaded from Redis by the same code as Triton's), Triton's and the workers'
memory, Redis's, and the recall@100 of the IVF index against the exact product for real
users' vectors (their rolling embeddings, as the worker left them in Redis).

**A catalogue loaded while events stream** (``shoprec bench --catalog-load 10000``).  At
each offered rate, one worker run streams events for ``--duration`` seconds with nothing
else going on (the baseline), then, while the events go on at the same rate, N new items
with their descriptions are sent to the catalogue topic at once, as a shop pushing a
catalogue does; the events continue until the worker has embedded and stored all N, and
a few seconds more.  Latency, degraded recommendations and ranked events are reported per
window (``before``, ``during``, ``after`` the load, by each event's due time), with the
load's items/s.  The items are the text-rich dataset's (amazon-gift-cards-2018: 805 of its
1,547 items have a description); pass *k* over them sends item ``<id>~L<k>`` with the
title ``<title> (#k)``, so every record is a new item with a text of its own (the worker
encodes each distinct text once per batch: repeated texts would flatter items/s).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from features import keys
from features.ann import ANN_MIN_ITEMS, ExactIndex, IvfIndex, TableIndex
from features.catalog import ITEM_LOG_MAXLEN, upsert_items
from features.connection import open_redis, open_sync_redis
from features.item_table import ItemTable
from features.user_state import Vector, normalise, vector_from_bytes
from infra import procs
from infra.stack import STATE_FILE, Stack, component_of
from ops.produce import dataset_files, read_jsonl
from shoprec.events import CatalogItem
from shoprec.settings import Settings

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

COPY_NOISE = 0.05
GROW_CHUNK = 2_000  # items per upsert_items call (one pipeline)
RELOG_MARGIN = 50_000  # log entries short of the cap at which the real items are relogged
RECALL_K = 100
RECALL_QUERIES = 500
EXACT_CHUNK = 64  # queries per exact product: 64 x 1M scores is 256 MB


# --- growing the catalogue ----------------------------------------------------------------


def derived_vectors(real: F32, start: int, stop: int, seed: int = 0) -> F32:
    """Copies ``start..stop-1``: copy *j* is ``real[j % len(real)] + COPY_NOISE·g``,
    ``g`` ~ N(0, I), renormalised (the same rows for the same arguments)."""
    rng = np.random.default_rng([seed, start])
    src = real[np.arange(start, stop) % len(real)]
    block = src + COPY_NOISE * rng.standard_normal(src.shape, dtype=np.float32)
    out: F32 = (block / np.linalg.norm(block, axis=1, keepdims=True)).astype(np.float32)
    return out


def copy_id(item_id: str, k: int) -> str:
    """The id of the *k*-th copy of a real item (``~`` appears in no dataset's ids)."""
    return f"{item_id}~c{k}"


def copies(real: Sequence[CatalogItem], start: int, stop: int) -> list[CatalogItem]:
    """Copies ``start..stop-1`` of ``real`` (see :func:`derived_vectors`): every field
    copied, a new id."""
    m = len(real)
    return [
        dataclasses.replace(real[j % m], item_id=copy_id(real[j % m].item_id, j // m))
        for j in range(start, stop)
    ]


_ITEM_FIELDS = ("title", "category", "brand", "price", "in_stock", "ts", "emb")


def item_from_hash(item_id: str, raw: Sequence[bytes | None]) -> tuple[CatalogItem, Vector | None]:
    """A stored item (HMGET of :data:`_ITEM_FIELDS`) as the record and vector that
    :func:`features.catalog.upsert_items` would store again unchanged."""
    title, category, brand, price, in_stock, ts, emb = raw

    def text(b: bytes | None) -> str | None:
        return b.decode() if b else None

    item = CatalogItem(
        item_id=item_id,
        title=text(title),
        category=text(category),
        brand=text(brand),
        price=float(price) if price else None,
        in_stock=in_stock == b"1",
        ts=int(ts or 0),
    )
    return item, vector_from_bytes(emb)


@dataclass
class RealCatalogue:
    """The dataset's items as the worker stored them."""

    items: list[CatalogItem]
    vectors: list[Vector | None]

    def embedded(self) -> tuple[list[CatalogItem], F32]:
        keep = [k for k, v in enumerate(self.vectors) if v is not None]
        vecs = np.stack([np.asarray(self.vectors[k], np.float32) for k in keep])
        return [self.items[k] for k in keep], vecs


async def read_real(settings: Settings, data: Path) -> RealCatalogue:
    items_path, _ = dataset_files(data)
    ids = [str(r["item_id"]) for r in read_jsonl(items_path)]
    redis = open_redis(settings.redis_url, cluster=settings.redis_cluster, timeout_s=30)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for item_id in ids:
                pipe.hmget(keys.item(item_id), list(_ITEM_FIELDS))
            replies = await pipe.execute()
    finally:
        await redis.aclose()
    out = RealCatalogue([], [])
    for item_id, raw in zip(ids, replies, strict=True):
        if raw[4] is None:
            continue  # not stored (invalid, or a duplicate id)
        item, vec = item_from_hash(item_id, raw)
        out.items.append(item)
        out.vectors.append(vec)
    return out


async def grow(settings: Settings, real: RealCatalogue, n: int, seed: int = 0) -> dict[str, Any]:
    """Write copies until the store holds ``n`` items.  Near the ``items:log`` cap
    (:data:`features.catalog.ITEM_LOG_MAXLEN` entries, trimmed oldest first) the real items
    are written again as well, so they are among the newest entries: a follower that
    starts later (Triton, a worker) reads only the log, and the events name real items."""
    src_items, src_vecs = real.embedded()
    redis = open_redis(settings.redis_url, cluster=settings.redis_cluster, timeout_s=60)
    began = time.monotonic()
    try:
        stored = int(await redis.get(keys.ITEM_SEQ) or 0)  # numbers handed out so far
        oldest = await _first_log_id(redis)
        first = max(0, stored - len(real.items))  # copies already written
        last = first + max(0, n - stored)
        for start in range(first, last, GROW_CHUNK):
            stop = min(last, start + GROW_CHUNK)
            vecs = derived_vectors(src_vecs, start, stop, seed)
            await upsert_items(redis, copies(src_items, start, stop), list(vecs))
            if (start - first) // GROW_CHUNK % 50 == 0:
                print(
                    f"\r  catalogue: {stored + stop - first:,}/{n:,} items", end="", file=sys.stderr
                )
        wrote_s = time.monotonic() - began
        relog = int(await redis.xlen(keys.ITEM_LOG)) > ITEM_LOG_MAXLEN - RELOG_MARGIN
        for start in range(0, len(real.items) if relog else 0, GROW_CHUNK):
            part = slice(start, start + GROW_CHUNK)
            await upsert_items(redis, real.items[part], real.vectors[part])
        total = int(await redis.get(keys.ITEM_SEQ) or 0)
        log_len = int(await redis.xlen(keys.ITEM_LOG))
        first_now = await _first_log_id(redis)
    finally:
        await redis.aclose()
    print(file=sys.stderr, flush=True)
    return {
        "items_stored": total,
        "copies_written": last - first,
        "write_s": round(wrote_s, 1),
        "write_items_per_s": round((last - first) / wrote_s) if wrote_s > 0 else None,
        "items_log_len": log_len,
        "items_log_maxlen": ITEM_LOG_MAXLEN,
        # Trimmed: the oldest entries are gone, and with them (from every follower that
        # starts now) the items no later entry names.
        "items_log_trimmed": oldest is not None and first_now != oldest,
        "real_items_relogged": relog,
    }


async def _first_log_id(redis: Redis) -> bytes | str | None:
    entries = await redis.xrange(keys.ITEM_LOG, count=1)
    return entries[0][0] if entries else None


# --- Triton: restarted on the grown catalogue, its memory ---------------------------------

_LOADED = re.compile(rb"fused_ranker v(\d+): .*?(\d+) items loaded from Redis")


def items_loaded(log: bytes) -> int | None:
    """Items ``fused_ranker`` reported loading in a Triton log (the last report)."""
    found = _LOADED.findall(log)
    return int(found[-1][1]) if found else None


def _stack_state(settings: Settings) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((settings.stack_dir / STATE_FILE).read_text())
    return state


def triton_roles(settings: Settings) -> list[str]:
    return [r for r in _stack_state(settings)["components"] if component_of(r) == "triton"]


def restart_triton(settings: Settings, model_repo: Path, timeout_s: float) -> dict[str, Any]:
    """Stop and start each Triton of the stack (same ports), so ``fused_ranker`` loads the
    whole catalogue at ``initialize``; seconds to ready and items it reported loading."""
    stack = Stack(settings, model_repo=model_repo)
    out: dict[str, Any] = {}
    for role in triton_roles(settings):
        log = Path(_stack_state(settings)["components"][role]["log"])
        offset = log.stat().st_size if log.exists() else 0
        began = time.monotonic()
        stack.stop_component(role)
        stack.start_component(role, timeout_s=timeout_s)
        with log.open("rb") as fh:
            fh.seek(offset)
            loaded = items_loaded(fh.read())
        out[role] = {"ready_s": round(time.monotonic() - began, 1), "items_loaded": loaded}
    return out


def process_label(cmdline: Sequence[str]) -> str:
    """``fused_ranker@2`` for a python-backend stub (it runs ``<repo>/<model>/<v>/model.py``),
    else the program's name."""
    for arg in cmdline:
        if arg.endswith("/model.py"):
            version = Path(arg).parent
            return f"{version.parent.name}@{version.name}"
    return Path(cmdline[0]).name if cmdline else "?"


def group_rss_mb(pgid: int) -> dict[str, float]:
    """Resident memory of each live process of a process group, by label."""
    out: dict[str, float] = {}
    for pid in procs.group_members(pgid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            label = process_label([a.decode(errors="replace") for a in argv if a])
        except OSError:
            continue  # exited meanwhile
        resident = procs.memory_mb(pid)  # None: exited meanwhile too
        if resident is not None:
            out[label] = round(out.get(label, 0.0) + resident, 1)
    return out


def triton_memory(settings: Settings) -> dict[str, Any]:
    """Triton's resident memory now: the server and its model stubs, and their total."""
    comps = _stack_state(settings)["components"]
    per = {role: group_rss_mb(int(comps[role]["pid"])) for role in triton_roles(settings)}
    return {
        "triton_rss_mb": round(sum(sum(p.values()) for p in per.values()), 1),
        "triton_rss_mb_by_process": per,
    }


# --- retrieval recall at this size ---------------------------------------------------------


def recall_at_k(found: I64, truth: I64) -> float:
    """Mean over query rows of the share of the exact top-k (keys >= 0) that the
    approximate search found too; rows without any exact answer are left out."""
    shares = []
    for f, t in zip(found.tolist(), truth.tolist(), strict=True):
        want = {k for k in t if k >= 0}
        if want:
            shares.append(len(want & {k for k in f if k >= 0}) / len(want))
    return float(np.mean(shares)) if shares else float("nan")


def user_vectors(settings: Settings, n: int, seed: int = 0) -> F32:
    """Up to ``n`` real users' rolling embeddings (``{u:<user>}:emb``), unit length."""
    client = open_sync_redis(settings.redis_url, cluster=settings.redis_cluster, timeout_s=30)
    try:
        names = sorted(client.scan_iter(match=keys.user_emb("*"), count=10_000))
        rng = np.random.default_rng(seed)
        picked = [names[i] for i in rng.permutation(len(names))[: 4 * n]]
        pipe = client.pipeline(transaction=False)
        for name in picked:
            pipe.get(name)
        raw = pipe.execute()
    finally:
        client.close()
    vecs = [normalise(vector_from_bytes(r), keys.EMB_DIM) for r in raw]
    useful = [v for v in vecs if np.any(v)][:n]
    return np.stack(useful) if useful else np.zeros((0, keys.EMB_DIM), np.float32)


def retrieval_recall(settings: Settings, seed: int = 0) -> dict[str, Any]:
    """The table Triton loads (read from Redis by the same code), the index it builds
    from it, and the recall@100 of faiss IVF against the exact product on real users."""
    client = open_sync_redis(settings.redis_url, cluster=settings.redis_cluster, timeout_s=30)
    began = time.monotonic()
    table = ItemTable()
    try:
        table.catch_up(client)
    finally:
        client.close()
    load_s = time.monotonic() - began
    queries = user_vectors(settings, RECALL_QUERIES, seed)
    in_use = TableIndex(table).index()  # Triton's choice: exact below ANN_MIN_ITEMS
    if isinstance(in_use, ExactIndex):
        exact = in_use
    else:
        eligible = np.flatnonzero(table.eligible())
        exact = ExactIndex(table.matrix()[eligible], eligible)
    ivf = in_use if isinstance(in_use, IvfIndex) else None
    began = time.monotonic()
    if ivf is None:
        ivf = IvfIndex(table.dim)
        ivf.build(exact.matrix, exact.keys)
    build_s = time.monotonic() - began
    out: dict[str, Any] = {
        "table_items": len(table),
        "eligible_items": len(exact),
        "table_load_s": round(load_s, 1),
        "index_in_triton": type(in_use).__name__,
        "ann_min_items": ANN_MIN_ITEMS,
        "ivf_lists": IvfIndex.n_lists(len(exact)),
        "ivf_nprobe": ivf.nprobe,
        "ivf_build_s": round(build_s, 1) if isinstance(in_use, ExactIndex) else None,
        "recall_queries": len(queries),
    }
    if len(queries) == 0 or len(exact) == 0:
        return out | {"ivf_recall_at_100": None}
    truth = np.concatenate(
        [
            exact.search(queries[i : i + EXACT_CHUNK], RECALL_K)[0]
            for i in range(0, len(queries), EXACT_CHUNK)
        ]
    )
    began = time.monotonic()
    found = ivf.search(queries, RECALL_K)[0]
    ivf_ms = 1000 * (time.monotonic() - began) / len(queries)
    return out | {
        "ivf_recall_at_100": round(recall_at_k(found, truth), 4),
        "ivf_ms_per_query": round(ivf_ms, 3),
    }


async def redis_memory_mb(settings: Settings) -> float:
    redis = open_redis(settings.redis_url, cluster=settings.redis_cluster)
    try:
        info = await redis.info("memory")
    finally:
        await redis.aclose()
    return round(int(info["used_memory"]) / 2**20, 1)


# --- a catalogue load while events stream --------------------------------------------------


def load_records(items: Iterable[Mapping[str, Any]], n: int) -> list[dict[str, Any]]:
    """``n`` catalogue records cycled from the items that have a description: pass *k*
    sends ``<id>~L<k>`` titled ``<title> (#k)`` (new items, each text distinct)."""
    source = [dict(i) for i in items if i.get("description")]
    if not source and n > 0:
        raise ValueError("no item with a description to load")
    out = []
    for j in range(n):
        item = dict(source[j % len(source)])
        k = j // len(source)
        item["item_id"] = f"{item['item_id']}~L{k}"
        item["title"] = f"{item.get('title') or ''} (#{k})".strip()
        out.append(item)
    return out


def read_load_records(data: Path, n: int) -> list[dict[str, Any]]:
    items_path, _ = dataset_files(data)
    return load_records(read_jsonl(items_path), n)


@dataclass
class LoadReport:
    items: int
    sent_at_ms: float = 0.0  # wall clock: the first record sent
    sent_s: float = 0.0  # to hand every record to the broker
    done_at_ms: float | None = None  # wall clock: the worker had stored them all
    stored: int = 0
    progress: list[tuple[float, int]] = field(default_factory=list)  # (s since sent, stored)

    def summary(self) -> dict[str, Any]:
        took = None if self.done_at_ms is None else (self.done_at_ms - self.sent_at_ms) / 1000
        return {
            "items": self.items,
            "stored": self.stored,
            "finished": self.done_at_ms is not None,
            "seconds": None if took is None else round(took, 1),
            "items_per_s": None if not took else round(self.items / took, 1),
            "send_s": round(self.sent_s, 2),
            "progress": [(round(t, 1), n) for t, n in self.progress],
        }


async def send_and_watch(
    producer: AIOKafkaProducer,
    topic: str,
    records: Sequence[dict[str, Any]],
    stored: Callable[[], int],
    timeout_s: float,
) -> LoadReport:
    """Send ``records`` to the catalogue topic at once, then wait until ``stored()`` (the
    worker's catalogue counter, read in a thread) has grown by as many, or ``timeout_s``."""
    report = LoadReport(len(records))
    base = await asyncio.to_thread(stored)
    report.sent_at_ms = time.time() * 1000
    began = time.monotonic()
    for k, rec in enumerate(records):
        await producer.send(topic, orjson.dumps(rec), key=str(rec["item_id"]).encode())
        if k % 100 == 99:
            await asyncio.sleep(0)  # the events' sender shares this loop
    await producer.flush()
    report.sent_s = time.monotonic() - began
    shown = 0.0
    while time.monotonic() - began < timeout_s:
        report.stored = await asyncio.to_thread(stored) - base
        now = time.monotonic() - began
        if now - shown >= 1.0:
            report.progress.append((now, report.stored))
            print(f"\r  load: {report.stored}/{len(records)} stored", end="", file=sys.stderr)
            shown = now
        if report.stored >= len(records):
            report.done_at_ms = time.time() * 1000
            report.progress.append((now, report.stored))
            break
        await asyncio.sleep(0.25)
    print(file=sys.stderr, flush=True)
    return report


def windows_of(
    due_ms: Sequence[float], values: Sequence[float], bounds: Mapping[str, tuple[float, float]]
) -> dict[str, list[float]]:
    """``values`` split by the window ``[lo, hi)`` their ``due_ms`` falls in."""
    out: dict[str, list[float]] = {name: [] for name in bounds}
    for due, value in zip(due_ms, values, strict=True):
        for name, (lo, hi) in bounds.items():
            if lo <= due < hi:
                out[name].append(value)
                break
    return out


# --- a plot of the size sweep --------------------------------------------------------------


def plot_sizes(sweep: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]], path: Path) -> None:
    """Latency (p50, p99 per rate) and memory (Triton, worker, Redis) against items."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, mem) = plt.subplots(1, 2, figsize=(11, 4.5))
    for rate in sorted({r["offered_rate"] for r in runs}):
        mine = sorted((r for r in runs if r["offered_rate"] == rate), key=lambda r: r["items"])
        xs = [r["items"] for r in mine]
        for q, style in (("p50", "-o"), ("p99", "--o")):
            lat.plot(
                xs, [r["latency_ms"].get(q, np.nan) for r in mine], style, label=f"{rate:.0f}/s {q}"
            )
    lat.set_xscale("log")
    lat.set_yscale("log")
    lat.set_xlabel("catalogue items")
    lat.set_ylabel("event → output latency, ms")
    lat.grid(True, which="both", alpha=0.3)
    lat.legend(fontsize=8)
    xs = [s["items"] for s in sweep]
    for key, label in (
        ("triton_rss_mb", "Triton (server + models)"),
        ("worker_peak_rss_mb", "worker (peak)"),
        ("redis_used_memory_mb", "Redis"),
    ):
        mem.plot(xs, [s.get(key) or np.nan for s in sweep], "-o", label=label)
    mem.set_xscale("log")
    mem.set_xlabel("catalogue items")
    mem.set_ylabel("resident memory, MiB")
    mem.grid(True, which="both", alpha=0.3)
    mem.legend(fontsize=8)
    fig.suptitle("shoprec by catalogue size (2 cores, Triton on CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
