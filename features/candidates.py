"""Candidate mixing: merge ranked sources with quotas, filter, attach the ranker's signals.

Everything here works on item numbers (``features.item_table``; -1 is padding) in
``[B, ...]`` arrays, one row per user of a micro-batch, so it runs as a handful of numpy
operations per batch: inside Triton, where the ranker retrieves and mixes, and in the
worker's fallback when Triton is down.

Sources, each with a quota of the ``n`` candidates:
* ``complement`` — after a purchase only: what other customers bought together with the
  basket (co-purchase, ``{i:<item>}:cb``), all of them, ahead of every other source; the
  ranker places them first in the list too (``ranking.pipeline.recommend``);
* ``semantic`` — nearest items to the rolling user embedding (and, for a search, to the
  query, interleaved: :func:`interleave`);
* ``covis`` — co-visitation neighbours of the user's latest items;
* ``category`` — trending within the categories of the user's latest items, or of their
  query if they have only searched (a user with one event already gets their category's
  best sellers);
* ``trending`` — the most popular items of the trailing hour and day.
Each source arrives ranked (the worker orders co-visitation and popularity by score, ties
by item id, :func:`ranked`).  Quota a source cannot fill passes to the next source in
that order, so a cold user's list fills from their category before the whole shop; slots
still free at the end are refilled from the sources' leftovers, in source order.
Complements take their slots from the end (trending first), and their unused quota passes
to no one: a list without complements is mixed exactly as if the source did not exist.

Filters: the item must be in the catalogue and in stock, not bought by the user recently
(:data:`JUST_PURCHASED_MS`), not the item the user is looking at, and not taken twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shoprec.events import EventType

I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
Bools = npt.NDArray[np.bool_]

SOURCES = ("complement", "semantic", "covis", "category", "trending")
"""Source codes of :attr:`Mixed.source`, in mixing order."""
# Quotas of the n candidates; trending gets the rest.  Co-visitation was the strongest
# single source on three of the four datasets (bench/results/features.json); at 30 of 100
# the mix fell 0.04 below it on UCI (a first run, on a time-span split); at 40 it is within
# 0.015 on UCI and Amazon and above every single source on rees46 and OTTO.
SEMANTIC_SHARE = 0.4
COVIS_SHARE = 0.4
CATEGORY_SHARE = 0.1
# A purchase blocks the item for this long (event time): long enough not to offer what was
# just bought, short enough that consumables and wholesalers' restocks come back.
JUST_PURCHASED_MS = 24 * 3_600_000


@dataclass(frozen=True)
class Mixed:
    """Each user's candidates in mixing order, ``[B, n]``, -1 padding."""

    items: I64
    source: I32
    """Index into :data:`SOURCES`; -1 for padding."""
    signals: F32
    """``[B, n, 3]``: co-visitation, popularity, retrieval cosine (0 where absent)."""


def quotas(n: int) -> list[int]:
    """Candidates each source may fill, in :data:`SOURCES` order (complements: all of them,
    up to ``n``; trending: the rest of the others')."""
    q = [int(n * SEMANTIC_SHARE), int(n * COVIS_SHARE), int(n * CATEGORY_SHARE)]
    return [n, *q, n - sum(q)]


def blocked(history: I64, history_types: I32, history_age_s: F32, in_view: I64) -> I64:
    """``[B, H + 1]`` items each user must not be shown now: bought within
    :data:`JUST_PURCHASED_MS` of their newest event, and the item in view; -1 pads.

    Ages are seconds from each history event back to the trigger (negative for an event
    later than the trigger), so "newest event" is the smallest age.
    """
    real = history_types > 0
    newest = np.where(real, history_age_s, np.inf).min(axis=1, keepdims=True)
    recent = (history_age_s - newest) <= JUST_PURCHASED_MS / 1000.0
    bought = real & (history_types == EventType.PURCHASE) & recent
    return np.concatenate([np.where(bought, history, -1), in_view[:, None]], axis=1)


def interleave(first: I64, first_scores: F32, second: I64, second_scores: F32) -> tuple[I64, F32]:
    """Row by row: first[0], second[0], first[1], second[1], ..., then the longer row's
    rest; an item already placed is skipped (a search's query neighbours and the user's).
    Rows are -1-padded ranked lists; the result keeps the width of both together."""
    b = first.shape[0]
    width = first.shape[1] + second.shape[1]
    out = np.full((b, width), -1, np.int64)
    out_scores = np.zeros((b, width), np.float32)
    for r in range(b):  # searches are a small share of events: rows, not the batch
        a = [(int(i), float(s)) for i, s in zip(first[r], first_scores[r], strict=True) if i >= 0]
        c = [(int(i), float(s)) for i, s in zip(second[r], second_scores[r], strict=True) if i >= 0]
        pairs = [p for two in zip(a, c, strict=False) for p in two]
        pairs += a[len(c) :] + c[len(a) :]
        seen: set[int] = set()
        k = 0
        for item, score in pairs:
            if item not in seen:
                seen.add(item)
                out[r, k], out_scores[r, k] = item, score
                k += 1
    return out, out_scores


