"""Forward-decayed counters and trailing popularity windows."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from features.decay import (
    COVIS_HALF_LIFE_MS,
    DAY_MS,
    HOUR_MS,
    LANDMARK_MS,
    decayed_value,
    forward_weight,
    sliding_window,
    window_buckets,
)
from features.store import Popularity, popularity_keys

T0 = 1_291_000_000_000  # 2010, before the landmark: the UCI data lives there


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 200 * DAY_MS), st.floats(0.5, 4.0)), min_size=1),
    st.integers(0, 10 * DAY_MS),
)
def test_forward_decay_equals_decay_from_each_event(events: list, later: int) -> None:
    now = T0 + max(t for t, _ in events) + later
    stored = sum(w * forward_weight(T0 + t) for t, w in events)  # any order: a plain sum
    direct = sum(w * 2.0 ** (-(now - T0 - t) / COVIS_HALF_LIFE_MS) for t, w in events)
    assert math.isclose(decayed_value(stored, now), direct, rel_tol=1e-9)


def test_a_pair_counts_half_after_one_half_life() -> None:
    stored = forward_weight(LANDMARK_MS + 5 * DAY_MS)
    assert math.isclose(decayed_value(stored, LANDMARK_MS + 19 * DAY_MS), 0.5)


def test_weights_stay_finite_far_from_the_landmark() -> None:
    for ts in (0, LANDMARK_MS + 80 * 365 * DAY_MS):
        assert 0.0 < forward_weight(ts) < math.inf


def test_trailing_hour_counts_the_unexpired_part_of_the_previous_bucket() -> None:
    ts = 10 * HOUR_MS + HOUR_MS // 4
    cur, prev, w = window_buckets(ts, HOUR_MS)
    assert (cur, prev, w) == (10, 9, 0.75)
    got = sliding_window([("a", 2.0)], [("a", 4.0), ("b", 1.0)], w)
    assert got == {"a": 5.0, "b": 0.75}


def test_trending_blends_the_hour_with_the_days_hourly_rate() -> None:
    pop = Popularity(hour={"a": 1.0}, day={"a": 24.0, "b": 48.0})
    assert pop.trending() == {"a": 2.0, "b": 2.0}


def test_an_event_counts_overall_and_in_its_category() -> None:
    ts = 3 * DAY_MS + 5 * HOUR_MS
    names = [k for k, _ in popularity_keys(ts, "shoes")]
    assert names == ["pop:h:77", "pop:d:3", "pop:h:77:c:shoes", "pop:d:3:c:shoes"]
    assert len(popularity_keys(ts, None)) == 2
