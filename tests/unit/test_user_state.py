"""The rolling-embedding arithmetic and the history encoding."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from features.user_state import (
    HistoryEntry,
    decayed_sum,
    decode_history,
    encode_history_entry,
    normalise,
)

DIM = 8
HALF_LIFE = 3_600_000.0

events = st.lists(
    st.tuples(
        st.integers(1_600_000_000_000, 1_600_000_000_000 + 10 * 86_400_000),
        st.sampled_from([1.0, 2.0, 3.0, 4.0]),
        st.lists(st.floats(-1, 1, allow_nan=False), min_size=DIM, max_size=DIM),
    ),
    min_size=1,
    max_size=12,
)


def _as_vectors(evs: list[tuple[int, float, list[float]]]) -> list[tuple[int, float, np.ndarray]]:
    return [(t, w, np.array(v, dtype=np.float32)) for t, w, v in evs]


def incremental(evs: list[tuple[int, float, np.ndarray]]) -> np.ndarray:
    """What the Lua script does, one event at a time, in arrival order."""
    total, ref = None, -1
    for ts, w, vec in evs:
        if total is None:
            total, ref = w * vec.astype(np.float64), ts
        elif ts >= ref:
            total = total * 2 ** (-(ts - ref) / HALF_LIFE) + w * vec
            ref = ts
        else:
            total = total + w * 2 ** (-(ref - ts) / HALF_LIFE) * vec
    assert total is not None
    return total


@settings(max_examples=200, deadline=None)
@given(events, st.randoms())
def test_arrival_order_does_not_change_the_embedding(evs: list, rnd: object) -> None:
    vecs = _as_vectors(evs)
    shuffled = list(vecs)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    expected, _ = decayed_sum(vecs, HALF_LIFE)
    np.testing.assert_allclose(incremental(shuffled), expected, rtol=1e-4, atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(events)
def test_normalised_embedding_has_unit_length_or_is_zero(evs: list) -> None:
    total, _ = decayed_sum(_as_vectors(evs), HALF_LIFE)
    n = float(np.linalg.norm(normalise(total, DIM)))
    assert n == 0.0 or abs(n - 1.0) < 1e-5


def test_history_survives_pipes_in_item_ids_and_sorts_by_event_time() -> None:
    raw = [
        encode_history_entry(HistoryEntry("a|b", "view", 10)),
        encode_history_entry(HistoryEntry("c", "purchase", 30)),
    ]
    assert [e.item_id for e in decode_history(raw)] == ["c", "a|b"]
