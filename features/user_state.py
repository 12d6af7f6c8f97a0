"""The maths of a user's state, as pure functions (the Lua script mirrors them).

Event weights: ``shoprec.events.EVENT_WEIGHTS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One line of a user's recent history."""

    item_id: str
    type: str
    ts: int


def encode_history_entry(entry: HistoryEntry) -> str:
    return f"{entry.item_id}|{entry.type}|{entry.ts}"


def decode_history_entry(raw: str | bytes) -> HistoryEntry:
    text = raw.decode() if isinstance(raw, bytes) else raw
    # Item ids may contain "|": split from the right.
    item_id, etype, ts = text.rsplit("|", 2)
    return HistoryEntry(item_id, etype, int(ts))


def decode_history(raw: list[bytes] | list[str]) -> list[HistoryEntry]:
    """History newest first (by event time, not arrival)."""
    return by_event_time([decode_history_entry(r) for r in raw])


def by_event_time(entries: list[HistoryEntry]) -> list[HistoryEntry]:
    """A stored history (newest arrival first) as the read path gives it: newest event time
    first, arrival order kept among equal times."""
    entries.sort(key=lambda e: e.ts, reverse=True)
    return entries


def vector_to_bytes(vec: Vector) -> bytes:
    return np.asarray(vec, dtype="<f4").tobytes()


def vector_from_bytes(raw: bytes | None) -> Vector | None:
    if not raw:
        return None
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def normalise(vec: Vector | None, dim: int) -> Vector:
    """L2-normalise; a missing or zero vector becomes zeros (the ranker's 'unknown')."""
    if vec is None:
        return np.zeros(dim, dtype=np.float32)
    norm = float(np.linalg.norm(vec))
    if norm == 0.0 or not np.isfinite(norm):
        return np.zeros(dim, dtype=np.float32)
    return (vec / norm).astype(np.float32)


def decayed_sum(events: list[tuple[int, float, Vector]], half_life_ms: float) -> tuple[Vector, int]:
    """Reference implementation of the script's sum: (Σ wᵢ·2^-(ref-tᵢ)/h · vᵢ, ref = max t)."""
    ref = max(ts for ts, _, _ in events)
    total = np.zeros_like(events[0][2], dtype=np.float64)
    for ts, weight, vec in events:
        total += weight * 2.0 ** (-(ref - ts) / half_life_ms) * vec.astype(np.float64)
    return total.astype(np.float32), ref


@dataclass(frozen=True, slots=True)
class EmbeddingState:
    """The update script's embedding state, as a value: what the pure mirror folds events into."""

    total: npt.NDArray[np.float64] | None = None
    ref_ts: int = -1
    seen: frozenset[str] = frozenset()


def embedding_step(
    total: npt.NDArray[np.float64] | None,
    ref_ts: int,
    ts: int,
    weight: float,
    vec: npt.NDArray[np.float64],
    half_life_ms: float,
) -> npt.NDArray[np.float64]:
    """The decayed sum after one more event, in update_user.lua's operations and order
    (doubles; the script then stores float32, and so does the in-memory store).

    A newer event rescales the sum to its time; an older one is added with its own decay.
    """
    if total is None or ref_ts < 0:
        return vec * weight
    if ts >= ref_ts:
        out: npt.NDArray[np.float64] = total * 2.0 ** (-(ts - ref_ts) / half_life_ms) + vec * weight
        return out
    late: npt.NDArray[np.float64] = total + vec * (weight * 2.0 ** (-(ref_ts - ts) / half_life_ms))
    return late


def fold_event(
    state: EmbeddingState, event_id: str, ts: int, weight: float, vec: Vector, half_life_ms: float
) -> EmbeddingState:
    """One event into the decayed sum, exactly as update_user.lua does it.

    A seen id changes nothing; otherwise :func:`embedding_step`.  Either way the sum
    equals :func:`decayed_sum` of the distinct events, whatever the arrival order.
    """
    if event_id in state.seen:
        return state
    total = embedding_step(
        state.total, state.ref_ts, ts, weight, vec.astype(np.float64), half_life_ms
    )
    return EmbeddingState(total, max(state.ref_ts, ts), state.seen | {event_id})
