"""Worker counters and latency figures, logged periodically.

Every input record ends in exactly one bucket: ``dead_lettered``,
``duplicates``, ``rate_limited``, ``coalesced`` or ``recommended`` (users a
recommendation was published for), so ``events_in`` always equals their sum:
nothing is dropped without a count.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class WorkerStats:
    events_in: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    rate_limited: int = 0
    coalesced: int = 0
    recommended: int = 0
    degraded: int = 0
    catalog_items: int = 0
    catalog_dead_lettered: int = 0
    latencies_ms: deque[int] = field(default_factory=lambda: deque(maxlen=10_000))
    stage_ms: dict[str, deque[float]] = field(default_factory=dict)
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=10_000))

    def record_stages(self, stages: dict[str, float]) -> None:
        for name, ms in stages.items():
            self.stage_ms.setdefault(name, deque(maxlen=10_000)).append(ms)

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
            "degraded": self.degraded,
            "catalog_items": self.catalog_items,
            "latency_ms": self.latency_percentiles(),
            "batch_size": percentiles(self.batch_sizes),
            "stages_ms": {k: percentiles(v) for k, v in self.stage_ms.items()},
        }


def percentiles(values: deque[int] | deque[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.fromiter(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(arr, q)), 2) for q in (50, 95, 99)}
