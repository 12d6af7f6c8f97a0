"""The pull API without services: parameter checks, key, rate limit, health, metrics, the
spec and the response schemas.  The app runs in process (httpx's ASGI transport, no
lifespan), so its service never opens: anything that passes the checks gets 503, which is
what a request meets before Redis and Triton answer.  The service itself, on the real
stack, is tests/integration/test_api.py."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from api.app import create_app, similar_json
from api.limits import RateLimiter
from api.schema import RecommendationOut, SimilarOut
from api.service import nobody, viewing
from cli.api import OPENAPI_FILE, openapi_text
from features.store import UserContext
from features.user_state import HistoryEntry
from shoprec.output import RecItem, Recommendation
from shoprec.settings import Settings

USER = "/v1/users/{}/recommendations"


def make_settings(**overrides: Any) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


def client(**overrides: Any) -> httpx.AsyncClient:
    app = create_app(make_settings(**overrides))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


@pytest.mark.parametrize(
    ("path", "params", "words"),
    [
        (USER.format("u1"), {"k": 0}, ["query parameter k", "greater than or equal to 1"]),
        (USER.format("u1"), {"k": 101}, ["query parameter k", "less than or equal to 100"]),
        (USER.format("u1"), {"k": "ten"}, ["query parameter k", "valid integer", "'ten'"]),
        (USER.format(" u1"), {}, ["path parameter user_id", "pattern"]),
        (USER.format("u1%00x"), {}, ["path parameter user_id", "pattern"]),
        (USER.format("u" * 513), {}, ["path parameter user_id", "at most 512 characters"]),
        (USER.format("u1"), {"context_item": ""}, ["query parameter context_item", "at least 1"]),
        (USER.format("u1"), {"query": "  "}, ["query parameter query", "pattern"]),
        ("/v1/items/i1/similar", {"k": -3}, ["query parameter k", "greater than or equal to 1"]),
    ],
)
async def test_bad_parameters_get_422_saying_which_and_why(
    path: str, params: dict[str, Any], words: list[str]
) -> None:
    async with client() as c:
        r = await c.get(path, params=params)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str)
    for word in words:
        assert word in detail, detail


async def test_unrouted_paths_and_methods_are_4xx() -> None:
    async with client() as c:
        assert (await c.get("/v1/users/a/b/recommendations")).status_code == 404
        assert (await c.get("/v1/users/")).status_code == 404
        assert (await c.post(USER.format("u1"))).status_code == 405


async def test_good_requests_before_the_service_opens_get_503_with_retry_after() -> None:
    async with client() as c:
        for path in (USER.format("u1") + "?k=5&query=red%20lipstick", "/v1/items/i1/similar"):
            r = await c.get(path)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert "starting" in r.json()["detail"]


async def test_health_answers_and_ready_says_what_is_missing() -> None:
    async with client() as c:
        assert (await c.get("/health")).json() == {"status": "ok"}
        r = await c.get("/ready")
    assert r.status_code == 503
    body = r.json()
    assert body["ready"] is False and body["items"] == 0 and body["degraded"] is True
    assert "starting" in body["redis"]


async def test_the_api_key_is_asked_for_compared_and_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "hunter2-" + "x" * 24
    caplog.set_level(logging.DEBUG)
    async with client(api_key=SecretStr(secret)) as c:
        missing = await c.get(USER.format("u1"))
        wrong = await c.get(USER.format("u1"), headers={"X-API-Key": secret[:-1]})
        right = await c.get(USER.format("u1"), headers={"X-API-Key": secret})
        health = await c.get("/health")  # the platform's endpoints ask for no key
    assert missing.status_code == wrong.status_code == 401
    assert "X-API-Key" in missing.json()["detail"]
    assert secret not in missing.text + wrong.text
    assert right.status_code == 503  # past the key: the service is not open here
    assert health.status_code == 200
    assert secret not in caplog.text
    assert secret not in repr(make_settings(api_key=SecretStr(secret)))


async def test_over_the_rate_limit_gets_429_with_retry_after() -> None:
    async with client(api_rate_limit=0.5, api_rate_burst=3) as c:
        codes = [(await c.get(USER.format("u1"))).status_code for _ in range(5)]
        r = await c.get(USER.format("u1"))
        health = await c.get("/health")
    assert codes == [503, 503, 503, 429, 429]
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert "0.5 requests/s per client address" in r.json()["detail"]
    assert health.status_code == 200


async def test_metrics_count_by_route_template_never_by_user_id() -> None:
    async with client() as c:
        await c.get(USER.format("alice-the-shopper"), params={"k": 0})
        await c.get("/health")
        text = (await c.get("/metrics")).text
    assert "alice-the-shopper" not in text
    assert (
        'shoprec_api_responses_total{method="GET",route="/v1/users/{user_id}/recommendations",'
        'status="422"} 1.0' in text
    )
    assert 'shoprec_api_request_seconds_bucket{le="0.02",method="GET",route="/health"}' in text


def test_openapi_spec_in_docs_is_current() -> None:
    assert OPENAPI_FILE.read_text() == openapi_text(), (
        "docs/openapi.json is stale: run `shoprec openapi --write`"
    )


def test_the_spec_documents_every_route_and_its_errors() -> None:
    spec = orjson.loads(openapi_text())
    assert set(spec["paths"]) == {
        "/v1/users/{user_id}/recommendations",
        "/v1/items/{item_id}/similar",
        "/health",
        "/ready",
        "/metrics",
    }
    for path in ("/v1/users/{user_id}/recommendations", "/v1/items/{item_id}/similar"):
        responses = spec["paths"][path]["get"]["responses"]
        assert {"200", "401", "422", "429", "503"} <= set(responses)
    assert spec["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"


def a_recommendation(**overrides: Any) -> Recommendation:
    fields: dict[str, Any] = {
        "user_id": "u1",
        "items": (RecItem("i2", 0.91, ("similar to Red lipstick", "trending")),),
        "model": "fused_ranker@2",
        "trigger_event_id": "req-1",
        "trigger_type": "request",
        "trigger_ts": 1_764_000_000_000,
        "emitted_ts": 1_764_000_000_004,
        "degraded": False,
    }
    return Recommendation(**(fields | overrides))


def test_a_pull_answer_is_the_recs_out_record_and_the_spec_says_so() -> None:
    """The service sends Recommendation.to_json() as it is; the documented model must
    accept exactly those fields (extra="forbid"), so a field added on recs.out and not to
    api.schema fails here."""
    rec = a_recommendation()
    parsed = RecommendationOut.model_validate_json(rec.to_json())
    assert parsed.model_dump(by_alias=True, exclude_unset=True) == orjson.loads(rec.to_json())
    similar = SimilarOut.model_validate_json(similar_json("i1", rec))
    assert similar.item_id == "i1" and similar.items[0].item_id == "i2"
    assert similar.latency_ms == 4


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.5, 500),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0, 0.5), min_size=1, max_size=200),
)
def test_rate_limiter_never_lets_more_through_than_burst_plus_rate_times_time(
    rate: float, burst: int, gaps: list[float]
) -> None:
    limiter = RateLimiter(rate, burst)
    now, allowed = 0.0, 0
    for gap in gaps:
        now += gap
        wait = limiter.take("c", now)
        if wait == 0:
            allowed += 1
        else:
            assert 0 < wait <= 1 / rate + 1e-9
    assert allowed <= burst + rate * now + 1e-6
    # A client that waits what it was told gets through.
    wait = limiter.take("c", now)
    assert wait == 0 or limiter.take("c", now + wait + 1e-9) == 0


def test_rate_limiter_is_per_client_bounded_and_off_at_zero() -> None:
    limiter = RateLimiter(1.0, 1, max_clients=3)
    assert limiter.take("a", 0.0) == 0 and limiter.take("a", 0.0) > 0
    assert limiter.take("b", 0.0) == 0  # another client has its own bucket
    for n in range(10):
        limiter.take(f"c{n}", 0.0)
    assert len(limiter) == 3
    off = RateLimiter(0.0, 1)
    assert all(off.take("a", 0.0) == 0 for _ in range(100))


def test_an_item_in_view_heads_the_history_and_gives_a_newcomer_its_taste() -> None:
    dim = 4
    item = np.array([3.0, 4.0, 0.0, 0.0], np.float32)
    newcomer = viewing(nobody(dim), "i9", item, now=1_000)
    assert [(h.item_id, h.type, h.ts) for h in newcomer.history] == [("i9", "view", 1_000)]
    np.testing.assert_allclose(newcomer.embedding, [0.6, 0.8, 0.0, 0.0], rtol=1e-6)
    taste = np.array([0.0, 0.0, 1.0, 0.0], np.float32)
    known = UserContext(taste, np.zeros(dim, np.float32), [HistoryEntry("i1", "cart", 900)])
    looking = viewing(known, "i9", item, now=1_000)
    assert [h.item_id for h in looking.history] == ["i9", "i1"]
    np.testing.assert_array_equal(looking.embedding, taste)  # their own taste stays
    assert [h.item_id for h in known.history] == ["i1"]  # the stored state is not touched
    unknown_item = viewing(nobody(dim), "i0", None, now=1_000)
    assert not unknown_item.embedding.any()
