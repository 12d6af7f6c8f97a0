"""Dead letters: a rejected record, its origin and the reason, for `recs.dlq`.

The value is a JSON envelope so the record can be read with any tool; the
original bytes travel base64-encoded (they may not be UTF-8, or not even
text) and, when they are valid UTF-8, also as plain text for reading.  The
reason is repeated in headers so a consumer can filter without parsing.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import orjson

SCHEMA = 1


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    original: bytes | None

    def value(self, now_ms: int) -> bytes:
        text: str | None
        try:
            text = None if self.original is None else self.original.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        return orjson.dumps(
            {
                "schema": SCHEMA,
                "reason": self.reason,
                "detail": self.detail,
                "source": {"topic": self.topic, "partition": self.partition, "offset": self.offset},
                "key": None if self.key is None else self.key.decode("utf-8", "replace"),
                "original": text,
                "original_b64": None
                if self.original is None
                else base64.b64encode(self.original).decode(),
                "dead_lettered_ts": now_ms,
            }
        )

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("shoprec-reason", self.reason.encode()),
            ("shoprec-source-topic", self.topic.encode()),
            ("shoprec-source-partition", str(self.partition).encode()),
            ("shoprec-source-offset", str(self.offset).encode()),
        ]


def original_bytes(envelope: bytes) -> bytes | None:
    """The rejected record's bytes, back from a dead letter's value."""
    b64 = orjson.loads(envelope).get("original_b64")
    return None if b64 is None else base64.b64decode(b64)


def event_id_of(original: bytes | None) -> str | None:
    """The event id of a rejected record, when it is JSON enough to have one (for logs)."""
    try:
        doc = orjson.loads(original or b"")
    except orjson.JSONDecodeError:
        return None
    value = doc.get("event_id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None
