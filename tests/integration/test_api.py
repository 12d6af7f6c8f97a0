"""The pull API (`shoprec serve`) on the real stack, beside a real worker.

The worker folds the first real rees46 events into state (Apache Kafka, Redis, Triton
with BERT); the API, its own process as in production, answers from that state and the
same ranker.  Property-based tests (schemathesis, from the checked-in docs/openapi.json)
throw generated requests at it: no 5xx, every status and body as the spec says.  A second
API process reaches Triton through a proxy the test cuts: its answers go on, degraded,
and come back ranked when the proxy is restored; it also asks for an API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import hypothesis
import orjson
import pytest
import schemathesis
from redis.asyncio import Redis

from api.schema import RecommendationOut, SimilarOut
from bench.api import ApiServer, start_api
from cli.api import OPENAPI_FILE
from infra import procs
from infra.stack import Endpoints
from shoprec.settings import Settings
from streams.topics import TopicNames, ensure_topics
from tests.integration.helpers import isolated_settings, rees46_fixture
from tests.integration.ops_setup import (
    events_in_state,
    items_embedded,
    json_out,
    send,
    shoprec,
    wait_for,
)
from tests.worker import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_EVENTS = 600
API_KEY = "pull-api-test-key-0123456789abcdef"


@dataclass
class Served:
    settings: Settings
    api: ApiServer
    worker: WorkerProcess
    events: list[dict[str, Any]]
    items: list[dict[str, Any]]
    more_events: list[dict[str, Any]]  # real events the worker has not seen yet
    tmp: Path
    stack: Endpoints

    def get(self, path: str) -> tuple[int, Any]:
        return self.api.get(path, timeout_s=15.0)

    def busiest_users(self, n: int) -> list[str]:
        counts: dict[str, int] = {}
        for e in self.events:
            counts[str(e["user_id"])] = counts.get(str(e["user_id"]), 0) + 1
        return sorted(counts, key=lambda u: (-counts[u], u))[:n]


@pytest.fixture(scope="module")
async def served(
    stack: Endpoints, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Served]:
    tmp = tmp_path_factory.mktemp("api")
    settings = isolated_settings(stack, min_emit_interval_ms=0, topic_partitions=2)
    events, items = rees46_fixture(data_dir, N_EVENTS + 200)
    events, more = events[:N_EVENTS], events[N_EVENTS:]
    await ensure_topics(settings)
    names = TopicNames.from_settings(settings)
    worker = WorkerProcess(settings, tmp / "worker.log")
    redis = Redis.from_url(stack.redis_url)
    api: ApiServer | None = None
    try:
        await send(
            settings, [(names.catalog, it["item_id"].encode(), orjson.dumps(it)) for it in items]
        )
        await wait_for(lambda: items_embedded(redis, items), worker, 240)
        await send(
            settings,
            [
                (names.event_topic(e["type"]), str(e["user_id"]).encode(), orjson.dumps(e))
                for e in events
            ],
        )
        await wait_for(
            lambda: _at_least(events_in_state(redis, settings.state_prefix), N_EVENTS),
            worker,
            240,
        )
        api = start_api(settings, tmp / "api.log")
        await asyncio.to_thread(api.wait_ready)
        yield Served(settings, api, worker, events, items, more, tmp, stack)
    finally:
        if api is not None:
            api.stop()
        worker.close()
        await redis.aclose()


async def _at_least(count: Any, n: int) -> bool:
    return bool(await count >= n)


def items_of(body: dict[str, Any]) -> list[str]:
    return [i["item_id"] for i in body["items"]]


# --- answers -----------------------------------------------------------------------------


def test_ready_says_redis_triton_and_the_item_table_answer(served: Served) -> None:
    status, body = served.get("/ready")
    assert status == 200, body
    assert body == {
        "ready": True,
        "redis": "ok",
        "triton": "ok",
        "items": len(served.items),
        "degraded": False,
    }
    assert served.get("/health") == (200, {"status": "ok"})


def test_a_user_gets_a_ranked_list_from_their_state_in_the_recs_out_schema(
    served: Served,
) -> None:
    catalogue = {it["item_id"] for it in served.items}
    _, nobody = served.get("/v1/users/nobody-at-all/recommendations?k=5")
    personal = 0
    seen: list[list[str]] = []
    for user in served.busiest_users(5):
        status, body = served.get(f"/v1/users/{quote(user)}/recommendations?k=5")
        assert status == 200, body
        rec = RecommendationOut.model_validate(body)
        assert rec.user_id == user and rec.schema_ == 1
        assert rec.model.startswith("fused_ranker@") and not rec.degraded
        assert rec.trigger.type == "request" and rec.trigger.event_id.startswith("req-")
        assert 0 <= rec.latency_ms == rec.emitted_ts - rec.trigger.ts
        got = items_of(body)
        assert len(got) == 5 and len(set(got)) == 5 and set(got) <= catalogue
        assert all(i.reasons for i in rec.items)
        # Their own history shows: the list is not the one a stranger gets (what is
        # trending), and its reasons are about them.
        assert got != items_of(nobody)
        reasons = {r for i in rec.items for r in i.reasons}
        personal += bool(reasons - {"trending"})
        seen.append(sorted(reasons))
    assert personal == 5, seen
    assert {r for i in nobody["items"] for r in i["reasons"]} <= {"trending", "picked for you"}


def test_k_sets_the_length_and_the_request_id_is_in_a_header(served: Served) -> None:
    user = quote(served.busiest_users(1)[0])
    for k in (1, 3, 20):
        status, headers, body = http_get(served.api.url + f"/v1/users/{user}/recommendations?k={k}")
        assert status == 200
        doc = orjson.loads(body)
        assert len(doc["items"]) == k
        assert headers["X-Request-Id"] == doc["trigger"]["event_id"]


def test_the_item_in_view_is_never_recommended_and_a_newcomer_with_it_sees_similar_items(
    served: Served,
) -> None:
    for event in served.events[:40:8]:
        user, item = quote(str(event["user_id"])), quote(str(event["item_id"]))
        _, with_context = served.get(f"/v1/users/{user}/recommendations?k=10&context_item={item}")
        assert event["item_id"] not in items_of(with_context)
        _, newcomer = served.get(f"/v1/users/new-{user}/recommendations?k=10&context_item={item}")
        status, similar = served.get(f"/v1/items/{item}/similar?k=10")
        assert status == 200
        SimilarOut.model_validate(similar)
        assert similar["item_id"] == event["item_id"]
        assert event["item_id"] not in items_of(similar)
        # One pipeline: a shopper with no state viewing the item is what "similar" asks.
        assert items_of(newcomer) == items_of(similar)


def test_a_search_query_is_embedded_and_steers_the_list(served: Served) -> None:
    """A query made of a real catalogue record (its brand and category) brings a stranger
    items of that brand or category, and changes what a user with a history gets."""
    record = {it["item_id"]: it for it in served.items}
    it = next(i for i in served.items if i.get("brand") and i.get("category"))
    query = quote(f"{it['brand']} {it['category'].rsplit('>', 1)[-1].strip()}")

    def matching(body: dict[str, Any]) -> int:
        return sum(
            record[i].get("brand") == it["brand"] or record[i].get("category") == it["category"]
            for i in items_of(body)
        )

    _, plain = served.get("/v1/users/nobody-at-all/recommendations?k=10")
    status, searched = served.get(f"/v1/users/nobody-at-all/recommendations?k=10&query={query}")
    assert status == 200 and not searched["degraded"], searched
    assert matching(searched) >= 5 and matching(searched) > matching(plain), (query, searched)
    assert any("matches your search" in i["reasons"] for i in searched["items"]), searched
    # A user with a long history: the ranker weighs the search against it, so the list
    # moves (not necessarily to the query's items: that is the ranker's call).
    user = quote(served.busiest_users(1)[0])
    _, plain = served.get(f"/v1/users/{user}/recommendations?k=10")
    _, searched = served.get(f"/v1/users/{user}/recommendations?k=10&query={query}")
    assert not searched["degraded"]
    assert [(i["item_id"], i["score"]) for i in searched["items"]] != [
        (i["item_id"], i["score"]) for i in plain["items"]
    ]


async def test_answers_follow_the_users_state_as_the_worker_changes_it(served: Served) -> None:
    """A shopper's first event, folded in by the worker, changes what the API answers."""
    seen = {str(e["user_id"]) for e in served.events}
    event = next(e for e in served.more_events if str(e["user_id"]) not in seen)
    user = quote(str(event["user_id"]))
    _, before = served.get(f"/v1/users/{user}/recommendations?k=10")
    _, stranger = served.get("/v1/users/nobody-at-all/recommendations?k=10")
    assert items_of(before) == items_of(stranger)  # nothing known of them yet
    names = TopicNames.from_settings(served.settings)
    payload = orjson.dumps(event)
    await send(served.settings, [(names.event_topic(event["type"]), user.encode(), payload)])
    for _ in range(120):
        _, after = served.get(f"/v1/users/{user}/recommendations?k=10")
        if items_of(after) != items_of(before):
            break
        await asyncio.sleep(0.5)
    assert items_of(after) != items_of(before), served.worker.tail()
    # Asking wrote nothing about anyone: a stranger asked for has no key.
    redis = Redis.from_url(served.stack.redis_url)
    try:
        assert await redis.keys("*{u:nobody-at-all}*") == []
    finally:
        await redis.aclose()


