"""The pure parts of the Triton glue shared by every ``fused_ranker`` version.

The glue itself (decoding, per-request errors, the follower thread) runs inside a real
tritonserver in tests/integration/test_triton_models.py and test_trained_ranker.py.
"""

from __future__ import annotations

import numpy as np

from features.item_table import ItemTable
from ranking.fusion import HistoryEvent, RankBatch, RankRow, score_batch
from ranking.triton_model import DEFAULT_REFRESH_INTERVAL_S, refresh_interval_s, split_outputs
from shoprec.events import EventType

D = 384


def test_split_outputs_gives_each_request_what_scoring_it_alone_gives() -> None:
    rng = np.random.default_rng(5)
    table = ItemTable()
    ids = [f"i{k}" for k in range(12)]
    table.upsert(ids, rng.standard_normal((12, D)).astype(np.float32))
    signals = rng.exponential(2.0, (6, 3)).astype(np.float32)
    # Requests of different widths and user counts, as the dynamic batcher merges them.
    requests = [
        RankBatch.from_rows(
            [RankRow(ids[:3], signals[:3], [HistoryEvent("i5", EventType.CART, 9.0)])],
            history_len=1,
            n_candidates=3,
        ),
        RankBatch.from_rows(
            [RankRow(ids[3:9], signals), RankRow(ids[:2], signals[:2])],
            history_len=4,
            n_candidates=6,
        ),
    ]
    parts = split_outputs(score_batch(RankBatch.concat(requests), table), requests)
    assert [p[0].shape for p in parts] == [(1, 3), (2, 6)]
    for request, part in zip(requests, parts, strict=True):
        alone = score_batch(request, table).arrays()
        assert len(part) == len(alone) == 3
        for got, want in zip(part, alone, strict=True):
            assert got.flags.c_contiguous and got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=1e-6)


def test_refresh_interval_from_the_model_config() -> None:
    param = {"ITEM_REFRESH_INTERVAL_S": {"string_value": "0.25"}}
    assert refresh_interval_s({"parameters": param}) == 0.25
    assert refresh_interval_s({}) == DEFAULT_REFRESH_INTERVAL_S
