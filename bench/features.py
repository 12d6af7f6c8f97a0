"""`shoprec bench features`: the feature store and candidate retrieval, on real data and Redis.

For each dataset in ``../shared/data`` the benchmark

1. embeds the catalogue with the real BERT encoder (in-process, the same code
   Triton runs; cached under ``.shoprec/bench-cache``), writes it to Redis with
   the catalogue writer and loads the worker's item index from ``items:log``;
2. replays the training period (all events before the last ``--test-share``
   of them, by event time) through ``FeatureStore.apply_events`` — the worker's
   write path, Lua script included — in micro-batches, and reports events/s;
3. computes behavioural embeddings for items without text;
4. walks the held-out period in event order, applying every event, and for a
   sample of them asks, from the state just before the event: is the event's
   item among the top 100 of each candidate source (semantic, co-visitation,
   category trending, trending) and of the mix the recommender uses?  Targets
   equal to the item in view are not counted (the rules never show it);
5. measures the memory of sampled users' keys with ``MEMORY USAGE``.

Retrieval latency at 10 thousand and 1 million items is measured on random
unit vectors, because no catalogue here has a million items; they are used
for latency only (random vectors are the hardest case for an IVF index, so its
recall on them is a floor, not an estimate).  The IVF index's recall against
the exact product is measured on the real item embeddings of every dataset.
Redis is started privately on a free port through ``infra``.
"""

from __future__ import annotations

import asyncio
import hashlib
import platform
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import numpy.typing as npt

from bench.report import DATA, REPO_ROOT, say, write_results

DATASETS = ("uci-online-retail", "amazon-gift-cards-2018", "rees46-sample", "otto-sample")
SOURCES = ("semantic", "covis", "category", "trending", "mix")
K = 100
BATCH = 256
DEFAULT_DATA_ROOT = DATA
CACHE_DIR = REPO_ROOT / ".shoprec" / "bench-cache"


@dataclass(frozen=True, slots=True)
class FeatureBenchOptions:
    data_root: Path
    datasets: Sequence[str]
    sizes: Sequence[int]
    test_share: float = 0.2
    eval_events: int = 3000
    memory_users: int = 500
    queries: int = 200
    seed: int = 0


@dataclass(slots=True)
class Hits:
    """Recall bookkeeping per source, overall and for users with one earlier event."""

    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    cold_hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    n: int = 0
    cold_n: int = 0
    same_as_in_view: int = 0
    no_history: int = 0
    retrieval_ms: list[float] = field(default_factory=list)

    def add(self, found: dict[str, bool], cold: bool) -> None:
        self.n += 1
        self.cold_n += cold
        for s, hit in found.items():
            self.hits[s] += hit
            if cold:
                self.cold_hits[s] += hit

    def summary(self) -> dict[str, Any]:
        def rate(h: dict[str, int], n: int) -> dict[str, float | None]:
            return {s: (round(h[s] / n, 4) if n else None) for s in SOURCES}

        return {
            "evaluated": self.n,
            "recall_at_100": rate(self.hits, self.n),
            "cold_users_evaluated": self.cold_n,
            "cold_recall_at_100": rate(self.cold_hits, self.cold_n),
            "skipped_same_item_as_in_view": self.same_as_in_view,
            "skipped_user_without_history": self.no_history,
            "mix_retrieval_ms": percentiles(self.retrieval_ms),
        }


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    a = np.asarray(values)
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
    }


# --- data ---------------------------------------------------------------------------------


def read_dataset(folder: Path) -> tuple[list[Any], list[dict[str, Any]]]:
    from ops.produce import dataset_files, read_jsonl
    from shoprec.events import CatalogItem, tie_break

    items_path, events_path = dataset_files(folder)
    fields = set(CatalogItem.__dataclass_fields__)
    items = [
        CatalogItem(**{k: v for k, v in r.items() if k in fields}) for r in read_jsonl(items_path)
    ]
    events = [e for e in read_jsonl(events_path) if e.get("item_id")]
    events.sort(key=lambda e: (e["ts"], tie_break(str(e["event_id"]))))
    return items, events


