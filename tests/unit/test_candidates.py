"""Candidate mixing over item numbers: quotas, filters and signals, for a whole batch.

``reference_mix`` is the rule written as a plain loop, one user at a time (what the
worker ran before the mixing moved into Triton); the vectorised :func:`mix` must agree
with it on every row of random batches.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from features.candidates import SOURCES, blocked, interleave, mix, quotas
from shoprec.events import EventType

N = 100


def reference_mix(
    sources: list[list[tuple[int, float]]], in_stock: set[int], blocked_items: set[int], n: int
) -> list[tuple[int, str, tuple[float, float, float]]]:
    """The mixing rule, a user at a time: (item, source, (covis, popularity, retrieval))."""
    _, semantic, covis, category, trending = (dict(s) for s in sources)
    out: list[tuple[int, str]] = []
    seen: set[int] = set()
    leftovers: list[tuple[int, str]] = []
    carry = 0
    for (name, items), quota in zip(zip(SOURCES, sources, strict=True), quotas(n), strict=True):
        quota += carry
        taken = 0
        for item, _ in items:
            if item in seen or item in blocked_items or item not in in_stock:
                continue
            if taken < quota and len(out) < n:
                seen.add(item)
                out.append((item, name))
                taken += 1
            else:
                leftovers.append((item, name))
        # Complements take from no one's quota, so their unused quota passes to no one.
        carry = quota - taken if name != "complement" else 0
    for item, name in leftovers:
        if len(out) >= n:
            break
        if item not in seen:
            seen.add(item)
            out.append((item, name))
    return [
        (i, s, (covis.get(i, 0.0), trending.get(i, category.get(i, 0.0)), semantic.get(i, 0.0)))
        for i, s in out
    ]


def padded(rows: list[list[tuple[int, float]]], width: int) -> tuple[np.ndarray, np.ndarray]:
    nums = np.full((len(rows), max(1, width)), -1, np.int64)
    vals = np.zeros(nums.shape, np.float32)
    for r, row in enumerate(rows):
        for j, (i, s) in enumerate(row):
            nums[r, j], vals[r, j] = i, s
    return nums, vals


@pytest.mark.parametrize("seed", range(40))
def test_the_batch_mix_equals_the_rule_user_by_user(seed: int) -> None:
    rnd = random.Random(seed)
    m, b = rnd.choice([30, 300]), 24
    in_stock = {i for i in range(m) if rnd.random() < 0.85}

    def ranked_source(most: int) -> list[tuple[int, float]]:
        picked = rnd.sample(range(m + 5), rnd.randrange(0, min(most, m)))  # unknown ones too
        return sorted(((i, float(rnd.randrange(1, 6))) for i in picked), key=lambda p: -p[1])

    shop = ranked_source(80)
    users = [
        [
            ranked_source(12) if rnd.random() < 0.4 else [],  # after a purchase
            ranked_source(50),
            ranked_source(60),
            ranked_source(50),
            shop,
        ]
        for _ in range(b)
    ]
    blocks = [set(rnd.sample(range(m), rnd.randrange(0, 6))) for _ in range(b)]
    arrays = [padded([u[k] for u in users], 80) for k in range(len(SOURCES))]
    got = mix(
        tuple(a[0] for a in arrays),  # type: ignore[arg-type]
        tuple(a[1] for a in arrays),  # type: ignore[arg-type]
        np.array([i in in_stock for i in range(m)]),
        padded([[(i, 0.0) for i in x] for x in blocks], 6)[0],
        N,
    )
    for r, (u, no) in enumerate(zip(users, blocks, strict=True)):
        want = reference_mix(u, in_stock, no, N)
        k = len(want)
        assert got.items[r, :k].tolist() == [i for i, _, _ in want]
        assert [SOURCES[s] for s in got.source[r, :k]] == [s for _, s, _ in want]
        np.testing.assert_allclose(got.signals[r, :k], [sig for _, _, sig in want])
        assert (got.items[r, k:] == -1).all() and (got.source[r, k:] == -1).all()


def test_unused_quota_flows_to_the_users_category_before_the_whole_shop() -> None:
    empty = np.full((1, 1), -1, np.int64)
    category = np.arange(10)[None, :]
    shop = np.arange(10, 20)[None, :]
    got = mix(
        (empty, empty, empty, category, shop),
        (np.zeros((1, 1), np.float32),) * 3 + (np.ones((1, 10), np.float32),) * 2,
        np.ones(20, bool),
        empty,
        10,
    )
    # No taste, no co-visitation: their 8 slots and the category's 1 go to the category.
    assert [SOURCES[s] for s in got.source[0]].count("category") == 9
    assert got.items[0].tolist() == [*range(9), 10]


def test_complements_come_first_and_take_their_slots_from_the_end() -> None:
    def row(*items: int) -> np.ndarray:
        return np.array([list(items)], np.int64)

    ones = np.ones((1, 4), np.float32)
    others = (row(1, 2, 3, 4), row(5, 6, 7, 8), row(9, 10, 11, 12), row(13, 14, 15, 16))

    def mixed(complements: np.ndarray) -> list[int]:
        got = mix(
            (complements, *others),
            (np.ones(complements.shape, np.float32), ones, ones, ones, ones),
            np.ones(40, bool),
            row(-1),
            10,
        )
        return [int(i) for i in got.items[0]]

    without = mixed(row(-1))
    assert mixed(row(30, 31)) == [30, 31, *without[:8]]
    # A complement the user may not be shown (blocked or out of stock) leaves no hole.
    assert mixed(row(30, 99)) == [30, *without[:9]]


def test_a_purchase_blocks_its_item_for_a_day_only_and_the_item_in_view_always() -> None:
    day_s = 24 * 3600.0
    history = np.array([[7, 5, 3]])  # newest first: a view, then two purchases
    types = np.array([[EventType.VIEW, EventType.PURCHASE, EventType.PURCHASE]], np.int32)
    ages = np.array([[0.0, 1.0, 2 * day_s]], np.float32)  # the old purchase is 2 days back
    got = blocked(history, types, ages, np.array([9]))
    assert sorted(int(x) for x in got[0] if x >= 0) == [5, 9]


def test_a_search_interleaves_query_and_taste_neighbours_once_each() -> None:
    q, qs = np.array([[1, 2, -1]]), np.array([[0.9, 0.8, 0.0]], np.float32)
    u, us = np.array([[2, 3, 4, 5]]), np.array([[0.7, 0.6, 0.5, 0.4]], np.float32)
    items, scores = interleave(q, qs, u, us)
    assert items[0].tolist() == [1, 2, 3, 4, 5, -1, -1]
    assert scores[0, :5].tolist() == pytest.approx([0.9, 0.7, 0.6, 0.5, 0.4])
