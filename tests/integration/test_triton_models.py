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
from ranking.client import RankerClient
from ranking.encoder import TextEncoder
from ranking.fusion import Reason
from ranking.pipeline import RecommendRequest, TopK, empty_request
from shoprec.errors import RankerUnavailable
from shoprec.events import EventType
from tests.stack import stack_settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MODEL_REPO = REPO / "model_repo"
MODELS = ("item_encoder", "query_encoder", "fused_ranker")
K = 6


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


NUMBERS = {item: n for n, item in enumerate([*TITLES, *TEXTLESS, "pan-3", "shoe-3", "shoe-4"])}


def write_items(
    r: redis.Redis,
    embs: dict[str, np.ndarray],
    textless: tuple[str, ...] = (),
    sold_out: tuple[str, ...] = (),
) -> None:
    """Catalogue hashes as ``features.catalog`` writes them (with their numbers)."""
    pipe = r.pipeline(transaction=False)
    for item_id, emb in embs.items():
        stock = "0" if item_id in sold_out else "1"
        fields = {"emb": emb.astype("<f4").tobytes(), "in_stock": stock, "n": NUMBERS[item_id]}
        pipe.hset(keys.item(item_id), mapping=fields)  # type: ignore[arg-type]
        pipe.xadd(keys.ITEM_LOG, {"id": item_id})
    for item_id in textless:
        pipe.hset(keys.item(item_id), mapping={"title": "", "in_stock": "1", "n": NUMBERS[item_id]})
        pipe.xadd(keys.ITEM_LOG, {"id": item_id})
    pipe.execute()


@pytest.fixture(scope="module")
def catalogue(servers: Servers, local_encoder: TextEncoder) -> dict[str, np.ndarray]:
    embs = dict(zip(TITLES, local_encoder.encode(list(TITLES.values())), strict=True))
    r = redis.Redis.from_url(servers.redis_url)
    write_items(r, embs | {"pan-3": embs["pan-2"]}, TEXTLESS, sold_out=("pan-3",))
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


async def test_search_queries_have_their_own_encoder_with_the_same_vectors(
    client: RankerClient, servers: Servers
) -> None:
    """query_encoder is the item_encoder's model at normal priority: the catalogue's runs
    one thread at nice 10 (ranking/encoder_model.py), so a catalogue load never delays a
    search's query vector."""
    texts = ["trail running shoes", "cast iron pan"]
    catalogue = await client.encode(texts)
    queries = await client.encode(texts, model="query_encoder")
    np.testing.assert_allclose(queries, catalogue, atol=1e-6)
    log = servers.triton_log.read_text(errors="replace")
    assert "item_encoder: loaded on cpu, 1 thread(s), nice 10" in log
    assert "query_encoder: loaded on cpu, 1 thread(s), nice 0" in log


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


def request_for(embs: dict[str, np.ndarray], copies: int = 1) -> RecommendRequest:
    """A runner, a cook whose only event is a search for pans, and a stranger, ``copies``
    times."""
    n = NUMBERS
    b = 3
    req = empty_request(b, k=K, n=20)
    covis = np.array([[-1], [-1], [n["gift-card"]]], np.int32)
    one = RecommendRequest(
        **req.arrays()
        | {
            # The cook has only searched: the query alone says what they want.
            "user_emb": np.vstack([embs["shoe-1"][None, :], np.zeros((2, 384), np.float32)]),
            "query_emb": np.stack(
                [np.zeros(384, np.float32), embs["pan-1"], np.zeros(384, np.float32)]
            ),
            "history": np.array([[n["shoe-1"]], [-1], [-1]], np.int32),
            "history_types": np.array([[EventType.CART], [0], [0]], np.int32),
            "history_age_s": np.array([[60.0], [0.0], [0.0]], np.float32),
            "covis": covis,
            "covis_score": np.array([[0.0], [0.0], [6.0]], np.float32),
            "covis_source": np.array([[-1], [-1], [n["phone-1"]]], np.int32),
            "trending": np.tile(np.array([[n["gift-card"], n["mystery-box"]]], np.int32), (b, 1)),
            "trending_score": np.tile(np.array([[40.0, 3.0]], np.float32), (b, 1)),
            "in_view": np.array([[n["shoe-1"]], [-1], [-1]], np.int32),
            "search": np.array([[0], [1], [0]], np.int32),
        }
    )
    return RecommendRequest.concat([one] * copies) if copies > 1 else one


def listed(top: TopK, row: int) -> list[str]:
    names = {v: k for k, v in NUMBERS.items()}
    return [names[int(i)] for i in top.items[row] if i >= 0]


