"""The GPU path, measured: the trained fused ranker and MiniLM on a GPU, CPU figures beside.

Prints and records, for the device(s) it finds:

* the ranker call — the per-request half of ``fused_ranker`` v2 (``FusedRanker.score``
  on item-cache rows gathered by item number, as ``ranking.serve.LearnedRanker`` does
  inside Triton) — for 1, 16, 64 and 256 users x 100 candidates, history 30: ms per call
  (median, p95), with bf16 (fp16 where bf16 is unsupported) on the GPU and fp32 on the CPU;
* the per-catalogue-change half (``FusedRanker.item_cache`` over a 100,000-item table):
  items per second;
* the BERT item encoder (all-MiniLM-L6-v2, ``ranking.encoder.TextEncoder``) per batch of
  1, 16, 64 and 256 real item texts: ms per batch and items per second;
* how far the GPU's scores are from the CPU's fp32 ones on the same inputs.

It needs only torch, transformers and numpy (no Redis, Kafka, faiss or Triton client), so
it runs on a bare GPU machine with nothing else reachable; ``bench/gpu_check.sh`` prepares
what travels there (the MiniLM weights in fp16, real item texts) and shows the command.
Ranker inputs are random with the served shapes (their values do not change the cost);
the item texts are real (rees46-sample and amazon-gift-cards-2018 titles/descriptions).
Triton itself does not travel: the tritonserver of the nvidia-pytriton wheel and its
backends are larger than what a device call may carry (64 MiB), so on a GPU this measures
the model code Triton runs, not Triton's own overhead (measured on the CPU, see
docs/benchmarks.md).

    python -m bench.gpu_check --cpu --json bench/results/gpu-check-cpu.json   # here
    bash bench/gpu_check.sh                                                   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.report import DATA, REPO_ROOT
from ranking import export
from ranking.encoder import TextEncoder

RANKER = REPO_ROOT / "model_repo" / "fused_ranker" / "2"
BATCHES = (1, 16, 64, 256)
N_CANDIDATES, HISTORY = 100, 30
CATALOGUE = 100_000


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, float]:
    """Median and p95 wall milliseconds of ``fn`` (the GPU synchronised around each call)."""
    for _ in range(3):
        fn()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1000)
    return {
        "ms_p50": round(float(np.median(out)), 3),
        "ms_p95": round(float(np.percentile(out, 95)), 3),
    }


def ranker_on(
    device: torch.device, repeats: int, seed: int
) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """Item-cache throughput and per-call latency of the trained ranker on ``device``."""
    dtype = torch.float32
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    art = export.load(RANKER)
    model: Any = art.model.to(device, dtype).eval()
    with contextlib.suppress(Exception):  # an exotic torch build: eager, as Triton falls back
        model = torch.jit.script(model)
    g = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(CATALOGUE, 384, generator=g), dim=1)
    rows = torch.randint(0, art.config.n_items + 1, (CATALOGUE,), generator=g)
    has = torch.ones(CATALOGUE, dtype=torch.bool)
    text_d = text.to(device, dtype)
    with torch.inference_mode():
        t0 = time.perf_counter()
        cache = [
            torch.cat(parts)
            for parts in zip(
                *(
                    model.item_cache(
                        text_d[s : s + 8192],
                        has[s : s + 8192].to(device),
                        rows[s : s + 8192].to(device),
                    )
                    for s in range(0, CATALOGUE, 8192)
                ),
                strict=True,
            )
        ]
        if device.type == "cuda":
            torch.cuda.synchronize()
        cache_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "item_cache_items_per_s": round(CATALOGUE / cache_s),
        "calls": [],
    }
    scores: dict[int, torch.Tensor] = {}
    for b in BATCHES:
        hist = torch.randint(0, CATALOGUE, (b, HISTORY), generator=g).to(device)
        cand = torch.randint(0, CATALOGUE, (b, N_CANDIDATES), generator=g).to(device)
        types = torch.randint(1, 5, (b, HISTORY), generator=g).to(device)
        ages = (torch.rand(b, HISTORY, generator=g) * 86400).to(device, dtype)
        signals = (torch.rand(b, N_CANDIDATES, 5, generator=g) * 3).to(device, dtype)
        user = torch.nn.functional.normalize(torch.randn(b, 384, generator=g), dim=1)
        user = user.to(device, dtype)
        query = torch.zeros_like(user)

        inputs = (user, query, hist, types, ages, cand, signals)

        def call(inputs: tuple[torch.Tensor, ...] = inputs) -> torch.Tensor:
            user, query, hist, types, ages, cand, signals = inputs
            out: torch.Tensor = model.score(
                user,
                query,
                take(cache[0], hist),
                take(text_d, hist),
                types,
                ages,
                take(cache[0], cand),
                take(cache[1], cand),
                take(cache[2], cand),
                take(text_d, cand),
                signals,
            )
            return out

        with torch.inference_mode():
            row = {"users": b, "candidates": N_CANDIDATES, **timed(call, device, repeats)}
            scores[b] = call().float().cpu()
        row["ms_per_user"] = round(row["ms_p50"] / b, 4)
        result["calls"].append(row)
    return result, scores


def take(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` by item number, shaped like ``idx`` (as Triton's model gathers)."""
    return torch.index_select(table, 0, idx.reshape(-1)).reshape(*idx.shape, -1)


