"""The input contracts (DESIGN §3): the event-type vocabulary, shop events and catalogue
records.

Parsing is a pure function from the record's bytes to a frozen dataclass, or
an :class:`~shoprec.errors.InvalidEvent` naming what is wrong.  Unknown extra
fields are ignored so producers can add fields without breaking the worker;
every field that is read is type-checked and size-capped.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import orjson

from shoprec.errors import InvalidEvent


class EventType(IntEnum):
    """The event types of the shop topics; the code is what the ranker reads
    (``HISTORY_TYPES``), and 0 pads a history."""

    PAD = 0
    VIEW = 1
    CLICK = 2
    CART = 3
    PURCHASE = 4
    SEARCH = 5

    @property
    def label(self) -> str:
        """The name events carry in their ``type`` field (``"view"`` ...)."""
        return self.name.lower()


EVENT_TYPES: Final = tuple(t.label for t in EventType if t is not EventType.PAD)
"""What an event's ``type`` may be: view, click, cart, purchase, search."""
_CODES: Final = {t.label: t for t in EventType if t is not EventType.PAD}

# What an event says about taste: a purchase most, then a cart, a click, a view.  A
# search contributes the query's embedding with the weight of a click.
EVENT_WEIGHTS: Final[dict[str, float]] = {
    "view": 1.0,
    "click": 2.0,
    "search": 2.0,
    "cart": 3.0,
    "purchase": 4.0,
}


def event_code(event_type: str) -> int:
    """The :class:`EventType` code of an event's ``type`` (0, padding, for an unknown one)."""
    return _CODES.get(event_type, EventType.PAD)


def tie_break(event_id: str) -> int:
    """Where an event goes among events of the same timestamp: a stable 64-bit hash of its id.

    Wherever shoprec puts events in time order (training replay, evaluation, ``produce``),
    equal timestamps are ordered by this, never by file order: the amazon data lists one
    user's same-day reviews by item id, and co-visitation would learn that id order.
    """
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "big")


# Event time before this is not a shop event but a broken clock or a unit
# mistake (seconds instead of milliseconds): 2000-01-01T00:00:00Z.
MIN_TS_MS: Final = 946_684_800_000


@dataclass(frozen=True, slots=True)
class Limits:
    """Input guards, taken from the settings."""

    max_event_bytes: int = 16_384
    max_field_chars: int = 512
    max_future_skew_ms: int = 5 * 60_000


@dataclass(frozen=True, slots=True)
class ShopEvent:
    """One user action on a shop topic."""

    event_id: str
    type: str
    user_id: str
    ts: int
    item_id: str | None = None
    query: str | None = None
    session_id: str | None = None
    price: float | None = None
    qty: int | None = None


@dataclass(frozen=True, slots=True)
class CatalogItem:
    """One record of the ``catalog.items`` topic."""

    item_id: str
    title: str | None = None
    description: str | None = None
    category: str | None = None
    brand: str | None = None
    price: float | None = None
    in_stock: bool = True
    ts: int = 0

    def text(self) -> str:
        """What BERT reads for this item; empty when the shop gave no text at all."""
        parts = [self.title, self.category, self.brand]
        head = " | ".join(p for p in parts if p)
        if self.description:
            # MiniLM truncates at 128 tokens anyway; the title must come first.
            head = f"{head}. {self.description[:400]}" if head else self.description[:400]
        return head.strip()