def embed_catalogue(name: str, texts: Sequence[str]) -> npt.NDArray[np.float32]:
    """BERT vectors of the distinct non-empty texts, cached by their content."""
    distinct = sorted({t for t in texts if t})
    digest = hashlib.sha256("\n".join(distinct).encode()).hexdigest()[:16]
    cache = CACHE_DIR / f"{name}-{digest}.npy"
    if distinct and cache.is_file():
        table = np.load(cache)
    elif distinct:
        import torch

        from ranking.encoder import TextEncoder

        torch.set_num_threads(2)
        say(f"  embedding {len(distinct):,} distinct item texts with MiniLM (cached after)")
        encoder = TextEncoder.from_pretrained(device="cpu")
        table = np.concatenate(
            [
                encoder.encode(distinct[i : i + 512])
                for i in _progress(range(0, len(distinct), 512), "BERT")
            ]
        )
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        np.save(cache, table)
    else:
        table = np.zeros((0, 384), np.float32)
    row = {t: i for i, t in enumerate(distinct)}
    out = np.zeros((len(texts), 384), np.float32)
    for i, t in enumerate(texts):
        if t:
            out[i] = table[row[t]]
    return out


def _progress(it: Any, desc: str, total: int | None = None) -> Any:
    from tqdm import tqdm

    return tqdm(it, desc=f"  {desc}", total=total, file=sys.stderr, leave=False, mininterval=1.0)


# --- one dataset ------------------------------------------------------------------------


