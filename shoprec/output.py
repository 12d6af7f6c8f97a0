"""The output contract on `recs.out` (DESIGN §4), schema version 1.

Key = user id.  Value::

    {"schema": 1, "user_id": str,
     "items": [{"item_id": str, "score": float, "reasons": [str, ...]}, ...],
     "model": "fused_ranker@<version>" | "retrieval@fallback",
     "trigger": {"event_id": str, "type": str, "ts": int},
     "emitted_ts": int, "latency_ms": int, "degraded": bool,
     "list_id": str, "experiment": str, "arm": str}

``list_id`` (added in schema 1) names this list: a click, cart or purchase of one of its
items within ``SHOPREC_ATTRIBUTION_WINDOW_MS`` is credited to it (``features.attribution``);
a list emitted again for a redelivered trigger keeps its id
(:func:`shoprec.experiments.list_id`).  ``experiment`` and ``arm`` (added) say which
experiment and arm the user is in (``shoprec.experiments``; ``"live"`` and ``"ranker"``
when none is configured).

Fields are only ever added, never renamed or removed, within one schema
version; a breaking change bumps ``schema``.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

SCHEMA = 1


@dataclass(frozen=True, slots=True)
class RecItem:
    item_id: str
    score: float
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Recommendation:
    user_id: str
    items: tuple[RecItem, ...]
    model: str
    trigger_event_id: str
    trigger_type: str
    trigger_ts: int
    emitted_ts: int
    degraded: bool
    list_id: str = ""
    experiment: str = ""
    arm: str = ""

    @property
    def latency_ms(self) -> int:
        return self.emitted_ts - self.trigger_ts

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "schema": SCHEMA,
                "user_id": self.user_id,
                "items": [
                    {"item_id": i.item_id, "score": round(i.score, 6), "reasons": list(i.reasons)}
                    for i in self.items
                ],
                "model": self.model,
                "trigger": {
                    "event_id": self.trigger_event_id,
                    "type": self.trigger_type,
                    "ts": self.trigger_ts,
                },
                "emitted_ts": self.emitted_ts,
                "latency_ms": self.latency_ms,
                "degraded": self.degraded,
                "list_id": self.list_id,
                "experiment": self.experiment,
                "arm": self.arm,
            }
        )