def test_unknown_items_are_404_and_bad_parameters_422_on_the_real_service(
    served: Served,
) -> None:
    status, body = served.get("/v1/items/no-such-item/similar")
    assert status == 404 and "not in the catalogue" in body["detail"]
    status, body = served.get("/v1/users/u1/recommendations?context_item=no-such-item")
    assert status == 404 and "context_item" in body["detail"]
    status, body = served.get("/v1/users/u1/recommendations?k=1000")
    assert status == 422 and "query parameter k" in body["detail"]


def test_metrics_count_requests_by_route_and_status(served: Served) -> None:
    served.get("/v1/users/u1/recommendations?k=0")
    status, _, body = http_get(served.api.url + "/metrics")
    assert status == 200
    text = body.decode()
    assert 'route="/v1/users/{user_id}/recommendations",status="200"' in text
    assert 'route="/v1/users/{user_id}/recommendations",status="422"' in text
    assert "shoprec_api_request_seconds_bucket" in text
    assert 'shoprec_api_answers_total{degraded="false",kind="user"}' in text
    for stage in ("queue", "queries", "state", "context", "rank"):
        assert f'shoprec_api_stage_seconds_count{{stage="{stage}"}}' in text
    # No access log: user ids and queries stay out of the API's log.
    log = (served.tmp / "api.log").read_text()
    assert served.busiest_users(1)[0] not in log and "nobody-at-all" not in log


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    """(status, headers, body) of a GET, errors included."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=15) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


# --- property-based: generated requests against the running service ---------------------

schema = schemathesis.openapi.from_path(OPENAPI_FILE)


@schema.parametrize()
@hypothesis.settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_generated_requests_get_what_the_spec_promises(case: Any, served: Served) -> None:
    """No 5xx; every status, content type and body as docs/openapi.json documents it."""
    case.call_and_validate(base_url=served.api.url, timeout=30)


# --- Triton cut off: degraded answers, then ranked again; the API key ---------------------


class TcpProxy:
    """A loopback TCP proxy to Triton that can be cut and restored, so one API process
    loses Triton as when its server goes away, without stopping the session's Triton."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self.port = procs.free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def _call(self, coro: Any) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def restore(self) -> None:
        self._call(self._open())

    def cut(self) -> None:
        self._call(self._cut())

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
def proxied_api(served: Served) -> Iterator[tuple[ApiServer, TcpProxy]]:
    proxy = TcpProxy(served.settings.triton_url)
    proxy.restore()
    settings = served.settings.model_copy(
        update={
            "triton_url": f"127.0.0.1:{proxy.port}",
            "triton_breaker_cool_down_s": 0.25,
            "triton_timeout_s": 2.0,
        }
    )
    api = start_api(settings, served.tmp / "api-proxied.log", env={"SHOPREC_API_KEY": API_KEY})
    try:
        api.wait_ready()
        yield api, proxy
    finally:
        api.stop()
        proxy.close()


