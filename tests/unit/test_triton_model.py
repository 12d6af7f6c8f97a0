"""The pure parts of the Triton glue and the one-call pipeline shared by every
``fused_ranker`` version.

The glue itself (decoding, per-request errors, the follower thread) runs inside a real
tritonserver in tests/integration/test_triton_models.py and test_trained_ranker.py.
"""

from __future__ import annotations

import numpy as np

from features.ann import TableIndex
from features.item_table import ItemTable
from ranking.fusion import FusionScorer, Reason
from ranking.pipeline import RecommendRequest, empty_request, recommend
from ranking.triton_model import DEFAULT_REFRESH_INTERVAL_S, refresh_interval_s
from shoprec.events import EventType

D = 384


def user_request(rng: np.random.Generator, b: int, width: int, k: int) -> RecommendRequest:
    """``b`` users with random taste, a ``width``-long history and trending list."""
    req = empty_request(b, k=k, n=20)
    emb = rng.standard_normal((b, D)).astype(np.float32)
    return RecommendRequest(
        **req.arrays()
        | {
            "user_emb": emb / np.linalg.norm(emb, axis=1, keepdims=True),
            "history": rng.integers(0, 30, (b, width)).astype(np.int32),
            "history_types": np.full((b, width), EventType.CART, np.int32),
            "history_age_s": rng.uniform(0, 1e4, (b, width)).astype(np.float32),
            "trending": np.tile(np.arange(30, 30 + width, dtype=np.int32), (b, 1)),
            "trending_score": np.tile(np.linspace(9, 1, width, dtype=np.float32), (b, 1)),
        }
    )


def test_a_dynamic_batch_gives_each_request_what_recommending_it_alone_gives() -> None:
    rng = np.random.default_rng(5)
    table = ItemTable()
    table.upsert([f"i{k}" for k in range(60)], rng.standard_normal((60, D)).astype(np.float32))
    index, scorer = TableIndex(table), FusionScorer()
    # Requests of different widths, user counts and k, as the dynamic batcher merges them.
    requests = [user_request(rng, 1, 3, 5), user_request(rng, 2, 7, 8)]
    merged = recommend(RecommendRequest.concat(requests), table, index, scorer)
    start = 0
    for request in requests:
        alone = recommend(request, table, index, scorer).arrays()
        for name, got in merged.arrays().items():
            part = got[start : start + request.size, : request.k]
            np.testing.assert_allclose(part, alone[name], rtol=1e-6)
        start += request.size
    assert (merged.items[:, :5] >= 0).all()


def test_refresh_interval_from_the_model_config() -> None:
    param = {"ITEM_REFRESH_INTERVAL_S": {"string_value": "0.25"}}
    assert refresh_interval_s({"parameters": param}) == 0.25
    assert refresh_interval_s({}) == DEFAULT_REFRESH_INTERVAL_S


def test_turns_run_on_when_one_side_runs_out_and_padding_comes_last() -> None:
    from ranking.pipeline import take_turns

    inf = np.inf
    scores = np.array([[0.5, 9.0, -inf, 1.0, 1.0, 1.0, 2.0]], np.float32)
    complement = np.array([[False, True, False, True, True, True, False]])
    # Ranker by score: 6 (2.0), 0 (0.5); complements in column order: 1, 3, 4, 5; 2 pads.
    assert take_turns(scores, complement).tolist() == [[6, 1, 0, 3, 4, 5, 2]]
    none = np.zeros_like(complement)
    assert take_turns(scores, none).tolist() == [[1, 6, 3, 4, 5, 0, 2]], "by score, stable on ties"
    # In the ranker's order the complements follow their scores, co-purchase order on ties.
    scores = np.array([[0.5, 1.0, -inf, 3.0, 1.0, 2.0, 2.0]], np.float32)
    assert take_turns(scores, complement).tolist() == [[6, 1, 0, 3, 4, 5, 2]]
    assert take_turns(scores, complement, "ranker").tolist() == [[6, 3, 0, 5, 1, 4, 2]]


