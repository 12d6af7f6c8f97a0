"""Why features/ann.py uses faiss IVF: build time and single-query latency of three libraries.

``python -m bench.ann_choice 100000`` (needs ``pip install hnswlib==0.8.0 usearch==2.26.6``,
which shoprec itself does not depend on) on random unit vectors: build time and latency
at a size where they matter; recall on random 384-d vectors is far below recall on real
embeddings.  ``python -m bench.ann_choice real``: the real BERT item embeddings that
``shoprec bench features`` cached (every dataset's distinct item texts), queried by means
of five real items, as a user's rolling embedding is: recall at each library's setting.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

DIM, K, QUERIES = 384, 100, 200
F32 = npt.NDArray[np.float32]


def vectors(which: str, rng: np.random.Generator) -> tuple[F32, F32]:
    if which == "real":
        cache = Path(__file__).resolve().parents[1] / ".shoprec" / "bench-cache"
        x = np.unique(np.concatenate([np.load(f) for f in sorted(cache.glob("*.npy"))]), axis=0)
        q = x[rng.integers(0, len(x), size=(QUERIES, 5))].mean(axis=1)
    else:
        x = rng.standard_normal((int(which), DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        noise = rng.standard_normal((QUERIES, DIM), dtype=np.float32) / np.sqrt(DIM)
        q = x[rng.choice(len(x), QUERIES)] + 0.5 * noise
    return x.astype(np.float32), (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def main(which: str) -> None:
    rng = np.random.default_rng(0)
    x, q = vectors(which, rng)
    n = len(x)
    truth = [set(r) for r in np.argpartition(-(q @ x.T), K - 1, axis=1)[:, :K]]
    faiss: Any = importlib.import_module("faiss")
    hnswlib: Any = importlib.import_module("hnswlib")
    usearch: Any = importlib.import_module("usearch.index")
    faiss.omp_set_num_threads(2)
    nlist = int(4 * np.sqrt(n))

    def ivf() -> Any:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x[rng.choice(n, min(n, 40 * nlist), replace=False)])
        index.add(x)
        index.nprobe = 32
        return index

    def hnsw() -> Any:
        index = hnswlib.Index(space="ip", dim=DIM)
        index.init_index(max_elements=n, M=16, ef_construction=100)
        index.set_num_threads(2)
        index.add_items(x)
        index.set_ef(200)
        return index

    def us() -> Any:
        index = usearch.Index(
            ndim=DIM, metric="ip", connectivity=16, expansion_add=100, expansion_search=200
        )
        index.add(np.arange(n), x, threads=2)
        return index

    run("faiss IVF-Flat nprobe=32", ivf, lambda ix, v: ix.search(v, K)[1][0], q, truth, n)
    run("hnswlib M=16 ef=200", hnsw, lambda ix, v: ix.knn_query(v, k=K)[0][0], q, truth, n)
    run("usearch M=16 ef=200", us, lambda ix, v: ix.search(v[0], K).keys, q, truth, n)


def run(
    name: str,
    build: Callable[[], Any],
    search: Callable[[Any, F32], Any],
    q: F32,
    truth: list[set[int]],
    n: int,
) -> None:
    t0 = time.perf_counter()
    index = build()
    build_s = time.perf_counter() - t0
    lat, recall = [], []
    for i in range(len(q)):
        t0 = time.perf_counter()
        found = search(index, q[i : i + 1])
        lat.append((time.perf_counter() - t0) * 1000)
        recall.append(len({int(j) for j in found} & truth[i]) / K)
    print(
        f"{name}: n={n:,} build {build_s:.1f} s, p50 {np.percentile(lat, 50):.2f} ms, "
        f"p99 {np.percentile(lat, 99):.2f} ms, recall@{K} vs exact {np.mean(recall):.3f}"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "100000")
