"""The pull API's HTTP surface (FastAPI): routes, parameter checks, key, rate limit, errors.

Every answer is JSON; every error is ``{"detail": "<what went wrong and what to do>"}``
with a 4xx for anything the caller sent (never a 500), 503 with ``Retry-After`` while
Redis does not answer or the service is still opening.  ``/v1`` routes ask for the API
key when ``SHOPREC_API_KEY`` is set and are rate-limited per client address;
``/health``, ``/ready`` and ``/metrics`` are for the platform and ask for neither.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at
# run time, and they name this module's locals (the parameter rules made from Settings).
import hmac
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST

from api.limits import RateLimiter
from api.metrics import ApiMetrics, TimingMiddleware
from api.schema import Health, Problem, Readiness, RecommendationOut, SimilarOut
from api.service import InternalError, PullService
from shoprec.errors import DependencyUnavailable
from shoprec.output import Recommendation
from shoprec.settings import Settings

API_VERSION = "1.0.0"
# The largest list one request may ask for (as SHOPREC_TOP_K's own bound).
MAX_K = 100
API_KEY_HEADER = "X-API-Key"
RETRY_AFTER_S = "1"
# An id or a query: what the event contract accepts (no NUL, not blank), trimmed.
TEXT_PATTERN = r"^[^\s\x00](?:[^\x00]*[^\s\x00])?$"
TEXT_RULE = "no NUL character, no leading or trailing whitespace"

_JSON = "application/json"
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "SHOPREC_API_KEY is set and X-API-Key is not it."},
    422: {"model": Problem, "description": "A parameter is malformed or out of range."},
    429: {"model": Problem, "description": "Over the client's rate limit; see Retry-After."},
    503: {"model": Problem, "description": "Not ready, or Redis does not answer; see Retry-After."},
}


def create_app(settings: Settings, service: PullService | None = None) -> FastAPI:
    """The ASGI app; ``service`` opens when the app starts (uvicorn's lifespan)."""
    metrics = service.metrics if service is not None else ApiMetrics()
    pull = service or PullService(settings, metrics)
    limiter = RateLimiter(settings.api_rate_limit, settings.api_rate_burst)
    key = settings.api_key.get_secret_value().encode()
    max_chars = settings.max_field_chars

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pull.start()
        try:
            yield
        finally:
            await pull.close()

    app = FastAPI(
        title="shoprec pull API",
        version=API_VERSION,
        description=(
            "Recommendations on demand from the same state and ranker as the stream "
            "(`recs.out`). Started by `shoprec serve`; settings SHOPREC_API_*."
        ),
        lifespan=lifespan,
        docs_url=None,  # the interactive pages load scripts from a CDN: /openapi.json only
        redoc_url=None,
    )
    app.add_middleware(TimingMiddleware, metrics=metrics)

    async def guard(
        request: Request,
        supplied: Annotated[
            str | None,
            Security(
                APIKeyHeader(
                    name=API_KEY_HEADER,
                    auto_error=False,
                    description="Required when the service has SHOPREC_API_KEY set.",
                )
            ),
        ] = None,
    ) -> None:
        # The limit first: a client guessing keys is slowed down like any other.
        client = request.client.host if request.client else "unknown"
        wait = limiter.take(client, time.monotonic())
        if wait > 0:
            raise HTTPException(
                429,
                f"rate limit of {limiter.rate:g} requests/s per client address "
                f"(burst {limiter.burst:g}) exceeded; retry in {wait:.2f} s",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        if key and not hmac.compare_digest((supplied or "").encode(), key):
            raise HTTPException(
                401,
                f"missing or wrong {API_KEY_HEADER} header: this service needs its API key",
                headers={"WWW-Authenticate": API_KEY_HEADER},
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(guard)], responses=_ERRORS)

    def text(what: str, **kw: Any) -> Any:
        return {
            "min_length": 1,
            "max_length": max_chars,
            "pattern": TEXT_PATTERN,
            "description": f"{what} (1-{max_chars} characters, {TEXT_RULE}).",
            **kw,
        }

    limit_k = Query(ge=1, le=MAX_K, description=f"How many items, 1-{MAX_K}.")

    @v1.get(
        "/users/{user_id}/recommendations",
        response_class=Response,
        responses={
            200: {"model": RecommendationOut, "description": "The user's list now."},
            404: {"model": Problem, "description": "context_item is not in the catalogue."},
        },
        summary="A user's recommendations now",
    )
    async def user_recommendations(
        user_id: Annotated[str, Path(**text("The shop's user id, as in its events"))],
        k: Annotated[int, limit_k] = settings.top_k,
        context_item: Annotated[
            str | None,
            Query(**text("The item the user is looking at (never recommended back)")),
        ] = None,
        query: Annotated[
            str | None, Query(**text("A search the user just made (embedded with BERT)"))
        ] = None,
    ) -> Response:
        """Ranked now from the user's current state, with the item in view and the search
        if given; the same record as on `recs.out`. A user shoprec knows nothing of gets
        what is trending. `degraded: true` when the ranker could not be called."""
        if context_item is not None and not pull.knows_item(context_item):
            raise HTTPException(404, f"context_item {context_item!r} is not in the catalogue")
        rec = await pull.recommend(user_id, k=k, context_item=context_item, query=query)
        return Response(rec.to_json(), media_type=_JSON, headers=_request_id(rec))

    @v1.get(
        "/items/{item_id}/similar",
        response_class=Response,
        responses={
            200: {"model": SimilarOut, "description": "Items to show beside this one."},
            404: {"model": Problem, "description": "The item is not in the catalogue."},
        },
        summary="Items to show beside an item",
    )
    async def similar_items(
        item_id: Annotated[str, Path(**text("The item id, as in the catalogue"))],
        k: Annotated[int, limit_k] = settings.top_k,
    ) -> Response:
        """The pipeline run for a shopper whose only history is this item: its nearest
        items, those seen together with it, trending in its category; never itself."""
        if not pull.knows_item(item_id):
            raise HTTPException(404, f"item {item_id!r} is not in the catalogue")
        rec = await pull.similar(item_id, k=k)
        return Response(similar_json(item_id, rec), media_type=_JSON, headers=_request_id(rec))

    app.include_router(v1)
    _key_optional_in_spec(app)

    @app.get("/health", response_model=Health, summary="Liveness: the process serves")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Not ready: see the fields."}},
        summary="Readiness: Redis answers and the item table is loaded",
    )
    async def ready() -> JSONResponse:
        """Ready while Redis answers and the item table holds items. Triton being down
        does not make it unready: answers are then degraded (`degraded: true` here), which
        beats no answer from every replica at once."""
        state = await pull.readiness()
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text."}},
        summary="Prometheus metrics",
    )
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe(exc.errors())}, status_code=422)

    @app.exception_handler(DependencyUnavailable)
    async def unavailable(_: Request, exc: DependencyUnavailable) -> JSONResponse:
        return JSONResponse(
            {"detail": f"{exc}; try again shortly"},
            status_code=503,
            headers={"Retry-After": RETRY_AFTER_S},
        )

    @app.exception_handler(InternalError)
    async def internal(_: Request, exc: InternalError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=500)

    return app


