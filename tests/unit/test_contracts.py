"""Output and dead-letter records keep their documented shape."""

from __future__ import annotations

import orjson

from shoprec.dlq import DeadLetter, original_bytes
from shoprec.output import RecItem, Recommendation


def test_recommendation_follows_schema_1() -> None:
    rec = Recommendation(
        user_id="u1",
        items=(RecItem("i9", 0.91234567, ("similar to Gift Card", "trending")),),
        model="fused_ranker@1",
        trigger_event_id="e1",
        trigger_type="purchase",
        trigger_ts=1000,
        emitted_ts=1012,
        degraded=False,
        list_id="3f2a9c1d0b7e6a54",
        experiment="ranker-vs-covis",
        arm="covis",
    )
    doc = orjson.loads(rec.to_json())
    assert doc == {
        "schema": 1,
        "user_id": "u1",
        "items": [
            {"item_id": "i9", "score": 0.912346, "reasons": ["similar to Gift Card", "trending"]}
        ],
        "model": "fused_ranker@1",
        "trigger": {"event_id": "e1", "type": "purchase", "ts": 1000},
        "emitted_ts": 1012,
        "latency_ms": 12,
        "degraded": False,
        "list_id": "3f2a9c1d0b7e6a54",
        "experiment": "ranker-vs-covis",
        "arm": "covis",
    }


def test_dead_letter_keeps_the_original_bytes_even_when_not_text() -> None:
    raw = b"\xff\xfe not utf-8"
    dl = DeadLetter("not_json", "value is not JSON", "shop.clicks", 2, 41, b"u1", raw)
    doc = orjson.loads(dl.value(now_ms=5))
    assert doc["reason"] == "not_json"
    assert doc["source"] == {"topic": "shop.clicks", "partition": 2, "offset": 41}
    assert doc["original"] is None
    assert original_bytes(dl.value(now_ms=5)) == raw
    assert ("shoprec-reason", b"not_json") in dl.headers()


def test_dead_letter_shows_text_originals_readably() -> None:
    dl = DeadLetter("unknown_type", "x", "shop.views", 0, 1, None, b'{"type":"like"}')
    assert orjson.loads(dl.value(now_ms=5))["original"] == '{"type":"like"}'


def test_display_name_prefers_title_then_brand_and_category_leaf() -> None:
    from features.catalog import display_name

    assert display_name("1", b"Gift Card", b"Acme", None) == "Gift Card"
    assert display_name("2", b"", b"samsung", b"electronics > smartphone") == "samsung smartphone"
    assert display_name("3", None, None, None) == "3"
