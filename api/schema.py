"""The pull API's response bodies, as the OpenAPI spec (``docs/openapi.json``) shows them.

A user's recommendations are exactly a ``recs.out`` record (``shoprec.output``, schema 1):
the service sends ``Recommendation.to_json()`` as it is, and a unit test holds these
models to it (a field added there and not here fails).  For a pull the trigger is the
request: ``trigger.type`` is ``"request"``, ``trigger.event_id`` the request's id (also
in the ``X-Request-Id`` header), ``trigger.ts`` when it arrived, and ``latency_ms`` the
time the service took.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# trigger.type of an answer to a pull request, and of a similar-items answer.
PULL_TRIGGER = "request"
SIMILAR_TRIGGER = "similar"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RecItemOut(_Strict):
    item_id: str
    score: float = Field(
        description="The ranker's score (higher is better; comparable within one list only)."
    )
    reasons: list[str] = Field(
        description='Why, in words: "similar to <item>", "often seen together with <item>", '
        '"matches your search", "trending", ...'
    )


class TriggerOut(_Strict):
    event_id: str = Field(description="The request's id (X-Request-Id) for a pull.")
    type: str = Field(description='"request" for a pull; the event type on recs.out.')
    ts: int = Field(description="When the request arrived (ms since epoch).")


class RecommendationOut(_Strict):
    """One user's recommendations, the same record as on ``recs.out``."""

    schema_: int = Field(alias="schema", description="Schema version of the record (1).")
    user_id: str
    items: list[RecItemOut] = Field(description="Best first, at most k.")
    model: str = Field(
        description='"fused_ranker@<version>", or "retrieval@fallback" when degraded.'
    )
    trigger: TriggerOut
    emitted_ts: int = Field(description="When the list was made (ms since epoch).")
    latency_ms: int = Field(description="emitted_ts - trigger.ts.")
    degraded: bool = Field(
        description="True when the ranker could not be called (or the query not embedded): "
        "the list comes from the same retrieval, mixing and filters, ordered by the "
        "retrieval signals instead."
    )
    # Being added to recs.out (experiments and attribution, DESIGN §10): optional here so
    # the spec holds before and after.
    list_id: str | None = Field(None, description="Names this list, for attribution.")
    experiment: str | None = Field(None, description="The experiment the user is in.")
    arm: str | None = Field(None, description="The user's arm of that experiment.")


class SimilarOut(_Strict):
    """Items to show beside one item: the pipeline run for a shopper whose only history
    is that item (its nearest items, those seen together with it, trending in its
    category), never the item itself."""

    schema_: int = Field(alias="schema", description="Schema version of the record (1).")
    item_id: str
    items: list[RecItemOut] = Field(description="Best first, at most k.")
    model: str
    emitted_ts: int
    latency_ms: int
    degraded: bool


class Problem(_Strict):
    """Every error: what went wrong and what to do about it."""

    detail: str


class Health(_Strict):
    status: str = Field(description='"ok" while the process serves.')


class Readiness(_Strict):
    ready: bool = Field(description="Redis answers and the item table is loaded.")
    redis: str = Field(description='"ok", or why not.')
    triton: str = Field(description='"ok", or why not (answers are degraded meanwhile).')
    items: int = Field(description="Items in the loaded item table.")
    degraded: bool = Field(description="Answers would be degraded now (Triton not ready).")
