"""Worker counters and latency figures, logged periodically.

Every input record ends in exactly one bucket: ``dead_lettered``,
``duplicates``, ``rate_limited``, ``coalesced``, ``suppressed`` (events of an erased
user from before the erase request), ``held_out`` (triggers of users in an experiment's
holdout arm, who get no list) or ``recommended`` (users a recommendation was
published for), so ``events_in`` always equals their sum: nothing is dropped without a
count.  ``re_emitted`` counts recommendations published
again for redelivered triggers (a worker died between writing the state and publishing);
their events are in ``duplicates``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# Histogram bounds (ms) for the Prometheus endpoint: cumulative counts survive scrapes,
# unlike the bounded deques the percentile log line is computed from.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
)  # fmt: skip


@dataclass(slots=True)
class Histogram:
    """Cumulative-ready bucket counts (the last bucket is +Inf) and their sum."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_MS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


@dataclass(slots=True)
class WorkerStats:
    events_in: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    rate_limited: int = 0
    coalesced: int = 0
    suppressed: int = 0
    recommended: int = 0
    held_out: int = 0
    re_emitted: int = 0
    degraded: int = 0
    catalog_items: int = 0
    catalog_dead_lettered: int = 0
    latencies_ms: deque[int] = field(default_factory=lambda: deque(maxlen=10_000))
    stage_ms: dict[str, deque[float]] = field(default_factory=dict)
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=10_000))
    # For the Prometheus endpoint (streams.observability): cumulative, never trimmed.
    events_by_topic: Counter[str] = field(default_factory=Counter)
    dead_by_reason: Counter[str] = field(default_factory=Counter)
    triton_errors: int = 0  # ranker calls served by the fallback + failed query embeddings
    event_age_ms: Histogram = field(default_factory=Histogram)
    stage_hist_ms: dict[str, Histogram] = field(default_factory=dict)
    # (experiment, arm, what) -> count: users assigned, lists shown, clicks, carts and
    # purchases credited, revenue credited, and every purchase and its spend by the buyer's arm.
    experiment: dict[tuple[str, str, str], float] = field(default_factory=dict)

    def record_stages(self, stages: dict[str, float]) -> None:
        for name, ms in stages.items():
            self.stage_ms.setdefault(name, deque(maxlen=10_000)).append(ms)
            self.stage_hist_ms.setdefault(name, Histogram()).observe(ms)

    def observe_batch(
        self,
        topics: Iterable[str],
        dead_reasons: Iterable[str],
        ages_ms: Sequence[int],
        triton_errors: int = 0,
    ) -> None:
        """Per-topic input, dead letters by reason, and event age at emission of one batch."""
        self.triton_errors += triton_errors
        self.events_by_topic.update(topics)
        self.dead_by_reason.update(dead_reasons)
        for age in ages_ms:
            self.event_age_ms.observe(age)

    def observe_experiment(self, name: str, counts: Mapping[tuple[str, str], float]) -> None:
        """Add a batch's per-arm counts (``(arm, what) -> n``) of experiment ``name``."""
        for (arm, what), n in counts.items():
            key = (name, arm, what)
            self.experiment[key] = self.experiment.get(key, 0.0) + n

    def latency_percentiles(self) -> dict[str, float]:
        return percentiles(self.latencies_ms)

    def summary(self) -> dict[str, object]:
        return {
            "events_in": self.events_in,
            "recommended": self.recommended,
            "dead_lettered": self.dead_lettered,
            "duplicates": self.duplicates,
            "rate_limited": self.rate_limited,
            "coalesced": self.coalesced,
            "suppressed": self.suppressed,
            "held_out": self.held_out,
            "re_emitted": self.re_emitted,
            "degraded": self.degraded,
            "catalog_items": self.catalog_items,
            "latency_ms": self.latency_percentiles(),
            "batch_size": percentiles(self.batch_sizes),
            "stages_ms": {k: percentiles(v) for k, v in self.stage_ms.items()},
        }


def percentiles(values: Collection[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.fromiter(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(arr, q)), 2) for q in (50, 95, 99)}