def _load_object(raw: bytes | None, limits: Limits) -> dict[str, Any]:
    if raw is None:
        raise InvalidEvent("empty", "record has no value")
    if len(raw) > limits.max_event_bytes:
        raise InvalidEvent(
            "too_large", f"record is {len(raw)} bytes, the limit is {limits.max_event_bytes}"
        )
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("not_json", f"value is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidEvent("not_object", f"value is JSON {type(obj).__name__}, not an object")
    return obj


def _text(obj: dict[str, Any], name: str, limits: Limits, *, required: bool) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise InvalidEvent("missing_field", f"field {name!r} is required")
        return None
    # Numeric ids are common in shop exports; accept them, but never bools.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidEvent("wrong_type", f"field {name!r} must be a string")
    value = value.strip()
    if not value:
        if required:
            raise InvalidEvent("missing_field", f"field {name!r} is empty")
        return None
    if len(value) > limits.max_field_chars:
        raise InvalidEvent(
            "field_too_long",
            f"field {name!r} has {len(value)} characters, the limit is {limits.max_field_chars}",
        )
    if "\x00" in value:
        raise InvalidEvent("bad_text", f"field {name!r} contains a NUL character")
    return value


def _number(obj: dict[str, Any], name: str) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidEvent("wrong_type", f"field {name!r} must be a number")
    if not math.isfinite(value) or abs(value) > 1e12:
        raise InvalidEvent("out_of_range", f"field {name!r} is out of range")
    return float(value)


def _timestamp(obj: dict[str, Any], now_ms: int, limits: Limits) -> int:
    ts = obj.get("ts")
    if ts is None:
        raise InvalidEvent("missing_field", "field 'ts' is required (ms since epoch)")
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise InvalidEvent("wrong_type", "field 'ts' must be an integer (ms since epoch)")
    if ts < MIN_TS_MS:
        raise InvalidEvent("ts_too_old", f"ts {ts} is before 2000-01-01 (seconds, not ms?)")
    if ts > now_ms + limits.max_future_skew_ms:
        raise InvalidEvent(
            "ts_in_future", f"ts {ts} is {(ts - now_ms) // 1000} s ahead of the worker's clock"
        )
    return ts


def parse_event(raw: bytes | None, *, now_ms: int, limits: Limits) -> ShopEvent:
    """Validate one shop event record; raise :class:`InvalidEvent` with the reason."""
    obj = _load_object(raw, limits)
    kind = obj.get("type")
    if kind not in EVENT_TYPES:
        raise InvalidEvent("unknown_type", f"type {kind!r} is not one of {', '.join(EVENT_TYPES)}")
    is_search = kind == "search"
    qty = _number(obj, "qty")
    return ShopEvent(
        event_id=_text(obj, "event_id", limits, required=True) or "",
        type=kind,
        user_id=_text(obj, "user_id", limits, required=True) or "",
        ts=_timestamp(obj, now_ms, limits),
        item_id=_text(obj, "item_id", limits, required=not is_search),
        query=_text(obj, "query", limits, required=is_search),
        session_id=_text(obj, "session_id", limits, required=False),
        price=_number(obj, "price"),
        qty=None if qty is None else int(qty),
    )


def parse_catalog_item(key: bytes | None, raw: bytes | None, *, limits: Limits) -> CatalogItem:
    """Validate one catalogue record (not a tombstone: see :func:`tombstone_item_id`)."""
    obj = _load_object(raw, limits)
    item_id = _text(obj, "item_id", limits, required=True) or ""
    if key is not None and key.decode("utf-8", "replace") != item_id:
        raise InvalidEvent("key_mismatch", f"record key {key!r} differs from item_id {item_id!r}")
    in_stock = obj.get("in_stock", True)
    if not isinstance(in_stock, bool):
        raise InvalidEvent("wrong_type", "field 'in_stock' must be true or false")
    ts = obj.get("ts", 0)
    if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
        raise InvalidEvent("wrong_type", "field 'ts' must be a non-negative integer")
    long_text = Limits(limits.max_event_bytes, limits.max_event_bytes, limits.max_future_skew_ms)
    return CatalogItem(
        item_id=item_id,
        title=_text(obj, "title", limits, required=False),
        description=_text(obj, "description", long_text, required=False),
        category=_text(obj, "category", limits, required=False),
        brand=_text(obj, "brand", limits, required=False),
        price=_number(obj, "price"),
        in_stock=in_stock,
        ts=ts,
    )


def tombstone_item_id(key: bytes | None, limits: Limits) -> str:
    """The item a tombstone (null value) removes, taken from the record key."""
    if not key:
        raise InvalidEvent("missing_key", "a tombstone needs the item id as its key")
    item_id = key.decode("utf-8", "replace").strip()
    if not item_id or len(item_id) > limits.max_field_chars:
        raise InvalidEvent("bad_key", "tombstone key is empty or too long")
    return item_id


# --- control records (topic shop.control) -----------------------------------------------------

FORGET_USER: Final = "forget_user"
CONTROL_TYPES: Final = (FORGET_USER,)


@dataclass(frozen=True, slots=True)
class ForgetRequest:
    """A customer's erase request: ``{"type": "forget_user", "user_id", "ts"?}``, keyed by
    the user id.  ``ts`` (ms) is when the customer asked; the handler's clock without it."""

    user_id: str
    ts: int


def parse_control(
    key: bytes | None, raw: bytes | None, *, now_ms: int, limits: Limits
) -> ForgetRequest:
    """Validate one control record; raise :class:`InvalidEvent` with the reason."""
    obj = _load_object(raw, limits)
    kind = obj.get("type")
    if kind not in CONTROL_TYPES:
        raise InvalidEvent(
            "unknown_type", f"type {kind!r} is not one of {', '.join(CONTROL_TYPES)}"
        )
    user_id = _text(obj, "user_id", limits, required=True) or ""
    if key is not None and key.decode("utf-8", "replace") != user_id:
        # The tombstone goes out under the user id: a producer that keys by something
        # else has a bug that would leave the real key's recommendations in place.
        raise InvalidEvent("key_mismatch", "record key differs from user_id")
    ts = now_ms if obj.get("ts") is None else _timestamp(obj, now_ms, limits)
    return ForgetRequest(user_id=user_id, ts=ts)