def read_texts(paths: list[Path], n: int) -> list[str]:
    """Real item texts (title | category | brand. description), longest datasets first."""
    texts: list[str] = []
    for path in paths:
        if not path.is_file():
            continue
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                it = json.loads(line)
                parts = [it.get(k) or "" for k in ("title", "category", "brand")]
                text = " | ".join(p for p in parts if p)
                if it.get("description"):
                    text += ". " + str(it["description"])
                if text:
                    texts.append(text)
    if not texts:
        raise SystemExit(
            "no item texts found: pass --texts FILE (items.jsonl[.gz]) or run from a checkout "
            "beside ../shared/data"
        )
    return (texts * (n // len(texts) + 1))[:n]


def encoder_on(
    device: torch.device, texts: list[str], minilm: Path | None, repeats: int
) -> dict[str, Any]:
    enc = TextEncoder.from_pretrained(minilm, device=device)
    rows = []
    for b in BATCHES:
        batch = texts[:b]
        row: dict[str, Any] = {"texts": b, **timed(partial(enc.encode, batch), device, repeats)}
        row["items_per_s"] = round(b / (row["ms_p50"] / 1000))
        rows.append(row)
    return {
        "device": str(device),
        "dtype": str(next(enc.model.parameters()).dtype),
        "batches": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="CPU only (no GPU needed)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--cpu-repeats", type=int, default=10, help="repeats of the CPU figures")
    ap.add_argument("--minilm", type=Path, help="MiniLM folder (default: the wheel's)")
    ap.add_argument("--texts", type=Path, nargs="*", help="items.jsonl[.gz] with real texts")
    ap.add_argument("--threads", type=int, default=1, help="CPU torch threads (Triton: 1)")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = DATA
    texts = read_texts(
        a.texts
        or [
            data / "amazon-gift-cards-2018" / "items.jsonl.gz",
            data / "rees46-sample" / "items.jsonl.gz",
        ],
        max(BATCHES),
    )
    devices = [torch.device("cpu")]
    if not a.cpu and torch.cuda.is_available():
        devices.insert(0, torch.device("cuda"))
    out: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": a.threads,
        "ranker": [],
        "encoder": [],
    }
    reference: dict[int, torch.Tensor] | None = None
    for device in reversed(devices):  # CPU first: its fp32 scores are the reference
        repeats = a.cpu_repeats if device.type == "cpu" else a.repeats
        ranker, scores = ranker_on(device, repeats, seed=0)
        if reference is None:
            reference = scores
        else:
            ranker["max_abs_diff_vs_cpu_fp32"] = round(
                max(float((scores[b] - reference[b]).abs().max()) for b in BATCHES), 5
            )
        out["ranker"].append(ranker)
        out["encoder"].append(encoder_on(device, texts, a.minilm, repeats))
        for row in ranker["calls"]:
            print(
                f"ranker {device.type} {ranker['dtype']}: {row['users']:4d} users x 100: "
                f"{row['ms_p50']:8.3f} ms p50 {row['ms_p95']:8.3f} p95",
                flush=True,
            )
        print(f"item cache {device.type}: {ranker['item_cache_items_per_s']:,} items/s", flush=True)
        for row in out["encoder"][-1]["batches"]:
            print(
                f"encoder {device.type}: {row['texts']:4d} texts: {row['ms_p50']:8.2f} ms p50 "
                f"({row['items_per_s']:,} items/s)",
                flush=True,
            )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
