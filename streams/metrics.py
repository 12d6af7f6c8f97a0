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

    def latency_percentiles(self) -> dict[str, float]:
        if not self.latencies_ms:
            return {}
        arr = np.fromiter(self.latencies_ms, dtype=np.float64)
        return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 95, 99)}

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
        }
