"""The pure parts of the Triton glue and the one-call pipeline shared by every
``fused_ranker`` version.

The glue itself (decoding, per-request errors, the follower thread) runs inside a real
tritonserver in tests/integration/test_triton_models.py and test_trained_ranker.py.
"""

from __future__ import annotations

import numpy as np

from features.ann import TableIndex
from features.item_table import ItemTable
from ranking.fusion import FusionScorer
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