def keyed(api: ApiServer, path: str) -> tuple[int, Any]:
    status, _, body = http_get(api.url + path, {"X-API-Key": API_KEY})
    return status, orjson.loads(body)


async def test_without_triton_answers_are_degraded_then_ranked_again(
    served: Served, proxied_api: tuple[ApiServer, TcpProxy]
) -> None:
    api, proxy = proxied_api
    user = quote(served.busiest_users(1)[0])
    path = f"/v1/users/{user}/recommendations?k=5"
    # The key: asked for, compared, and never written to the log.
    status, body = api.get(path)
    assert status == 401 and "X-API-Key" in body["detail"]
    status, ranked = keyed(api, path)
    assert status == 200 and not ranked["degraded"], ranked

    proxy.cut()
    for n in range(6):  # the breaker opens after a few failures; every answer still comes
        status, body = keyed(api, path)
        assert status == 200, body
        assert body["degraded"] and body["model"] == "retrieval@fallback", (n, body)
        assert len(body["items"]) == 5
    status, similar = keyed(api, f"/v1/items/{quote(str(served.events[0]['item_id']))}/similar")
    assert status == 200 and similar["degraded"]
    status, ready = api.get("/ready")  # still ready: degraded beats no answer at all
    assert status == 200 and ready["degraded"] and ready["triton"] != "ok", ready

    proxy.restore()
    for _ in range(80):  # the breaker probes again after its cool-down (at most 4 s)
        status, body = keyed(api, path)
        if status == 200 and not body["degraded"]:
            break
        await asyncio.sleep(0.25)
    assert not body["degraded"] and body["model"].startswith("fused_ranker@"), body
    assert API_KEY not in (served.tmp / "api-proxied.log").read_text()


# --- an erased customer --------------------------------------------------------------------


async def test_an_erased_customer_gets_what_a_stranger_gets(served: Served) -> None:
    """After `shoprec forget-user`, the API knows nothing of the customer (it keeps no copy
    of its own); runs last: it erases one of the fixture's customers."""
    user = served.busiest_users(6)[5]
    _, before = served.get(f"/v1/users/{quote(user)}/recommendations?k=10")
    _, stranger = served.get("/v1/users/nobody-at-all/recommendations?k=10")
    assert items_of(before) != items_of(stranger)
    report = json_out(
        await asyncio.to_thread(
            shoprec, served.settings, "forget-user", user, "--settle", "1", "--json"
        )
    )
    assert report, report
    _, after = served.get(f"/v1/users/{quote(user)}/recommendations?k=10")
    _, stranger = served.get("/v1/users/nobody-at-all/recommendations?k=10")
    assert items_of(after) == items_of(stranger)
