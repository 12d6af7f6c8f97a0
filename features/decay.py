"""Time-decayed counters that Redis can keep with plain ``ZINCRBY``: forward decay.

A count decayed with half-life ``h`` at time ``t`` is ``Σ wᵢ·2^-(t-tᵢ)/h``.
Rewritten as ``2^-(t-A)/h · Σ wᵢ·2^(tᵢ-A)/h`` for a fixed landmark ``A``, the
sum no longer depends on ``t``: each event adds ``wᵢ·2^(tᵢ-A)/h`` once, in any
order (a late event is simply a smaller increment), and a reader scales by
``2^-(t-A)/h``.  Within one sorted set the scale is common to every member, so
``ZREVRANGE`` already ranks by decayed count (Cormode et al., "Forward decay",
ICDE 2009).  Doubles hold the factor for ±1,000 half-lives around ``A``: with a
14-day half-life, event times from 1980 to 2060.

Popularity windows are hour and day buckets; "the last hour" at ``t`` is the
current bucket plus the previous one weighted by the part of it still inside
the window (the sliding-window estimate of rate limiters).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

LANDMARK_MS: Final = 1_577_836_800_000  # 2020-01-01T00:00Z
HOUR_MS: Final = 3_600_000
DAY_MS: Final = 24 * HOUR_MS
COVIS_HALF_LIFE_MS: Final = 14 * DAY_MS
MEMORY_HALF_LIFE_MS: Final = 180 * DAY_MS
"""A user's memory of items (``keys.user_memory``): a shopper comes back for what they
bought months ago (measured on uci-online-retail, the repeat baseline picked 180 days on
validation among none, 7, 30 and 180)."""
# Beyond this many half-lives from the landmark a double over- or underflows.
_MAX_EXPONENT: Final = 1000.0


def _exponent(ts_ms: int, half_life_ms: float) -> float:
    e = (ts_ms - LANDMARK_MS) / half_life_ms
    return max(-_MAX_EXPONENT, min(_MAX_EXPONENT, e))


def forward_weight(ts_ms: int, half_life_ms: float = COVIS_HALF_LIFE_MS) -> float:
    """What an event at ``ts_ms`` adds to a forward-decayed counter (times its own weight)."""
    return float(2.0 ** _exponent(ts_ms, half_life_ms))


def decayed_value(stored: float, now_ms: int, half_life_ms: float = COVIS_HALF_LIFE_MS) -> float:
    """A forward-decayed counter read at ``now_ms``: the count as if decayed all along."""
    return float(stored * 2.0 ** -_exponent(now_ms, half_life_ms))


def window_buckets(ts_ms: int, bucket_ms: int) -> tuple[int, int, float]:
    """(current bucket, previous bucket, weight of the previous) for a trailing window."""
    bucket = ts_ms // bucket_ms
    elapsed = (ts_ms - bucket * bucket_ms) / bucket_ms
    return bucket, bucket - 1, 1.0 - elapsed


def sliding_window(
    current: Iterable[tuple[str, float]], previous: Iterable[tuple[str, float]], prev_weight: float
) -> dict[str, float]:
    """Counts over the trailing window from the current and previous bucket's counts."""
    out = {item: score for item, score in current}
    for item, score in previous:
        out[item] = out.get(item, 0.0) + prev_weight * score
    return out
