"""What one ``fused_ranker`` call costs: retrieval, mixing, scoring, top-K, per batch size.

Runs :func:`ranking.pipeline.recommend` in-process, exactly as Triton's python backend
does (same item table, retrieval index, scorer), on real data: the rees46-sample catalogue
with its MiniLM vectors (cached by ``ranking.data``), real users' histories, co-visitation
from the same events, and the shop's trending items.  For a catalogue larger than the
dataset, the real vectors are repeated with a small random rotation per copy (each copy
``v + 0.05·noise``, renormalised), so sizes of 100k and 1M items keep the real vectors'
geometry; ``--items`` picks the size.

    python -m bench.ranker --batches 1,16,64,128,256 --json bench/results/ranker-cpu.json
    python -m bench.ranker --device cuda --model 2   # on a GPU (bf16 or fp16)

Per batch size it prints and records milliseconds per call (p50/p95) and per user, and
the stages: retrieval (the nearest items to each user, exact or IVF), mix (quotas and
filters), score (the ranker over n candidates per user), finish (top-K and explanations).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.report import DATA, REPO_ROOT
from features.ann import TableIndex
from features.item_table import ItemTable
from ranking.data import embed_catalogue, load_catalogue, load_events
from ranking.fusion import FusionScorer
from ranking.pipeline import RecommendRequest, Scorer, candidates, empty_request, recommend
from shoprec.events import EventType
from shoprec.settings import CACHE_DIR

REES46 = DATA / "rees46-sample"
H, C, T, G = 50, 60, 50, 100  # history, co-visitation, category and shop-trending widths


@dataclass
class Setup:
    table: ItemTable
    index: TableIndex
    scorer: Scorer
    requests: dict[int, RecommendRequest]
    about: dict[str, Any]


def scaled_vectors(vectors: npt.NDArray[np.float32], n: int, seed: int) -> npt.NDArray[np.float32]:
    """``n`` rows: the real ones, then noisy copies of them (see the module docstring)."""
    if n <= len(vectors):
        return vectors[:n]
    rng = np.random.default_rng(seed)
    out = np.empty((n, vectors.shape[1]), np.float32)
    out[: len(vectors)] = vectors
    for start in range(len(vectors), n, len(vectors)):
        stop = min(n, start + len(vectors))
        block = vectors[: stop - start] + 0.05 * rng.standard_normal(
            (stop - start, vectors.shape[1]), dtype=np.float32
        )
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def build(data: Path, n_items: int, model: str, batches: list[int], seed: int) -> Setup:
    cat = load_catalogue(data)
    vecs = embed_catalogue(cat, REPO_ROOT / CACHE_DIR)
    has = cat.has_text
    events = load_events(data, cat)
    table = ItemTable()
    n = max(n_items, len(cat))
    ids = cat.ids + [f"{i}~{k}" for k, i in enumerate(cat.ids * (n // len(cat)))][: n - len(cat)]
    real = np.where(has[:, None], vecs, 0).astype(np.float32)
    mat = scaled_vectors(real, n, seed)
    text = np.concatenate([has] * (n // len(cat) + 1))[:n]
    table.upsert(ids, mat, has_emb=text)
    index = TableIndex(table)
    index.changed(table.take_changed())
    scorer: Scorer
    if model == "1":
        scorer = FusionScorer()
    else:
        from ranking.serve import LearnedRanker

        ranked = LearnedRanker(REPO_ROOT / "model_repo" / "fused_ranker" / model)
        ranked.sync(table, table.take_changed())
        scorer = ranked
    rng = np.random.default_rng(seed)
    requests = {b: real_users(events, vecs, has, b, rng) for b in batches}
    about = {
        "dataset": data.name,
        "items": n,
        "items_real": len(cat),
        "index": type(index.index()).__name__,
        "model": f"fused_ranker@{model}",
    }
    return Setup(table, index, scorer, requests, about)


def real_users(
    events: Any, vecs: npt.NDArray[np.float32], has: npt.NDArray[np.bool_], b: int, rng: Any
) -> RecommendRequest:
    """``b`` real users at a real moment: their last events, co-visitation of their last
    item (items the same users touched around it), the shop's most touched items."""
    users = events.user
    items = events.item
    cut = len(events) // 2 + int(rng.integers(0, len(events) // 4))
    seen = items[:cut]
    counts = np.bincount(seen, minlength=len(has))
    shop = np.argsort(-counts)[:G]
    active = np.unique(users[:cut])
    req = empty_request(b, k=10, n=100)
    hist = np.full((b, H), -1, np.int32)
    types = np.zeros((b, H), np.int32)
    ages = np.zeros((b, H), np.float32)
    emb = np.zeros((b, vecs.shape[1]), np.float32)
    covis = np.full((b, C), -1, np.int32)
    for r, u in enumerate(rng.choice(active, b)):
        mine = np.flatnonzero(users[:cut] == u)[::-1][:H]
        hist[r, : len(mine)] = items[mine]
        types[r, : len(mine)] = np.clip(events.type[mine], 1, EventType.PURCHASE)
        ages[r, : len(mine)] = (events.ts[cut - 1] - events.ts[mine]) / 1000.0
        v = vecs[items[mine]][has[items[mine]]].sum(axis=0)
        emb[r] = v / max(float(np.linalg.norm(v)), 1e-9)
        last_users = users[:cut][items[:cut] == items[mine[0]]]
        near = np.unique(items[:cut][np.isin(users[:cut], last_users)])
        near = near[near != items[mine[0]]][:C]
        covis[r, : len(near)] = near
    covis_score = np.where(covis >= 0, 1.0 + rng.random((b, C)), 0).astype(np.float32)
    covis_score = -np.sort(-covis_score, axis=1)
    return RecommendRequest(
        **req.arrays()
        | {
            "user_emb": emb,
            "history": hist,
            "history_types": types,
            "history_age_s": ages,
            "covis": covis,
            "covis_score": covis_score,
            "covis_source": np.repeat(hist[:, :1], C, axis=1),
            "category": np.tile(shop[G - T :].astype(np.int32), (b, 1)),
            "category_score": np.tile(np.linspace(5, 1, T, dtype=np.float32), (b, 1)),
            "trending": np.tile(shop.astype(np.int32), (b, 1)),
            "trending_score": np.tile(counts[shop].astype(np.float32), (b, 1)),
            "in_view": hist[:, :1].copy(),
        }
    )


