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
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis
import tritonclient.grpc.aio as grpc_aio

from features import keys
from features.ann import TableIndex
from features.item_table import ItemTable
from infra.stack import Endpoints, Stack
from ranking.client import RankerClient
from ranking.data import load_catalogue, load_events
from ranking.encoder import TextEncoder
from ranking.pipeline import RecommendRequest, empty_request, recommend
from ranking.serve import LearnedRanker
from tests.integration.helpers import copy_model_repo, isolated_settings, run_cli, settings_env
from tests.stack import stack_settings
from tests.worker import WorkerProcess

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TRAINED = REPO / "model_repo" / "fused_ranker" / "2"
REES = REPO.parent / "shared" / "data" / "rees46-sample"
N_ITEMS = 400


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_model_repo(tmp_path_factory.mktemp("repo"))


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
    for num, (item, text) in enumerate(zip(ids, texts, strict=True)):
        fields: dict[str, str | bytes] = {"title": "", "in_stock": "1", "n": str(num)}
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


def _request(n_items: int) -> RecommendRequest:
    """Six users with random real histories (one with none) and co-visited items."""
    rng = np.random.default_rng(3)
    b = 6
    hist = rng.integers(0, n_items, (b, 5)).astype(np.int32)
    types = rng.integers(1, 5, (b, 5)).astype(np.int32)
    types[0] = 0
    covis = np.stack([rng.choice(n_items, 12, replace=False) for _ in range(b)]).astype(np.int32)
    emb = rng.standard_normal((b, 384)).astype(np.float32)
    return RecommendRequest(
        **empty_request(b, k=10, n=40).arrays()
        | {
            "user_emb": emb / np.linalg.norm(emb, axis=1, keepdims=True),
            "history": np.where(types > 0, hist, -1).astype(np.int32),
            "history_types": types,
            "history_age_s": rng.uniform(0, 3600, (b, 5)).astype(np.float32),
            "covis": covis,
            "covis_score": np.sort(rng.exponential(1.0, (b, 12)), axis=1)[:, ::-1].astype(
                np.float32
            ),
            "covis_source": np.repeat(hist[:, :1], 12, axis=1),
            "trending": np.tile(np.arange(20, dtype=np.int32), (b, 1)),
            "trending_score": np.tile(np.linspace(50, 1, 20, dtype=np.float32), (b, 1)),
        }
    )


async def test_triton_serves_the_trained_artefact(
    servers: Stack, client: RankerClient, real_items: list[str]
) -> None:
    """Triton's answer is what the artefact gives in-process on the same item table."""
    await asyncio.sleep(1.0)  # two item-table refresh intervals
    request = _request(len(real_items))
    res = await client.recommend(request)
    assert res.model_version == "2"
    table = ItemTable()
    r = redis.Redis.from_url(_urls(servers).redis_url)
    assert table.catch_up(r) == len(real_items)
    r.close()
    ranker = LearnedRanker(TRAINED)
    ranker.sync(table, table.take_changed())
    local = recommend(request, table, TableIndex(table), ranker)
    real = local.items >= 0
    assert real.sum() == 60
    np.testing.assert_array_equal(res.top.items, local.items)
    np.testing.assert_allclose(res.top.scores[real], local.scores[real], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(res.top.reasons, local.reasons)
    # A learned ranker, not the fixed fusion: its scores are logits, not term sums in [0, 4].
    assert len(np.unique(res.top.scores[real])) > real.sum() // 2


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
    res = await client.recommend(_request(len(real_items)))
    assert res.model_version == "3"
    assert _triton_pid(servers) == pid


def _shoprec(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(env, *args, timeout=300)


def test_worker_records_the_trained_version(
    stack: Endpoints, data_dir: Path, tmp_path: Path
) -> None:
    settings = isolated_settings(stack, min_emit_interval_ms=0)
    env = {**os.environ, **settings_env(settings)}
    rees = str(data_dir / "rees46-sample")
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    r = redis.Redis.from_url(stack.redis_url)
    try:
        # The operator's order: the catalogue (the first 400 items cover the first
        # events' items), then events once it is stored.
        stored_before = r.xlen(keys.ITEM_LOG)
        loaded = _shoprec(env, "catalog", "load", "--data", rees, "--limit", "400")
        assert loaded.returncode == 0, loaded.stderr
        deadline = time.monotonic() + 180
        while r.xlen(keys.ITEM_LOG) < stored_before + 400:
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(0.5)
        produced = _shoprec(env, "produce", "--data", rees, "--no-catalog", "--limit", "300")
        assert produced.returncode == 0, produced.stderr
        tail = _shoprec(
            env, "recs", "tail", "--from-beginning", "--json", "--limit", "120", "--timeout", "240"
        )
        assert tail.returncode == 0, tail.stderr + worker.tail()
    finally:
        r.close()
        worker.close()
    recs = [orjson.loads(line) for line in tail.stdout.splitlines()]
    assert len(recs) == 120, worker.tail()
    assert {r["model"] for r in recs} == {"fused_ranker@2"}, worker.tail()
    assert sum(1 for r in recs if r["items"]) >= 100, worker.tail()