def _key_optional_in_spec(app: FastAPI) -> None:
    """The spec says the key is optional (``[{}, {"APIKeyHeader": []}]``): a service
    without SHOPREC_API_KEY answers requests that carry none."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = generate()  # FastAPI keeps this dict as app.openapi_schema
            for operations in spec["paths"].values():
                for operation in operations.values():
                    if "security" in operation:
                        operation["security"] = [{}, *operation["security"]]
        return app.openapi_schema or generate()

    app.openapi = openapi  # type: ignore[method-assign]


def describe(errors: Any) -> str:
    """FastAPI's validation errors as one sentence per parameter: where, which, what."""
    where = {"path": "path parameter", "query": "query parameter", "header": "header"}
    parts = []
    for e in errors:
        loc = list(e.get("loc", ()))
        place = where.get(str(loc[0]), str(loc[0])) if loc else "request"
        name = " ".join(str(x) for x in loc[1:]) or "?"
        got = e.get("input")
        shown = f" (got {got!r:.80})" if got is not None and not isinstance(got, dict) else ""
        parts.append(f"{place} {name}: {e.get('msg', 'invalid')}{shown}")
    return "; ".join(parts)


def similar_json(item_id: str, rec: Recommendation) -> bytes:
    """A similar-items answer (``api.schema.SimilarOut``): the ``recs.out`` record's list,
    model and times, about the item instead of a user."""
    doc = orjson.loads(rec.to_json())
    fields = ("items", "model", "emitted_ts", "latency_ms", "degraded")
    return orjson.dumps({"schema": doc["schema"], "item_id": item_id} | {f: doc[f] for f in fields})


def _request_id(rec: Recommendation) -> dict[str, str]:
    return {"X-Request-Id": rec.trigger_event_id}


def openapi_spec() -> dict[str, Any]:
    """The spec of the API as the defaults configure it (``docs/openapi.json``)."""
    return create_app(Settings.model_construct()).openapi()