def mix(
    sources: tuple[I64, I64, I64, I64, I64],
    scores: tuple[F32, F32, F32, F32, F32],
    in_stock: Bools,
    blocked_items: I64,
    n: int,
) -> Mixed:
    """Merge the five ranked ``sources`` (:data:`SOURCES` order, each ``[B, width]``) into
    ``n`` candidates per user, as the module docstring says.

    ``scores`` are each source's scores (complement: decayed co-purchase count, not a
    ranker signal; semantic: cosine; covis: decayed count; category and trending:
    popularity); ``in_stock`` is indexed by item number; ``blocked_items`` ``[B, m]`` (see
    :func:`blocked`).
    """
    b = sources[0].shape[0]
    cand = np.concatenate(sources, axis=1).astype(np.int64)
    seg_of = np.concatenate([np.full(s.shape[1], k, np.int32) for k, s in enumerate(sources)])
    bounds = np.cumsum([0] + [s.shape[1] for s in sources])
    # One key per (user, item): membership tests for the whole batch at once.
    stride = max(int(cand.max(initial=-1)), int(blocked_items.max(initial=-1)), 0) + 1
    key = np.arange(b, dtype=np.int64)[:, None] * stride + cand
    known = (cand >= 0) & (cand < in_stock.shape[0])
    ok = np.zeros(cand.shape, np.bool_)
    ok[known] = in_stock[cand[known]]
    blocked_keys = (np.arange(b, dtype=np.int64)[:, None] * stride + blocked_items)[
        blocked_items >= 0
    ]
    ok &= ~_isin(key, blocked_keys)

    taken = np.zeros(cand.shape, np.bool_)
    leftover = np.zeros(cand.shape, np.bool_)
    taken_keys = np.zeros(0, np.int64)
    carry = np.zeros(b, np.int64)
    for k, q in enumerate(quotas(n)):
        lo, hi = bounds[k], bounds[k + 1]
        quota = q + carry
        if hi > lo:
            seg_key = key[:, lo:hi]
            free = ok[:, lo:hi] & ~_isin(seg_key, taken_keys)
            rank = np.cumsum(free, axis=1) - 1
            take = free & (rank < quota[:, None])
            taken[:, lo:hi] = take
            leftover[:, lo:hi] = free & ~take
            taken_keys = np.concatenate([taken_keys, seg_key[take]])
            quota = quota - take.sum(axis=1)
        # What this source could not use passes to the next; complements' quota is not a
        # share of the others', so theirs passes to no one.
        carry = quota if SOURCES[k] != "complement" else np.zeros(b, np.int64)

    # Leftovers in source order fill what is still free, each item once.
    spare = leftover & ~_isin(key, taken_keys)
    flat = np.flatnonzero(spare.ravel())
    _, first = np.unique(key.ravel()[flat], return_index=True)
    once = np.zeros(cand.size, np.bool_)
    once[flat[first]] = True
    spare &= once.reshape(cand.shape)
    room = np.maximum(n - taken.sum(axis=1), 0)
    refill = spare & ((np.cumsum(spare, axis=1) - 1) < room[:, None])

    width = cand.shape[1]
    cols = np.arange(width)
    order_key = np.where(taken, cols, np.where(refill, width + cols, 2 * width + cols))
    order = np.argsort(order_key, axis=1, kind="stable")[:, :n]
    chosen = np.take_along_axis(taken | refill, order, axis=1)
    items = np.where(chosen, np.take_along_axis(cand, order, axis=1), -1)
    source = np.where(chosen, seg_of[order], -1).astype(np.int32)
    if items.shape[1] < n:
        pad = ((0, 0), (0, n - items.shape[1]))
        items = np.pad(items, pad, constant_values=-1)
        source = np.pad(source, pad, constant_values=-1)
    # The ranker's signals; complements get theirs from the other sources (0 if absent).
    _, sem, cov, cat, trn = range(len(SOURCES))
    covis, _ = _lookup(items, sources[cov], scores[cov])
    trend, in_trending = _lookup(items, sources[trn], scores[trn])
    category, _ = _lookup(items, sources[cat], scores[cat])
    retrieval, _ = _lookup(items, sources[sem], scores[sem])
    popularity = np.where(in_trending, trend, category)
    signals = np.stack([covis, popularity, retrieval], axis=-1).astype(np.float32)
    return Mixed(items, source, signals)


def _isin(keys: I64, members: I64) -> Bools:
    """``np.isin`` for the batch's (user, item) keys: by a lookup table while the key range
    is small (micro-batches over catalogues up to a few hundred thousand items), else by
    sorting."""
    if members.size == 0:
        return np.zeros(keys.shape, np.bool_)
    small = int(keys.max(initial=0)) < 1 << 26
    out: Bools = np.isin(keys, members, kind="table" if small else "sort")
    return out


def _lookup(items: I64, keys: I64, values: F32) -> tuple[F32, Bools]:
    """``values[b, j]`` where ``keys[b, j] == items[b, i]`` for each ``items[b, i]`` (0 and
    False where absent; keys are unique per row): one sort and one binary search for the
    whole batch, not a [B, n, width] comparison."""
    if keys.shape[1] == 0:
        return np.zeros(items.shape, np.float32), np.zeros(items.shape, np.bool_)
    stride = max(int(items.max(initial=0)), int(keys.max(initial=0))) + 2
    rows = np.arange(items.shape[0], dtype=np.int64)[:, None]
    flat_keys = (rows * stride + keys + 1).ravel()  # +1: padding (-1) gets its own key
    order = np.argsort(flat_keys, kind="stable")
    sorted_keys = flat_keys[order]
    wanted = (rows * stride + items + 1).ravel()
    at = np.minimum(np.searchsorted(sorted_keys, wanted), sorted_keys.size - 1)
    found = (sorted_keys[at] == wanted) & (items.ravel() >= 0)
    picked = values.ravel()[order[at]]
    out = np.where(found, picked, np.float32(0.0)).astype(np.float32).reshape(items.shape)
    return out, found.reshape(items.shape)


def ranked(scores: dict[str, float]) -> list[str]:
    """Items by score, best first (ties by id, so retrieval is deterministic)."""
    return [i for i, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))]