def test_after_a_purchase_complements_take_turns_with_the_rankers_picks() -> None:
    rng = np.random.default_rng(8)
    table = ItemTable()
    table.upsert([f"i{k}" for k in range(60)], rng.standard_normal((60, D)).astype(np.float32))
    index, scorer = TableIndex(table), FusionScorer()
    plain = user_request(rng, 2, 4, 10)
    basket = int(plain.history[0, 0])
    bought = RecommendRequest(
        **plain.arrays()
        | {
            # Row 0 just bought its newest item; 57 was bought with it most, then 3, then
            # that very item (which a filter keeps out of the list).
            "history_types": np.where(
                np.arange(4) == 0, EventType.PURCHASE, plain.history_types
            ).astype(np.int32),
            "bought_with": np.array([[57, 3, basket], [-1, -1, -1]], np.int32),
            "bought_with_score": np.array([[5.0, 2.0, 1.0], [0, 0, 0]], np.float32),
            "bought_with_source": np.full((2, 3), basket, np.int32),
        }
    )
    got = recommend(bought, table, index, scorer)
    alone = recommend(plain, table, index, scorer)
    # The ranker's best, the strongest complement, the ranker's next, the next complement,
    # then the ranker's own order; the item just bought is never listed.
    ranker = [i for i in alone.items[0].tolist() if i not in (57, 3)]
    assert got.items[0, :4].tolist() == [ranker[0], 57, ranker[1], 3]
    assert got.items[0, 4:].tolist() == ranker[2 : got.items.shape[1] - 2]
    assert got.reasons[0, [1, 3]].tolist() == [Reason.BOUGHT_WITH] * 2
    assert got.source_item[0, [1, 3]].tolist() == [basket, basket]
    assert basket not in got.items[0].tolist()
    others = np.delete(got.reasons[0], [1, 3]).tolist()
    assert Reason.BOUGHT_WITH not in others
    # A user without complements is untouched.
    assert got.items[1].tolist() == alone.items[1].tolist()
    # A version whose learner chose fewer complements serves at most that many, whatever
    # the request carries; none gives the ranker's list alone.
    scorer.complements = 1
    one = recommend(bought, table, index, scorer)
    assert one.items[0, :3].tolist() == [ranker[0], 57, ranker[1]]
    assert one.reasons[0].tolist().count(Reason.BOUGHT_WITH) == 1
    # In the ranker's order the same two complements, the one it scores higher first.
    scorer.complements, scorer.complement_order = None, "ranker"
    by_ranker = recommend(bought, table, index, scorer)
    first, second = by_ranker.items[0, [1, 3]].tolist()
    assert {first, second} == {57, 3} and by_ranker.scores[0, 1] >= by_ranker.scores[0, 3]
    assert by_ranker.items[0, [0, 2]].tolist() == ranker[:2]
    assert by_ranker.reasons[0, [1, 3]].tolist() == [Reason.BOUGHT_WITH] * 2
    # The co-purchase counts reversed: the same list in the ranker's order, the
    # complements swapped in co-purchase order.
    reversed_counts = RecommendRequest(
        **bought.arrays() | {"bought_with": np.array([[3, 57, basket], [-1, -1, -1]], np.int32)}
    )
    again = recommend(reversed_counts, table, index, scorer)
    assert again.items.tolist() == by_ranker.items.tolist()
    scorer.complement_order = "co-purchase"
    swapped = recommend(reversed_counts, table, index, scorer)
    assert swapped.items[0, [1, 3]].tolist() == [3, 57]
    scorer.complements, scorer.complement_order = 0, "co-purchase"
    assert recommend(bought, table, index, scorer).items.tolist() == alone.items.tolist()


def test_an_item_of_the_users_past_is_explained_as_theirs() -> None:
    rng = np.random.default_rng(3)
    table = ItemTable()
    table.upsert([f"i{k}" for k in range(60)], rng.standard_normal((60, D)).astype(np.float32))
    base = empty_request(1, k=10, n=10)
    # Nothing but the user's history (41 bought, 42 viewed; 40 in view), their memory
    # (13, seen long ago, and the history's items) and a trending list that holds 41, 42
    # and 13 among other items.
    request = RecommendRequest(
        **base.arrays()
        | {
            "history": np.array([[40, 41, 40, 42]], np.int32),
            "history_types": np.array(
                [[EventType.VIEW, EventType.PURCHASE, EventType.CART, EventType.VIEW]], np.int32
            ),
            "history_age_s": np.array([[0.0, 9e5, 9e5, 1e6]], np.float32),
            "memory": np.array([[40, 41, 13, 42, -1]], np.int32),
            "memory_count": np.array([[2.0, 1.0, 1.0, 1.0, 0.0]], np.float32),
            "in_view": np.array([[40]], np.int32),
            "trending": np.array([[42, 10, 41, *range(11, 18)]], np.int32),
            "trending_score": np.linspace(9, 1, 10, dtype=np.float32)[None, :],
        }
    )
    got = recommend(request, table, TableIndex(table), FusionScorer())
    reasons = dict(zip(got.items[0].tolist(), got.reasons[0].tolist(), strict=True))
    assert reasons[41] == Reason.BOUGHT_BEFORE, "a purchase of it is in the history"
    assert reasons[42] == Reason.SEEN_BEFORE
    assert reasons[13] == Reason.SEEN_BEFORE, "the memory keeps no types: seen before"
    assert 40 not in reasons, "the item in view is never listed"
    theirs = (Reason.BOUGHT_BEFORE, Reason.SEEN_BEFORE)
    assert all(r not in theirs for i, r in reasons.items() if i not in (41, 42, 13))