async def bench_dataset(redis_url: str, folder: Path, opts: FeatureBenchOptions) -> dict[str, Any]:
    from features.catalog import upsert_items
    from features.connection import open_redis
    from features.item_index import ItemIndex
    from features.store import FeatureStore
    from ranking.data import POLICY

    items, events = read_dataset(folder)
    texts = [it.text() for it in items]
    vectors = embed_catalogue(folder.name, texts)
    redis = open_redis(redis_url)
    await redis.flushdb()
    for start in range(0, len(items), 1000):
        part = slice(start, start + 1000)
        await upsert_items(
            redis,
            items[part],
            [v if t else None for v, t in zip(vectors[part], texts[part], strict=True)],
        )
    index = ItemIndex(redis)
    await index.refresh()
    policy = POLICY  # the worker's defaults, the user's memory included
    store = FeatureStore(
        redis, policy, category_of=index.category, query_categories=index.categories_near
    )

    # The held-out period starts at the event that leaves test_share of the events after it
    # (a share of the time span would be skewed by a few stray timestamps, as in rees46).
    split_ts = events[int(len(events) * (1 - opts.test_share))]["ts"]
    train = [e for e in events if e["ts"] < split_ts]
    test = [e for e in events if e["ts"] >= split_ts]
    say(
        f"  {len(items):,} items ({sum(1 for t in texts if t):,} with text), "
        f"{len(train):,} training events, {len(test):,} held out"
    )

    t0 = time.perf_counter()
    for start in _progress(range(0, len(train), BATCH), "replay", total=-(-len(train) // BATCH)):
        await store.apply_events(updates_of(train[start : start + BATCH], index))
    replay_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    behavioural = await index.refresh_behavioural()
    await index.refresh()
    behavioural_s = time.perf_counter() - t0

    hits = await evaluate(store, index, test, opts)
    memory = await user_memory(redis, {e["user_id"] for e in train}, opts)
    await redis.aclose()
    return {
        "items": len(items),
        "items_with_text": sum(1 for t in texts if t),
        "items_with_behavioural_embedding": behavioural,
        "behavioural_refresh_s": round(behavioural_s, 3),
        "train_events": len(train),
        "test_events": len(test),
        "split_ts": split_ts,
        "feature_update": {
            "events": len(train),
            "seconds": round(replay_s, 2),
            "events_per_s": round(len(train) / replay_s) if replay_s else None,
            "batch": BATCH,
        },
        **hits.summary(),
        "memory": memory,
    }


def updates_of(events: Sequence[dict[str, Any]], index: Any) -> list[Any]:
    from features.store import UserUpdate

    return [
        UserUpdate(
            event_id=e["event_id"],
            user_id=e["user_id"],
            type=e["type"],
            ts=e["ts"],
            item_id=e["item_id"],
            vector=index.vector(e["item_id"]),
            always_emit=e["type"] == "purchase",
        )
        for e in events
    ]


async def evaluate(
    store: Any, index: Any, test: Sequence[dict[str, Any]], opts: FeatureBenchOptions
) -> Hits:
    """Walk the held-out events in order; score a sample from the state just before each."""
    rng = random.Random(opts.seed)
    sampled = set(rng.sample(range(len(test)), min(opts.eval_events, len(test))))
    hits = Hits()
    pending: list[dict[str, Any]] = []
    for i, event in enumerate(_progress(test, "held-out")):
        if i in sampled:
            if pending:
                await store.apply_events(updates_of(pending, index))
                pending = []
            await score_event(store, index, event, hits)
        pending.append(event)
        if len(pending) >= BATCH:
            await store.apply_events(updates_of(pending, index))
            pending = []
    if pending:
        await store.apply_events(updates_of(pending, index))
    return hits


async def score_event(store: Any, index: Any, event: dict[str, Any], hits: Hits) -> None:
    from features.candidates import blocked, ranked
    from ranking.pipeline import candidates
    from shoprec.events import ShopEvent
    from streams.recommend import RecommendPolicy, build_request

    user, target = event["user_id"], event["item_id"]
    ctx = await store.read_context([user], {user: event["ts"]}, covis_per_item=40, trending_n=2 * K)
    u = ctx.users[user]
    if not u.history:
        hits.no_history += 1
        return
    in_view = u.history[0].item_id
    if target == in_view:
        hits.same_as_in_view += 1
        return
    # The request the worker would send for the user's latest event, mixed by the
    # ranker's own candidate step (retrieval n/2, quotas, filters).
    latest = ShopEvent("bench", u.history[0].type, user, event["ts"], item_id=in_view)
    request = build_request([latest], [u], ctx.trending, index.table, RecommendPolicy(K, K, 50, 0))
    t0 = time.perf_counter()
    mixed = candidates(request, index.table, index.retrieval)
    hits.retrieval_ms.append((time.perf_counter() - t0) * 1000)
    no = blocked(
        request.history.astype(np.int64),
        request.history_types,
        request.history_age_s,
        request.in_view[:, 0].astype(np.int64),
    )[0]
    blocked_ids = {i for i in index.table.id_of(no[no >= 0]) if i}

    def top(items: Sequence[str]) -> list[str]:
        return [i for i in items if i not in blocked_ids and index.in_stock(i)][:K]

    lists = {
        "semantic": top([i for i, _ in index.nearest(u.embedding[None, :], K)[0]]),
        "covis": top(ranked(u.covis)),
        "category": top(ranked(u.category_trending)),
        "trending": top(ranked(ctx.trending)),
        "mix": [i for i in index.table.id_of(mixed.items[0][mixed.items[0] >= 0]) if i],
    }
    cold = len({h.item_id for h in u.history}) == 1
    hits.add({s: target in lists[s] for s in SOURCES}, cold)


async def user_memory(redis: Any, users: set[str], opts: FeatureBenchOptions) -> dict[str, Any]:
    """Bytes of each sampled user's keys by MEMORY USAGE (exact: SAMPLES 0)."""
    from features import keys

    sample = random.Random(opts.seed).sample(sorted(users), min(opts.memory_users, len(users)))
    per_key: dict[str, list[int]] = {}
    totals: list[int] = []
    for user in sample:
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys.user_keys(user):
                pipe.memory_usage(key, samples=0)
            sizes = await pipe.execute()
        total = 0
        for key, size in zip(keys.user_keys(user), sizes, strict=True):
            suffix = key.rsplit(":", 1)[-1]
            per_key.setdefault(suffix, []).append(int(size or 0))
            total += int(size or 0)
        totals.append(total)
    mean = float(np.mean(totals)) if totals else 0.0
    return {
        "users_sampled": len(sample),
        "bytes_per_user_mean": round(mean),
        "bytes_per_user_p99": round(float(np.percentile(totals, 99))) if totals else None,
        "bytes_per_key_mean": {k: round(float(np.mean(v))) for k, v in per_key.items()},
        "gib_per_million_users": round(mean * 1e6 / 2**30, 2),
    }


# --- retrieval latency and ANN recall --------------------------------------------------


def latency_at(n: int, opts: FeatureBenchOptions) -> dict[str, Any]:
    """Single-user top-100 latency, exact and IVF, over ``n`` random unit vectors (latency only)."""
    from features.ann import ExactIndex, IvfIndex

    rng = np.random.default_rng(opts.seed)
    matrix = np.empty((n, 384), np.float32)
    for start in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - start), 384), dtype=np.float32)
        matrix[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    queries = rng.standard_normal((opts.queries, 384), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    out: dict[str, Any] = {"items": n, "vectors": "random unit (latency only)"}
    exact = ExactIndex(matrix, ids)
    out["exact"] = time_queries(exact, queries)
    t0 = time.perf_counter()
    ivf = IvfIndex(384)
    ivf.build(matrix, ids)
    out["ivf"] = {
        "build_s": round(time.perf_counter() - t0, 2),
        "nprobe": ivf.nprobe,
        "lists": IvfIndex.n_lists(n),
        **time_queries(ivf, queries),
    }
    t0 = time.perf_counter()
    fresh = rng.standard_normal((100, 384), dtype=np.float32)
    ivf.upsert(np.arange(n, n + 100), fresh / np.linalg.norm(fresh, axis=1, keepdims=True))
    out["ivf"]["upsert_100_items_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    return out


def time_queries(index: Any, queries: npt.NDArray[np.float32]) -> dict[str, Any]:
    index.search(queries[:1], K)  # warm caches
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None, :], K)
        lat.append((time.perf_counter() - t0) * 1000)
    return {"latency_ms": percentiles(lat)}


def ivf_recall_on_real(opts: FeatureBenchOptions) -> dict[str, Any]:
    """IVF top-100 against the exact top-100 over the real item embeddings of every dataset."""
    from features.ann import ExactIndex, IvfIndex

    rows = []
    for name in opts.datasets:
        items, _ = read_dataset(opts.data_root / name)
        texts = [it.text() for it in items]
        vecs = embed_catalogue(name, texts)
        rows.append(vecs[[bool(t) for t in texts]])
    matrix = np.concatenate(rows)
    ids = np.arange(len(matrix), dtype=np.int64)
    rng = np.random.default_rng(opts.seed)
    # Queries: means of a few real items, as a user's rolling embedding is.
    picks = rng.integers(0, len(matrix), size=(opts.queries, 5))
    queries = matrix[picks].mean(axis=1)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = [set(r.tolist()) for r in ExactIndex(matrix, ids).search(queries, K)[0]]
    out: dict[str, Any] = {"items": len(matrix), "lists": IvfIndex.n_lists(len(matrix))}
    for nprobe in (8, 32, 64):
        ivf = IvfIndex(384, nprobe=nprobe)
        ivf.build(matrix, ids)
        found = ivf.search(queries, K)[0]
        out[f"nprobe_{nprobe}"] = round(
            float(
                np.mean([len(set(f.tolist()) & t) / K for f, t in zip(found, truth, strict=True)])
            ),
            4,
        )
    return out


# --- orchestration ------------------------------------------------------------------------


@contextmanager
def private_redis() -> Iterator[str]:
    from infra import procs
    from infra.redis_server import RedisServer

    with tempfile.TemporaryDirectory(prefix="shoprec-bench-redis-") as tmp:
        server = RedisServer(Path(tmp), procs.free_port())
        proc = server.start()
        try:
            procs.wait_until(server.ready, 20, "redis", server.log_path, proc=proc)
            yield server.url
        finally:
            procs.stop(proc)


def run_feature_bench(opts: FeatureBenchOptions) -> dict[str, Any]:
    result: dict[str, Any] = {
        "benchmark": "features",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "k": K,
        "test_share": opts.test_share,
        "datasets": {},
    }
    with private_redis() as url:
        for name in opts.datasets:
            say(f"{name}:")
            result["datasets"][name] = asyncio.run(bench_dataset(url, opts.data_root / name, opts))
            say("  " + one_line(result["datasets"][name]))
    say("IVF recall against exact on the real item embeddings")
    result["ivf_recall_real"] = ivf_recall_on_real(opts)
    result["retrieval_latency"] = []
    for n in opts.sizes:
        say(f"retrieval latency at {n:,} items (random unit vectors)")
        result["retrieval_latency"].append(latency_at(n, opts))
    return result


def one_line(d: dict[str, Any]) -> str:
    r = d["recall_at_100"]
    return (
        f"{d['feature_update']['events_per_s']:,} events/s; recall@100 "
        + ", ".join(f"{s} {r[s]}" for s in SOURCES)
        + f"; {d['memory']['bytes_per_user_mean']:,} B/user"
    )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(result["datasets"])
    width = 0.8 / len(SOURCES)
    for j, s in enumerate(SOURCES):
        ys = [result["datasets"][n]["recall_at_100"][s] or 0.0 for n in names]
        ax1.bar(np.arange(len(names)) + j * width, ys, width, label=s)
    ax1.set_xticks(np.arange(len(names)) + 0.4 - width / 2, [n.split("-")[0] for n in names])
    ax1.set_ylabel("recall@100 (next real event, held-out period)")
    ax1.legend(fontsize=8)
    sizes = [r["items"] for r in result["retrieval_latency"]]
    for kind, colour in (("exact", "tab:blue"), ("ivf", "tab:orange")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ys = [r[kind]["latency_ms"][q] for r in result["retrieval_latency"]]
            ax2.plot(sizes, ys, style, color=colour, label=f"{kind} {q}")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("items in the index")
    ax2.set_ylabel("top-100 for one user, ms")
    ax2.legend(fontsize=8)
    fig.suptitle(f"shoprec features, {result['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _int_list(value: str) -> list[int]:
    try:
        return [int(float(v)) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None


@click.command("features")
@click.option(
    "--data-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=DEFAULT_DATA_ROOT,
    show_default=True,
    help="Folder holding the dataset folders (canonical items.jsonl.gz + events.jsonl.gz).",
)
@click.option(
    "--datasets",
    default=",".join(DATASETS),
    show_default=True,
    help="Comma-separated dataset folder names to measure.",
)
@click.option(
    "--sizes",
    default="10000,1000000",
    show_default=True,
    help="Catalogue sizes for the retrieval-latency measurement (random unit vectors).",
)
@click.option(
    "--test-share",
    default=0.2,
    show_default=True,
    help="Held-out last share of each dataset's time span.",
)
@click.option(
    "--eval-events",
    default=3000,
    show_default=True,
    help="Held-out events scored per dataset (a sample; all are applied).",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the results here, and a plot beside it (.png).",
)
def features_command(
    data_root: Path,
    datasets: str,
    sizes: str,
    test_share: float,
    eval_events: int,
    json_out: Path | None,
) -> None:
    """Measure the feature store and candidate retrieval on real data and a private Redis.

    Reports feature-update throughput (the worker's write path, replaying each
    dataset's training period), recall@100 of each candidate source and of the
    mix against each user's next real event in the held-out period (also for
    users with a single earlier item: cold start), Redis memory per user, the IVF
    index's recall on the real item embeddings, and top-100 retrieval latency
    (exact and IVF) at each --sizes (random vectors: latency only).  Takes a few
    minutes on 2 cores; progress goes to stderr.

    \b
    Examples:
      shoprec bench features --json bench/results/features.json
      shoprec bench features --datasets rees46-sample --sizes 10000
    """
    from shoprec.errors import ShoprecError

    opts = FeatureBenchOptions(
        data_root=data_root,
        datasets=[d for d in datasets.split(",") if d],
        sizes=_int_list(sizes),
        test_share=test_share,
        eval_events=eval_events,
    )
    try:
        result = run_feature_bench(opts)
    except ShoprecError as exc:
        raise click.ClickException(str(exc)) from exc
    for name, d in result["datasets"].items():
        click.echo(f"{name}: {one_line(d)}")
    for r in result["retrieval_latency"]:
        click.echo(
            f"{r['items']:,} items: exact {r['exact']['latency_ms']} ms, "
            f"ivf {r['ivf']['latency_ms']} ms"
        )
    if json_out is not None:
        write_results(result, json_out, plot)
        click.echo(f"wrote {json_out} and {json_out.with_suffix('.png')}")
