"""The after-purchase measurement's signals (bench/after_purchase.py)."""

from __future__ import annotations

import numpy as np

from bench.after_purchase import _Counts, _rank


def test_the_mix_orders_by_co_purchase_then_co_view_then_popularity() -> None:
    c = _Counts(6)
    for a, b in [(0, 1), (0, 1), (0, 2)]:  # bought with item 0: 1 twice, 2 once
        c.pair(c.bought, a, b)
    for a, b in [(0, 3), (0, 3), (0, 3), (0, 4), (0, 2)]:  # viewed with 0: 3 most, then 2, 4
        c.pair(c.view, a, b)
    c.pop[:] = [0, 0, 0, 0, 0, 9]  # 5 is only popular
    mix = c.scores("co-purchase, then co-view", [0])
    order = [int(i) for i in np.argsort(-mix, kind="stable") if i != 0]
    # Co-purchase first (1 over 2), then co-view among the rest (3 over 4), popularity last.
    assert order == [1, 2, 3, 4, 5]
    # Pairs count both ways, and the other signals are what they say.
    assert c.bought[1][0] == 2 and c.view[3][0] == 3
    assert list(np.argsort(-c.scores("co-view", [0]), kind="stable")[:2]) == [3, 2]


def test_a_rank_skips_what_cannot_be_shown_and_counts_ties_half() -> None:
    scores = np.array([5.0, 4.0, 4.0, 4.0, 1.0])
    # Item 0 is blocked (just bought), 2 is another positive: item 1 ties with 3 only.
    assert _rank(scores, 1, blocked={0}, positives={1, 2}) == 1.5
    assert _rank(scores, 4, blocked=set(), positives={4}) == 5.0
