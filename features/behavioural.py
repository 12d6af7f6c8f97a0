"""Behavioural embeddings: an item without text borrows a vector from what is seen with it.

An item the shop gave no title, category or brand gets no BERT vector, so
nearest-neighbour retrieval could never return it and it would add nothing to
a user's taste.  Its behavioural embedding is the co-visitation-weighted mean
of its neighbours' text embeddings, L2-normalised: "the kind of thing people
look at next to it".  Only text embeddings feed it (never other behavioural
ones), so it cannot drift away from the text space by feeding on itself.

Stored as ``bemb`` in the item hash, beside (never instead of) ``emb``: a
later catalogue record with text replaces it in retrieval, and the catalogue
writer's ``emb`` handling is untouched.  Each change is appended to
``items:log`` so every worker's index picks it up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
from redis.asyncio import Redis

from features import keys
from features.catalog import ITEM_LOG_MAXLEN
from features.user_state import Vector, normalise, vector_from_bytes, vector_to_bytes

NEIGHBOURS = 20
# Rewrite a stored vector only when it moved this far (cosine): spares followers the churn.
MIN_CHANGE_COS = 0.999


def behavioural_vector(
    neighbours: Sequence[tuple[str, float]], text_vector: Callable[[str], Vector | None]
) -> Vector | None:
    """Weighted mean of the neighbours' text vectors, normalised; None when none has text.

    Weights are forward-decayed counts (huge or tiny numbers with a common scale): they are
    divided by the largest first, so float32 arithmetic neither overflows nor underflows.
    """
    top = max((w for _, w in neighbours), default=0.0)
    if not top > 0:
        return None
    total: npt.NDArray[np.float64] | None = None
    for item_id, weight in neighbours:
        vec = text_vector(item_id)
        if vec is None or weight <= 0:
            continue
        contribution = (weight / top) * vec.astype(np.float64)
        total = contribution if total is None else total + contribution
    if total is None:
        return None
    out = normalise(total.astype(np.float32), total.shape[0])
    return out if np.any(out) else None


async def refresh_behavioural(
    redis: Redis,
    item_ids: Sequence[str],
    text_vector: Callable[[str], Vector | None],
    neighbours: int = NEIGHBOURS,
) -> int:
    """Recompute and store the behavioural embeddings of ``item_ids``; returns how many changed.

    Two round trips: the neighbours and current vectors of every item, then the writes.
    """
    if not item_ids:
        return 0
    async with redis.pipeline(transaction=False) as pipe:
        for item_id in item_ids:
            pipe.zrevrange(keys.item_covis(item_id), 0, neighbours - 1, withscores=True)
            pipe.hget(keys.item(item_id), "bemb")
            pipe.exists(keys.item(item_id))
        raw = await pipe.execute()
    changed = 0
    async with redis.pipeline(transaction=False) as pipe:
        for k, item_id in enumerate(item_ids):
            rows, current, exists = raw[3 * k], raw[3 * k + 1], raw[3 * k + 2]
            if not exists:
                continue  # left the catalogue: writing would resurrect a hash
            found = [(m.decode(), float(s)) for m, s in rows]
            vec = changed_vector(found, vector_from_bytes(current), text_vector)
            if vec is None:
                continue
            pipe.hset(keys.item(item_id), "bemb", vector_to_bytes(vec))
            pipe.xadd(keys.ITEM_LOG, {"id": item_id}, maxlen=ITEM_LOG_MAXLEN, approximate=True)
            changed += 1
        if changed:
            await pipe.execute()
    return changed


def changed_vector(
    neighbours: Sequence[tuple[str, float]],
    current: Vector | None,
    text_vector: Callable[[str], Vector | None],
) -> Vector | None:
    """The item's new behavioural vector, or None when there is none or it barely moved
    (the Redis store and the in-memory store both decide with this)."""
    vec = behavioural_vector(neighbours, text_vector)
    return None if vec is None or _unchanged(current, vec) else vec


def _unchanged(current: Vector | None, new: Vector) -> bool:
    return (
        current is not None
        and current.shape == new.shape
        and float(current @ new) >= MIN_CHANGE_COS
    )
