"""The recommender's pure parts: the degraded ordering and the words of a reason."""

from __future__ import annotations

import numpy as np

from ranking.client import RankBatch, Reason
from streams.recommend import _fallback_scores, _interleave, _Pick


def test_fallback_orders_by_retrieval_signals_and_marks_itself_degraded() -> None:
    batch = RankBatch.empty(1, 2, 4)
    batch.candidate_ids[0, :3] = ["close", "covisited", "popular"]
    batch.signals[0, 0] = [0.0, 0.0, 0.9]  # covis, popularity, retrieval cosine
    batch.signals[0, 1] = [5.0, 0.0, 0.0]
    batch.signals[0, 2] = [0.0, 30.0, 0.0]
    scored = _fallback_scores(batch)
    assert scored.degraded and scored.model == "retrieval@fallback"
    assert np.isneginf(scored.scores[0, 3])
    assert list(np.argsort(-scored.scores[0, :3])) == [0, 1, 2]
    assert [Reason(int(r)) for r in scored.reasons[0, :3]] == [
        Reason.SIMILAR,
        Reason.COVISIT,
        Reason.POPULAR,
    ]


def test_reasons_read_as_words_with_item_names() -> None:
    names = {"h1": "samsung smartphone"}
    assert _Pick("a", 1.0, Reason.SIMILAR, "h1", False).reasons(names) == (
        "similar to samsung smartphone",
    )
    assert _Pick("a", 1.0, Reason.COVISIT, "h1", True).reasons(names) == (
        "often seen together with samsung smartphone",
        "trending",
    )
    assert _Pick("a", 1.0, Reason.SIMILAR, None, False).reasons({}) == ("matches your taste",)
    assert _Pick("a", 1.0, Reason.POPULAR, None, True).reasons({}) == ("trending",)
    assert _Pick("a", 1.0, Reason.NONE, None, False).reasons({}) == ("picked for you",)


def test_interleave_alternates_and_drops_repeats() -> None:
    got = _interleave([("q1", 0.9), ("x", 0.5)], [("u1", 0.8), ("x", 0.4), ("u2", 0.1)])
    assert [i for i, _ in got] == ["q1", "u1", "x", "u2"]
