"""The rolling-embedding arithmetic and the history encoding."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from features.user_state import (
    EmbeddingState,
    HistoryEntry,
    decayed_sum,
    decode_history,
    encode_history_entry,
    fold_event,
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


def incremental(
    evs: list[tuple[int, float, np.ndarray]], ids: list[str] | None = None
) -> np.ndarray:
    """What the Lua script does, one event at a time, in arrival order."""
    state = EmbeddingState()
    for n, (ts, w, vec) in enumerate(evs):
        eid = ids[n] if ids is not None else f"e{n}-{ts}-{w}"
        state = fold_event(state, eid, ts, w, vec, HALF_LIFE)
    assert state.total is not None
    return state.total


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


@settings(max_examples=200, deadline=None)
@given(events, st.data())
def test_replayed_event_ids_change_nothing(evs: list, data: st.DataObject) -> None:
    """Any event re-delivered any number of times, anywhere in the stream, is counted once."""
    vecs = _as_vectors(evs)
    ids = [f"e{n}" for n in range(len(vecs))]
    repeats = data.draw(st.lists(st.integers(0, len(vecs) - 1), max_size=10))
    order = data.draw(st.permutations(list(range(len(vecs))) + repeats))
    replayed = incremental([vecs[i] for i in order], [ids[i] for i in order])
    np.testing.assert_allclose(replayed, decayed_sum(vecs, HALF_LIFE)[0], rtol=1e-4, atol=1e-5)


def test_history_survives_pipes_in_item_ids_and_sorts_by_event_time() -> None:
    raw = [
        encode_history_entry(HistoryEntry("a|b", "view", 10)),
        encode_history_entry(HistoryEntry("c", "purchase", 30)),
    ]
    assert [e.item_id for e in decode_history(raw)] == ["c", "a|b"]