def time_batch(s: Setup, b: int, repeats: int) -> dict[str, Any]:
    req = s.requests[b]
    recommend(req, s.table, s.index, s.scorer)  # warm
    total: list[float] = []
    stages: dict[str, list[float]] = {"retrieval": [], "mix": [], "score": [], "finish": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        s.index.search(req.user_emb, req.n // 2)
        t1 = time.perf_counter()
        cands = candidates(req, s.table, s.index)  # retrieval again + mixing
        t2 = time.perf_counter()
        s.scorer.score(req, cands, s.table)
        t3 = time.perf_counter()
        recommend(req, s.table, s.index, s.scorer)
        t4 = time.perf_counter()
        whole = t4 - t3
        total.append(whole * 1000)
        stages["retrieval"].append((t1 - t0) * 1000)
        stages["mix"].append((t2 - t1 - (t1 - t0)) * 1000)
        stages["score"].append((t3 - t2) * 1000)
        stages["finish"].append((whole - (t2 - t1) - (t3 - t2)) * 1000)

    def p(xs: list[float], q: int) -> float:
        return round(float(np.percentile(xs, q)), 3)

    return {
        "users": b,
        "ms_p50": p(total, 50),
        "ms_p95": p(total, 95),
        "ms_per_user": round(p(total, 50) / b, 4),
        "stages_ms_p50": {k: p(v, 50) for k, v in stages.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REES46, help="dataset folder (rees46-sample)")
    ap.add_argument("--items", type=int, default=0, help="catalogue size (0: the dataset's)")
    ap.add_argument("--batches", default="1,16,64,128,256", help="users per call")
    ap.add_argument("--model", default="2", help="fused_ranker version: 1 fixed fusion, 2 trained")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (Triton's default: 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    batches = [int(x) for x in a.batches.split(",")]
    s = build(a.data, a.items, a.model, batches, a.seed)
    rows = []
    for b in batches:
        row = time_batch(s, b, a.repeats)
        rows.append(row)
        print(
            f"{b:4d} users: {row['ms_p50']:8.2f} ms p50, {row['ms_p95']:8.2f} p95, "
            f"{row['ms_per_user']:.3f} ms/user  stages {row['stages_ms_p50']}",
            flush=True,
        )
    device = "cpu"
    if hasattr(s.scorer, "device"):
        device = str(s.scorer.device)
    result = {**s.about, "device": device, "threads": a.threads, "runs": rows}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
