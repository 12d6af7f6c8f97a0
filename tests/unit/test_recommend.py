"""The recommender's pure parts: the degraded ordering and the words of a reason."""

from __future__ import annotations

import numpy as np

from features.candidates import Mixed
from features.item_table import ItemTable
from ranking.fusion import Reason
from ranking.pipeline import FallbackScorer, empty_request
from streams.recommend import explanation


def test_fallback_orders_by_retrieval_signals_and_explains_by_the_strongest() -> None:
    items = np.array([[0, 1, 2, -1]])
    signals = np.zeros((1, 4, 3), np.float32)
    signals[0, 0] = [0.0, 0.0, 0.9]  # covis, popularity, retrieval cosine
    signals[0, 1] = [5.0, 0.0, 0.0]
    signals[0, 2] = [0.0, 30.0, 0.0]
    cands = Mixed(items, np.zeros((1, 4), np.int32), signals)
    fallback = FallbackScorer()
    scores = fallback.score(empty_request(1), cands, ItemTable())
    assert list(np.argsort(-scores[0, :3])) == [0, 1, 2]
    reasons, match = fallback.explain(empty_request(1), items[:, :3], signals[:, :3], ItemTable())
    assert [Reason(int(r)) for r in reasons[0]] == [Reason.SIMILAR, Reason.COVISIT, Reason.POPULAR]
    assert (match == -1).all()  # no "similar to <item>" claim without the ranker


def test_reasons_read_as_words_with_item_names() -> None:
    name = "samsung smartphone"
    assert explanation(Reason.SIMILAR, name, False) == ("similar to samsung smartphone",)
    assert explanation(Reason.COVISIT, name, True) == (
        "often seen together with samsung smartphone",
        "trending",
    )
    assert explanation(Reason.SIMILAR, None, False) == ("matches your taste",)
    assert explanation(Reason.POPULAR, None, True) == ("trending",)
    assert explanation(Reason.NONE, None, False) == ("picked for you",)
    assert explanation(Reason.QUERY, None, True) == ("matches your search", "trending")
    assert explanation(Reason.BOUGHT_WITH, name, False) == (
        "often bought together with samsung smartphone",
    )
    assert explanation(Reason.BOUGHT_BEFORE, None, True) == ("you bought this before", "trending")
    assert explanation(Reason.SEEN_BEFORE, None, False) == ("you viewed this before",)
