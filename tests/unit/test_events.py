"""The event contract: what is accepted, and the reason given for what is not."""

from __future__ import annotations

import orjson
import pytest

from shoprec.errors import InvalidEvent
from shoprec.events import Limits, parse_catalog_item, parse_event, tombstone_item_id

NOW = 1_764_000_000_000
LIMITS = Limits(max_event_bytes=2048, max_field_chars=64, max_future_skew_ms=60_000)


def event(**fields: object) -> bytes:
    base: dict[str, object] = {
        "event_id": "e1",
        "type": "click",
        "user_id": "u1",
        "item_id": "i1",
        "ts": NOW - 1000,
    }
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not None})


def reason(raw: bytes | None) -> str:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw, now_ms=NOW, limits=LIMITS)
    return info.value.reason


def test_a_real_rees46_event_parses() -> None:
    raw = (
        b'{"event_id":"rees-0","type":"view","user_id":"541312140","item_id":"44600062",'
        b'"ts":1569888000000,"session_id":"72d76fde","price":35.79}'
    )
    e = parse_event(raw, now_ms=NOW, limits=LIMITS)
    assert (e.type, e.user_id, e.item_id, e.price) == ("view", "541312140", "44600062", 35.79)


def test_numeric_ids_are_accepted_as_strings() -> None:
    e = parse_event(event(user_id=17850, item_id=85123), now_ms=NOW, limits=LIMITS)
    assert (e.user_id, e.item_id) == ("17850", "85123")


def test_search_needs_a_query_and_no_item() -> None:
    e = parse_event(
        event(type="search", item_id=None, query=" red shoes "), now_ms=NOW, limits=LIMITS
    )
    assert e.query == "red shoes" and e.item_id is None
    assert reason(event(type="search", item_id=None)) == "missing_field"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, "empty"),
        (b"{not json", "not_json"),
        (b"[1,2]", "not_object"),
        (event(type="like"), "unknown_type"),
        (event(user_id=None), "missing_field"),
        (event(user_id=""), "missing_field"),
        (event(user_id=True), "wrong_type"),
        (event(item_id=["a"]), "wrong_type"),
        (event(ts="yesterday"), "wrong_type"),
        (event(ts=1_700_000_000), "ts_too_old"),
        (event(ts=NOW + 3_600_000), "ts_in_future"),
        (event(item_id="x" * 65), "field_too_long"),
        (event(item_id="a\x00b"), "bad_text"),
        (event(price="12"), "wrong_type"),
        (event(note="y" * 4000), "too_large"),
    ],
)
def test_bad_events_name_their_reason(raw: bytes | None, expected: str) -> None:
    assert reason(raw) == expected


def test_catalog_item_text_puts_the_title_first() -> None:
    item = parse_catalog_item(
        b"B1",
        orjson.dumps(
            {"item_id": "B1", "title": "Gift Card", "brand": "Acme", "description": "For you."}
        ),
        limits=LIMITS,
    )
    assert item.text() == "Gift Card | Acme. For you."
    bare = parse_catalog_item(None, b'{"item_id": "7", "in_stock": false}', limits=LIMITS)
    assert bare.text() == "" and bare.in_stock is False


def test_catalog_key_must_match_the_item() -> None:
    with pytest.raises(InvalidEvent, match="key_mismatch"):
        parse_catalog_item(b"other", b'{"item_id": "B1"}', limits=LIMITS)


def test_tombstone_names_its_item_by_key() -> None:
    assert tombstone_item_id(b"B1", LIMITS) == "B1"
    with pytest.raises(InvalidEvent):
        tombstone_item_id(None, LIMITS)
