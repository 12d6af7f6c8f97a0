"""Candidate retrieval: quotas, filters and signals, on a small in-memory catalogue."""

from __future__ import annotations

import numpy as np

from features.ann import ExactIndex
from features.candidates import mix_candidates, nearest, semantic_neighbours
from features.store import UserContext
from features.user_state import HistoryEntry


class Catalog:
    def __init__(
        self, vectors: dict[str, np.ndarray | None], sold_out: set[str] = frozenset()
    ) -> None:  # type: ignore[assignment]
        self.vectors = vectors
        self.sold_out = sold_out

    def nearest(self, vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        ids = [i for i, v in self.vectors.items() if v is not None and i not in self.sold_out]
        matrix = np.stack([self.vectors[i] for i in ids]).astype(np.float32)  # type: ignore[misc]
        return ExactIndex(matrix, ids).search(vectors, k)

    def in_stock(self, item_id: str) -> bool:
        return item_id in self.vectors and item_id not in self.sold_out


def unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_nearest_is_exact_and_ordered() -> None:
    matrix = np.stack([unit(1, 0), unit(0, 1), unit(1, 1)])
    rows, scores = nearest(matrix, np.stack([unit(1, 0.1)]), 2)
    assert rows.tolist() == [[0, 2]]
    assert scores[0, 0] > scores[0, 1]


def test_zero_vector_retrieves_nothing() -> None:
    cat = Catalog({"a": unit(1, 0)})
    assert semantic_neighbours(cat, np.zeros((1, 2), np.float32), 5) == [[]]


def test_filters_block_bought_viewed_sold_out_and_unknown_items() -> None:
    cat = Catalog(
        {"a": unit(1, 0), "b": unit(1, 0.2), "c": unit(0, 1), "d": None, "e": unit(1, 1)},
        sold_out={"e"},
    )
    ctx = UserContext(
        embedding=unit(1, 0),
        query=np.zeros(2, np.float32),
        history=[HistoryEntry("a", "purchase", 5)],
        covis={"d": 3.0, "zz-unknown": 9.0, "e": 1.0},
        covis_source={"d": "a"},
    )
    semantic = semantic_neighbours(cat, ctx.embedding[None, :], 5)[0]
    got = mix_candidates(ctx, semantic, {"c": 7.0, "b": 1.0}, cat, item_in_view="b", n=10)
    assert set(got.item_ids) == {"c", "d"}
    d = got.item_ids.index("d")
    assert (got.source[d], got.covis[d], got.retrieval[d]) == ("covis", 3.0, 0.0)
    c = got.item_ids.index("c")
    assert got.popularity[c] == 7.0
    assert got.signals().shape == (2, 3)


def test_items_without_text_are_recommended_from_behaviour() -> None:
    cat = Catalog({"x": None, "y": None})
    ctx = UserContext(np.zeros(2, np.float32), np.zeros(2, np.float32), [], covis={"x": 2.0})
    got = mix_candidates(ctx, [], {"y": 4.0}, cat, item_in_view=None, n=10)
    assert got.item_ids == ["x", "y"]


def test_quota_leaves_room_for_every_source() -> None:
    vectors = {f"s{i}": unit(1, i / 100) for i in range(50)} | {f"t{i}": None for i in range(10)}
    cat = Catalog(vectors)
    ctx = UserContext(unit(1, 0), np.zeros(2, np.float32), [])
    semantic = semantic_neighbours(cat, ctx.embedding[None, :], 50)[0]
    got = mix_candidates(ctx, semantic, {f"t{i}": 1.0 for i in range(10)}, cat, None, n=20)
    assert len(got.item_ids) == 20
    assert sum(s == "trending" for s in got.source) == 10


def test_a_purchase_blocks_its_item_for_a_day_only() -> None:
    day = 24 * 3_600_000
    cat = Catalog({"old": None, "new": None, "viewed": None})
    ctx = UserContext(
        np.zeros(2, np.float32),
        np.zeros(2, np.float32),
        [
            HistoryEntry("viewed", "view", 3 * day),
            HistoryEntry("new", "purchase", 3 * day - 1000),
            HistoryEntry("old", "purchase", day),
        ],
    )
    got = mix_candidates(ctx, [], {"old": 1.0, "new": 2.0}, cat, item_in_view="viewed", n=10)
    assert got.item_ids == ["old"]


def test_unused_quota_flows_to_the_users_category_before_the_whole_shop() -> None:
    cat = Catalog({f"c{i}": None for i in range(10)} | {f"t{i}": None for i in range(10)})
    ctx = UserContext(
        np.zeros(2, np.float32),
        np.zeros(2, np.float32),
        [],
        category_trending={f"c{i}": 10.0 - i for i in range(10)},
    )
    trending = {f"t{i}": 100.0 - i for i in range(10)}
    got = mix_candidates(ctx, [], trending, cat, item_in_view=None, n=10)
    # No taste, no co-visitation: their 8 slots and the category's 1 go to the category.
    assert got.source.count("category") == 9 and got.item_ids[:2] == ["c0", "c1"]
    assert got.item_ids[-1] == "t0"
