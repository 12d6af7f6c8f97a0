"""The trained fused ranker (``model_repo/fused_ranker/2``) served by real Triton.

* Triton answers with version 2 and exactly the scores the artefact gives in-process;
* a new version written into the repository is served after a load request, without
  restarting Triton (on a copy of the repository, so the shared one is untouched);
* the worker, on the real stack, records ``fused_ranker@2`` in every recommendation.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis
import tritonclient.grpc.aio as grpc_aio

from features import keys
from features.item_table import ItemTable
from infra.stack import Endpoints, Stack
from ranking.client import RankerClient
from ranking.data import load_catalogue, load_events
from ranking.encoder import TextEncoder
from ranking.fusion import HistoryEvent, RankBatch, RankRow
from ranking.serve import LearnedRanker
from tests.integration.helpers import isolated_settings, settings_env
from tests.stack import stack_settings
from tests.worker import WorkerProcess

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TRAINED = REPO / "model_repo" / "fused_ranker" / "2"
REES = REPO.parent / "shared" / "data" / "rees46-sample"
N_ITEMS = 400


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("repo") / "model_repo"
    shutil.copytree(REPO / "model_repo", dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, repo_copy: Path) -> Iterator[Stack]:
    settings = stack_settings(tmp_path_factory.mktemp("trained-ranker"))
    stack = Stack(settings, model_repo=repo_copy)
    stack.up(("redis", "triton"), timeout_s=300)
    try:
        yield stack
    finally:
        stack.down(wipe=True)


def _urls(stack: Stack) -> Endpoints:
    endpoints = stack.endpoints()
    assert endpoints is not None
    return endpoints


def _triton_pid(stack: Stack) -> object:
    return stack.status()["triton"]["pid"]


@pytest.fixture(scope="module")
def real_items(servers: Stack) -> list[str]:
    """The first N_ITEMS rees46 items that users touch, with real MiniLM vectors, in Redis."""
    cat = load_catalogue(REES)
    events = load_events(REES, cat)
    order = list(dict.fromkeys(events.item.tolist()))[:N_ITEMS]
    ids = [cat.ids[i] for i in order]
    texts = [cat.text[i] for i in order]
    embs = TextEncoder.from_pretrained(device="cpu").encode([t for t in texts if t])
    url = _urls(servers).redis_url
    r = redis.Redis.from_url(url)
    pipe = r.pipeline(transaction=False)
    k = 0
    for item, text in zip(ids, texts, strict=True):
        fields: dict[str, str | bytes] = {"title": "", "in_stock": "1"}
        if text:
            fields["emb"] = embs[k].astype("<f4").tobytes()
            k += 1
        pipe.hset(keys.item(item), mapping=fields)  # type: ignore[arg-type]
        pipe.xadd(keys.ITEM_LOG, {"id": item})
    pipe.execute()
    r.close()
    return ids


@pytest.fixture
async def client(servers: Stack) -> AsyncIterator[RankerClient]:
    c = RankerClient(_urls(servers).triton_url, timeout_s=20.0)
    await c.wait_ready(timeout_s=60)
    yield c
    await c.close()


def _batch(items: list[str]) -> RankBatch:
    rng = np.random.default_rng(3)
    rows = []
    for u in range(6):
        hist = [
            HistoryEvent(items[int(i)], int(t), float(a))
            for i, t, a in zip(
                rng.integers(0, len(items), 5),
                rng.integers(1, 5, 5),
                rng.uniform(0, 3600, 5),
                strict=True,
            )
        ]
        cands = [items[int(i)] for i in rng.choice(len(items), 30, replace=False)] + ["unknown"]
        signals = np.zeros((len(cands), 3), np.float32)
        signals[:, 0] = rng.exponential(1.0, len(cands)) * (rng.random(len(cands)) < 0.3)
        signals[:, 1] = rng.exponential(5.0, len(cands))
        rows.append(RankRow(candidates=cands, signals=signals, history=hist if u else []))
    return RankBatch.from_rows(rows, history_len=50, n_candidates=40)


async def test_triton_serves_the_trained_artefact(
    servers: Stack, client: RankerClient, real_items: list[str]
) -> None:
    await asyncio.sleep(1.0)  # two item-table refresh intervals
    batch = _batch(real_items)
    res = await client.rank(batch)
    assert res.model_version == "2"
    table = ItemTable()
    r = redis.Redis.from_url(_urls(servers).redis_url)
    assert table.catch_up(r) == len(real_items)
    r.close()
    local = LearnedRanker(TRAINED).score(batch, table)
    mask = batch.candidate_mask
    np.testing.assert_allclose(res.scores[mask], local.scores[mask], rtol=1e-4, atol=1e-4)
    assert np.isneginf(res.scores[~mask]).all()
    np.testing.assert_array_equal(res.reasons, local.reasons)
    # A learned ranker, not the fixed fusion: the orders differ from v1's somewhere.
    assert len(np.unique(res.scores[mask])) > mask.sum() // 2


async def test_a_new_version_is_served_without_restarting_triton(
    servers: Stack, client: RankerClient, repo_copy: Path, real_items: list[str]
) -> None:
    pid = _triton_pid(servers)
    shutil.copytree(repo_copy / "fused_ranker" / "2", repo_copy / "fused_ranker" / "3")
    raw = grpc_aio.InferenceServerClient(_urls(servers).triton_url)
    try:
        await raw.load_model("fused_ranker")
    finally:
        await raw.close()
    res = await client.rank(_batch(real_items))
    assert res.model_version == "3"
    assert _triton_pid(servers) == pid


def _shoprec(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_worker_records_the_trained_version(
    stack: Endpoints, data_dir: Path, tmp_path: Path
) -> None:
    settings = isolated_settings(stack, min_emit_interval_ms=0)
    env = {**os.environ, **settings_env(settings)}
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        produced = _shoprec(
            env, "produce", "--data", str(data_dir / "rees46-sample"), "--limit", "300"
        )
        assert produced.returncode == 0, produced.stderr
        tail = _shoprec(
            env, "recs", "tail", "--from-beginning", "--json", "--limit", "120", "--timeout", "240"
        )
        assert tail.returncode == 0, tail.stderr + worker.tail()
    finally:
        worker.close()
    recs = [orjson.loads(line) for line in tail.stdout.splitlines()]
    assert len(recs) == 120, worker.tail()
    assert {r["model"] for r in recs} == {"fused_ranker@2"}, worker.tail()
    # The first triggers may come before the catalogue agent has embedded the items.
    assert sum(1 for r in recs if r["items"]) >= 20, worker.tail()
