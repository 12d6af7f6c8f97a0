"""``model_repo/`` served by a real tritonserver (from the nvidia-pytriton wheel) and Redis.

Self-contained on purpose: the servers are started here, on OS-assigned
loopback ports, following ``../shared/notes/triton-on-cpu.md``, so these
tests check the model repository and ``ranking.client`` without the stack
package.  Start-up takes ~10-15 s on 2 cores.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
import tritonclient.grpc.aio as grpc_aio
from tritonclient.utils import InferenceServerException

from features import keys
from infra import procs
from infra.stack import Stack
from ranking.client import HistoryEvent, RankBatch, RankerClient, RankRow, Reason
from ranking.encoder import TextEncoder
from shoprec.errors import RankerUnavailable
from shoprec.events import EventType
from tests.stack import stack_settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MODEL_REPO = REPO / "model_repo"
MODELS = ("item_encoder", "fused_ranker")
H, N = 6, 8


# --- servers: the project's own stack, Redis and Triton only ---------------------------


@dataclass
class Servers:
    stack: Stack
    redis_url: str
    triton_url: str
    triton_log: Path


def _fixed_fusion_repo(factory: pytest.TempPathFactory) -> Path:
    """The repository with ``fused_ranker`` held at v1, the fixed fusion these tests check.

    Triton serves only the newest version; the trained ones are tested in
    ``test_trained_ranker.py``.
    """
    dst = factory.mktemp("repo-v1") / "model_repo"
    shutil.copytree(MODEL_REPO, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for version in (dst / "fused_ranker").iterdir():
        if version.is_dir() and version.name.isdigit() and version.name != "1":
            shutil.rmtree(version)
    return dst


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    settings = stack_settings(tmp_path_factory.mktemp("triton-models"))
    stack = Stack(settings, model_repo=_fixed_fusion_repo(tmp_path_factory))
    endpoints = stack.up(("redis", "triton"), timeout_s=300)
    try:
        log = Path(stack.status()["triton"]["log"])
        yield Servers(stack, endpoints.redis_url, endpoints.triton_url, log)
    finally:
        stack.down(wipe=True)


@pytest.fixture
async def client(servers: Servers) -> AsyncIterator[RankerClient]:
    c = RankerClient(servers.triton_url, timeout_s=10.0)
    await c.wait_ready(timeout_s=30)
    yield c
    await c.close()


@pytest.fixture(scope="module")
def local_encoder() -> TextEncoder:
    return TextEncoder.from_pretrained(device="cpu")


# --- catalogue helpers ------------------------------------------------------------------

TITLES = {
    "shoe-1": "Men's trail running shoes, waterproof",
    "shoe-2": "Lightweight road running sneakers",
    "pan-1": "Cast iron frying pan 28 cm",
    "pan-2": "Non-stick saucepan with glass lid",
    "phone-1": "Smartphone 128 GB, dual SIM",
}
TEXTLESS = ("gift-card", "mystery-box")


def write_items(r: redis.Redis, embs: dict[str, np.ndarray], textless: tuple[str, ...]) -> None:
    pipe = r.pipeline(transaction=False)
    for item_id, emb in embs.items():
        pipe.hset(keys.item(item_id), mapping={"emb": emb.astype("<f4").tobytes(), "in_stock": "1"})
        pipe.xadd(keys.ITEM_LOG, {"id": item_id})
    for item_id in textless:
        pipe.hset(keys.item(item_id), mapping={"title": "", "in_stock": "1"})
        pipe.xadd(keys.ITEM_LOG, {"id": item_id})
    pipe.execute()


@pytest.fixture(scope="module")
def catalogue(servers: Servers, local_encoder: TextEncoder) -> dict[str, np.ndarray]:
    embs = dict(zip(TITLES, local_encoder.encode(list(TITLES.values())), strict=True))
    r = redis.Redis.from_url(servers.redis_url)
    write_items(r, embs, TEXTLESS)
    r.close()
    time.sleep(0.6)  # one ranker refresh interval
    return embs


# --- item_encoder ------------------------------------------------------------------------


async def test_encoder_matches_in_process_bert(
    client: RankerClient, local_encoder: TextEncoder
) -> None:
    texts = [*TITLES.values(), "", "ünïcödé — テスト", *(f"product number {i}" for i in range(70))]
    remote = await client.encode(texts)  # 77 texts: two requests of <= 64
    assert remote.shape == (len(texts), 384) and remote.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(remote, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(remote, local_encoder.encode(texts), atol=1e-4)
    assert (await client.encode([])).shape == (0, 384)


async def test_encoder_rejects_invalid_utf8_per_request(servers: Servers) -> None:
    raw = grpc_aio.InferenceServerClient(servers.triton_url)
    try:
        bad = grpc_aio.InferInput("TEXT", [1, 1], "BYTES")
        bad.set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=object))
        good = grpc_aio.InferInput("TEXT", [1, 1], "BYTES")
        good.set_data_from_numpy(np.array([[b"fine"]], dtype=object))
        results = await asyncio.gather(
            raw.infer("item_encoder", [bad]), raw.infer("item_encoder", [good]),
            return_exceptions=True,
        )  # fmt: skip
        assert isinstance(results[0], InferenceServerException)
        assert "INVALID_ARGUMENT" in str(results[0].status()) and "UTF-8" in str(results[0])
        assert not isinstance(results[1], BaseException)
        assert results[1].as_numpy("EMBEDDING").shape == (1, 384)
    finally:
        await raw.close()


# --- fused_ranker --------------------------------------------------------------------------


def rows_for(embs: dict[str, np.ndarray]) -> list[RankRow]:
    cands = ["shoe-2", "pan-2", "phone-1", "gift-card", "mystery-box", "not-in-catalogue"]
    signals = np.zeros((len(cands), 3), np.float32)
    signals[3] = [6, 40, 0]  # gift card: bought together with recent items, trending
    signals[4] = [0, 3, 0]
    return [
        # A runner: history of shoes; the other shoe should beat the pan.
        RankRow(
            candidates=cands,
            signals=signals,
            history=[HistoryEvent("shoe-1", EventType.CART, 60.0)],
            user_emb=embs["shoe-1"],
        ),
        # A cook who just searched for pans.
        RankRow(
            candidates=cands,
            signals=signals,
            history=[HistoryEvent("", EventType.SEARCH, 5.0)],
            query_emb=embs["pan-1"],
        ),
        # Unknown user, nothing but behaviour.
        RankRow(candidates=cands[:5], signals=signals[:5]),
    ]


async def test_ranker_scores_users_from_redis_items(
    client: RankerClient, catalogue: dict[str, np.ndarray]
) -> None:
    batch = RankBatch.from_rows(rows_for(catalogue), history_len=H, n_candidates=N)
    res = await client.rank(batch)
    assert res.model_version == "1"
    assert res.scores.shape == res.reasons.shape == res.history_match.shape == (3, N)
    s = res.scores
    assert np.isneginf(s[:2, 6:]).all() and np.isneginf(s[2, 5:]).all(), "padding is -inf"
    assert (res.reasons[2, 5:] == Reason.PAD).all()
    assert np.isfinite(s[:, :5]).all(), "text-less and unknown items get finite scores"
    assert s[0, 0] > s[0, 1], "runner: shoe over pan"
    assert res.reasons[0, 0] == Reason.SIMILAR and res.history_match[0, 0] == 0
    assert s[1, 1] > s[1, 0] and res.reasons[1, 1] == Reason.QUERY, "cook: pan matches query"
    assert s[2, 3] > s[2, 4] > 0, "text-less items rank by co-visitation and popularity"
    assert res.reasons[2, 3] == Reason.COVISIT


async def test_rank_splits_more_than_64_users(
    client: RankerClient, catalogue: dict[str, np.ndarray]
) -> None:
    rows = rows_for(catalogue) * 24  # 72 users: requests of 64 and 8
    batch = RankBatch.from_rows(rows, history_len=H, n_candidates=N)
    res = await client.rank(batch)
    assert res.scores.shape == (72, N)
    one = await client.rank(RankBatch.from_rows(rows[:3], history_len=H, n_candidates=N))
    np.testing.assert_allclose(res.scores, np.tile(one.scores, (24, 1)), rtol=1e-6)
    assert (res.reasons == np.tile(one.reasons, (24, 1))).all()


async def test_concurrent_requests_are_batched_and_answered_separately(
    client: RankerClient, catalogue: dict[str, np.ndarray]
) -> None:
    rows = rows_for(catalogue)
    batches = [RankBatch.from_rows([rows[k % 3]], history_len=H, n_candidates=N) for k in range(12)]
    results = await asyncio.gather(*(client.rank(b) for b in batches))
    for k, res in enumerate(results):
        alone = await client.rank(batches[k])
        np.testing.assert_allclose(res.scores, alone.scores, rtol=1e-6)


async def test_malformed_requests_error_without_crashing(
    servers: Servers, client: RankerClient, catalogue: dict[str, np.ndarray]
) -> None:
    batch = RankBatch.from_rows(rows_for(catalogue), history_len=H, n_candidates=N)
    raw = grpc_aio.InferenceServerClient(servers.triton_url)
    try:
        # HISTORY_TYPES one column short: Triton's own checks pass, the model's must not.
        inputs = []
        for name, arr in [
            ("USER_EMB", batch.user_emb),
            ("QUERY_EMB", batch.query_emb),
            ("HISTORY_IDS", batch.history_ids.astype(str).astype(object)),
            ("HISTORY_TYPES", batch.history_types[:, :-1]),
            ("HISTORY_AGE_S", batch.history_age_s),
            ("CANDIDATE_IDS", batch.candidate_ids.astype(str).astype(object)),
            ("SIGNALS", batch.signals),
        ]:
            dtype = {"float32": "FP32", "int32": "INT32", "object": "BYTES"}[arr.dtype.name]
            inp = grpc_aio.InferInput(name, list(arr.shape), dtype)
            inp.set_data_from_numpy(np.ascontiguousarray(arr))
            inputs.append(inp)
        with pytest.raises(InferenceServerException) as err:
            await raw.infer("fused_ranker", inputs)
        assert "INVALID_ARGUMENT" in str(err.value.status())
        assert "HISTORY_TYPES" in err.value.message()
        # A missing input is refused by Triton itself.
        with pytest.raises(InferenceServerException):
            await raw.infer("fused_ranker", inputs[:3])
    finally:
        await raw.close()

    # The client refuses a broken batch before sending, as not retriable.
    broken = RankBatch.from_rows(rows_for(catalogue), history_len=H, n_candidates=N)
    broken.signals[0, 0, 0] = np.nan
    with pytest.raises(RankerUnavailable, match="SIGNALS holds NaN") as refused:
        await client.rank(broken)
    assert refused.value.retriable is False
    # And the server still serves.
    assert (await client.rank(batch)).scores.shape == (3, N)


async def test_timeouts_and_unreachable_server_raise_ranker_unavailable(
    servers: Servers, catalogue: dict[str, np.ndarray]
) -> None:
    batch = RankBatch.from_rows(rows_for(catalogue) * 20, history_len=H, n_candidates=N)
    async with RankerClient(servers.triton_url, timeout_s=1e-4) as hurried:
        with pytest.raises(RankerUnavailable, match="timed out"):
            await hurried.rank(batch)
    async with RankerClient(f"127.0.0.1:{procs.free_port()}", timeout_s=1.0) as nowhere:
        start = time.monotonic()
        with pytest.raises(RankerUnavailable, match="unavailable after 2 attempts") as err:
            await nowhere.encode(["x"])
        assert err.value.retriable
        assert time.monotonic() - start < 3.0
        with pytest.raises(RankerUnavailable, match="not ready"):
            await nowhere.wait_ready(timeout_s=0.5)


async def test_ranker_keeps_serving_through_a_redis_outage(
    servers: Servers, client: RankerClient, catalogue: dict[str, np.ndarray]
) -> None:
    """Last in this module: it restarts Redis, empty."""
    batch = RankBatch.from_rows(rows_for(catalogue), history_len=H, n_candidates=N)
    before = await client.rank(batch)
    # Read by the model's background thread while no request comes in; served during
    # the outage, so no request had to read it from Redis.
    r = redis.Redis.from_url(servers.redis_url)
    write_items(r, {"shoe-4": catalogue["shoe-2"]}, ())
    r.close()
    await asyncio.sleep(1.5)  # three refresh intervals
    servers.stack.stop_component("redis")
    try:
        assert (await client.rank(probe_for("shoe-4", catalogue))).scores[0, 0] > 0.5
        for _ in range(3):
            during = await client.rank(batch)
            np.testing.assert_allclose(during.scores, before.scores, rtol=1e-6)
            await asyncio.sleep(0.6)
    finally:
        servers.stack.start_component("redis")
    assert servers.triton_log.read_text(errors="replace").count("Redis unavailable") == 1

    # Back up: a new item reaches the table once the refresher's backoff has passed.
    r = redis.Redis.from_url(servers.redis_url)
    write_items(r, {"shoe-3": catalogue["shoe-2"]}, ())
    r.close()
    probe = probe_for("shoe-3", catalogue)
    deadline = time.monotonic() + 15
    while (await client.rank(probe)).scores[0, 0] <= 0.5:
        assert time.monotonic() < deadline, "the ranker never saw the item written after recovery"
        await asyncio.sleep(0.25)


def probe_for(item_id: str, catalogue: dict[str, np.ndarray]) -> RankBatch:
    """One candidate for a shoe lover: scores above 0.5 only if the ranker knows the item
    (it carries shoe-2's vector)."""
    return RankBatch.from_rows(
        [RankRow([item_id], [[0, 0, 0]], user_emb=catalogue["shoe-2"])],
        history_len=1,
        n_candidates=1,
    )
