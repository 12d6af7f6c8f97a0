"""``shoprec replay --diff``: how a replay's recommendations differ from another run's.

Both sides are read from their topics (by default the replay topic against
``recs.out``) and matched by the event that triggered them, so only triggers
both sides answered are compared; the rest is counted as only-on-one-side
(coalescing and flood control may choose different triggers when batches fall
differently).  For each common trigger: identical (same items, same order),
reordered (same items), or changed, with overlap@K = |top-K ∩ top-K| / K'
(K' the longer list, at most K).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from ops.ranges import read_topic
from shoprec.settings import Settings


@dataclass(frozen=True, slots=True)
class RecView:
    """The part of a recs.out record a comparison needs."""

    user_id: str
    trigger: str
    items: tuple[str, ...]
    model: str


def parse_recs(values: list[bytes]) -> dict[str, RecView]:
    """Trigger event id -> its recommendation (the latest, when a trigger appears twice)."""
    out: dict[str, RecView] = {}
    for value in values:
        try:
            rec = orjson.loads(value)
            view = RecView(
                str(rec["user_id"]),
                str(rec["trigger"]["event_id"]),
                tuple(str(i["item_id"]) for i in rec["items"]),
                str(rec["model"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue  # not a recommendation record: not ours to judge here
        out[view.trigger] = view
    return out


def overlap_at(a: tuple[str, ...], b: tuple[str, ...], k: int) -> float:
    top_a, top_b = a[:k], b[:k]
    denominator = max(len(top_a), len(top_b))
    if denominator == 0:
        return 1.0
    return len(set(top_a) & set(top_b)) / denominator


@dataclass(slots=True)
class DiffReport:
    replay_topic: str
    base_topic: str
    k: int
    compared: int = 0
    identical: int = 0
    reordered: int = 0
    changed: int = 0
    only_in_replay: int = 0
    only_in_base: int = 0
    mean_overlap: float = 1.0
    overlap_histogram: dict[str, int] = field(default_factory=dict)
    models: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def differences(self) -> int:
        return self.reordered + self.changed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"differences": self.differences}


def diff_recs(
    replayed: dict[str, RecView],
    base: dict[str, RecView],
    k: int = 10,
    replay_topic: str = "",
    base_topic: str = "",
    max_examples: int = 5,
) -> DiffReport:
    report = DiffReport(replay_topic, base_topic, k)
    common = sorted(replayed.keys() & base.keys())
    report.only_in_replay = len(replayed.keys() - base.keys())
    report.only_in_base = len(base.keys() - replayed.keys())
    report.compared = len(common)
    buckets: Counter[str] = Counter()
    total = 0.0
    for trigger in common:
        a, b = replayed[trigger], base[trigger]
        overlap = overlap_at(a.items, b.items, k)
        total += overlap
        buckets[f"{overlap:.1f}"] += 1
        if a.items[:k] == b.items[:k]:
            report.identical += 1
            continue
        if set(a.items[:k]) == set(b.items[:k]):
            report.reordered += 1
        else:
            report.changed += 1
        if len(report.examples) < max_examples:
            report.examples.append(
                {
                    "trigger": trigger,
                    "user_id": a.user_id,
                    f"overlap@{k}": round(overlap, 3),
                    "base": list(b.items[:k]),
                    "replay": list(a.items[:k]),
                }
            )
    report.mean_overlap = round(total / len(common), 4) if common else 1.0
    report.overlap_histogram = dict(sorted(buckets.items()))
    report.models = {
        "replay": dict(Counter(replayed[t].model for t in common)),
        "base": dict(Counter(base[t].model for t in common)),
    }
    return report


async def diff_topics(
    settings: Settings, replay_topic: str, base_topic: str, k: int = 10
) -> DiffReport:
    replayed = parse_recs([r.value for r in await read_topic(settings, replay_topic) if r.value])
    base = parse_recs([r.value for r in await read_topic(settings, base_topic) if r.value])
    return diff_recs(replayed, base, k, replay_topic, base_topic)