async def test_one_call_retrieves_filters_scores_and_explains(
    client: RankerClient, catalogue: dict[str, np.ndarray]
) -> None:
    res = await client.recommend(request_for(catalogue))
    top = res.top
    assert res.model_version == "1"
    assert top.items.shape == top.scores.shape == top.reasons.shape == (3, K)
    runner, cook, stranger = (listed(top, r) for r in range(3))
    assert "shoe-1" not in runner, "the item in view is never recommended"
    assert "pan-3" not in runner + cook + stranger, "sold out"
    assert runner.index("shoe-2") < runner.index("pan-2"), "runner: shoe over pan"
    k = runner.index("shoe-2")
    assert top.reasons[0, k] == Reason.SIMILAR and top.source_item[0, k] == NUMBERS["shoe-1"]
    assert cook[:2] == ["pan-1", "pan-2"], "cook: the pans match the query"
    assert top.reasons[1, 0] == Reason.QUERY
    assert stranger[:2] == ["gift-card", "mystery-box"], "no taste: behaviour and popularity"
    assert top.reasons[2, 0] == Reason.COVISIT and top.source_item[2, 0] == NUMBERS["phone-1"]
    assert top.is_trending[2, :2].tolist() == [1, 1]
    for r in range(3):
        real = top.scores[r][top.items[r] >= 0]
        assert np.all(np.diff(real) <= 1e-6), "best first"
        assert np.isneginf(top.scores[r][top.items[r] < 0]).all(), "padding is -inf"


async def test_more_users_than_one_request_holds_are_split_and_joined(
    client: RankerClient, catalogue: dict[str, np.ndarray]
) -> None:
    many = await client.recommend(request_for(catalogue, copies=90))  # 270: 256 + 14
    one = await client.recommend(request_for(catalogue))
    for name, arr in many.top.arrays().items():
        np.testing.assert_allclose(arr, np.tile(one.top.arrays()[name], (90, 1)), rtol=1e-6)


async def test_concurrent_requests_are_batched_and_answered_separately(
    client: RankerClient, catalogue: dict[str, np.ndarray]
) -> None:
    full = request_for(catalogue)
    parts = [full.rows(k % 3, k % 3 + 1) for k in range(12)]
    results = await asyncio.gather(*(client.recommend(p) for p in parts))
    for part, res in zip(parts, results, strict=True):
        alone = await client.recommend(part)
        np.testing.assert_allclose(res.top.scores, alone.top.scores, rtol=1e-6)
        assert (res.top.items == alone.top.items).all()


async def test_malformed_requests_error_without_crashing(
    servers: Servers, client: RankerClient, catalogue: dict[str, np.ndarray]
) -> None:
    request = request_for(catalogue)
    raw = grpc_aio.InferenceServerClient(servers.triton_url)
    try:
        # HISTORY_TYPES one column short: Triton's own checks pass, the model's must not.
        inputs = []
        for name, arr in request.arrays().items():
            if name == "history_types":
                arr = np.zeros((3, 2), np.int32)
            dtype = {"float32": "FP32", "int32": "INT32"}[arr.dtype.name]
            inp = grpc_aio.InferInput(name.upper(), list(arr.shape), dtype)
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

    # The client refuses a broken request before sending, as not retriable.
    broken = request_for(catalogue)
    broken.covis_score[2, 0] = np.nan
    with pytest.raises(RankerUnavailable, match="COVIS_SCORE holds NaN") as refused:
        await client.recommend(broken)
    assert refused.value.retriable is False
    # And the server still serves.
    assert (await client.recommend(request)).top.items.shape == (3, K)


async def test_timeouts_and_unreachable_server_raise_ranker_unavailable(
    servers: Servers, catalogue: dict[str, np.ndarray]
) -> None:
    request = request_for(catalogue, copies=20)
    async with RankerClient(servers.triton_url, timeout_s=1e-4) as hurried:
        with pytest.raises(RankerUnavailable, match="timed out"):
            await hurried.recommend(request)
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
    request = request_for(catalogue)
    # Read by the model's background thread while no request comes in; served during
    # the outage, so no request had to read it from Redis.
    r = redis.Redis.from_url(servers.redis_url)
    write_items(r, {"shoe-4": catalogue["shoe-2"]})
    r.close()
    await asyncio.sleep(1.5)  # three refresh intervals
    before = await client.recommend(request)
    servers.stack.stop_component("redis")
    try:
        assert "shoe-4" in await recommended_to_a_shoe_lover(client, catalogue)
        for _ in range(3):
            during = await client.recommend(request)
            np.testing.assert_allclose(during.top.scores, before.top.scores, rtol=1e-6)
            await asyncio.sleep(0.6)
    finally:
        servers.stack.start_component("redis")
    assert servers.triton_log.read_text(errors="replace").count("Redis unavailable") == 1

    # Back up: a new item reaches the table once the refresher's backoff has passed.
    r = redis.Redis.from_url(servers.redis_url)
    write_items(r, {"shoe-3": catalogue["shoe-2"]})
    r.close()
    deadline = time.monotonic() + 15
    while "shoe-3" not in await recommended_to_a_shoe_lover(client, catalogue):
        assert time.monotonic() < deadline, "the ranker never saw the item written after recovery"
        await asyncio.sleep(0.25)


async def recommended_to_a_shoe_lover(
    client: RankerClient, catalogue: dict[str, np.ndarray]
) -> list[str]:
    req = RecommendRequest(
        **empty_request(1, k=K, n=20).arrays() | {"user_emb": catalogue["shoe-2"][None, :]}
    )
    return listed((await client.recommend(req)).top, 0)
