"""The fixed-weight fusion: padding, monotonicity, text-less items, reasons, the batch contract."""

from __future__ import annotations

import numpy as np
import pytest

from features.candidates import Mixed
from features.item_table import ItemTable
from ranking.fusion import PAD_SCORE, FusionScorer, FusionWeights, Reason, explain, fused_scores
from ranking.pipeline import RecommendRequest, empty_request
from shoprec.events import EventType

D = 8


def unit(*xs: float) -> np.ndarray:
    v = np.zeros(D, np.float32)
    v[: len(xs)] = xs
    return (v / np.linalg.norm(v)).astype(np.float32)


def inputs(b: int = 1, h: int = 2, n: int = 4) -> dict[str, np.ndarray]:
    """All-neutral inputs: nothing known, every candidate real, no signals."""
    return {
        "user_emb": np.zeros((b, D), np.float32),
        "query_emb": np.zeros((b, D), np.float32),
        "hist_embs": np.zeros((b, h, D), np.float32),
        "hist_mask": np.zeros((b, h), bool),
        "hist_types": np.zeros((b, h), np.int32),
        "hist_age_s": np.zeros((b, h), np.float32),
        "cand_embs": np.zeros((b, n, D), np.float32),
        "cand_has_emb": np.zeros((b, n), bool),
        "signals": np.zeros((b, n, 3), np.float32),
        "cand_mask": np.ones((b, n), bool),
    }


def test_padding_scores_minus_inf_with_pad_reason() -> None:
    x = inputs(b=2, n=3)
    x["cand_mask"][0, 2] = x["cand_mask"][1, 1:] = False
    scores, reasons, match = fused_scores(**x)
    assert scores.shape == (2, 3) and scores.dtype == np.float32
    assert (scores[~x["cand_mask"]] == PAD_SCORE).all() and np.isneginf(PAD_SCORE)
    assert (reasons[~x["cand_mask"]] == Reason.PAD).all()
    assert (match[~x["cand_mask"]] == -1).all()
    assert np.isfinite(scores[x["cand_mask"]]).all()


def test_more_covisitation_scores_higher_all_else_equal() -> None:
    x = inputs(n=4)
    x["signals"][0, :, 0] = [0, 1, 5, 50]
    scores, reasons, _ = fused_scores(**x)
    assert np.all(np.diff(scores[0]) > 0)
    assert list(reasons[0, 1:]) == [Reason.COVISIT] * 3


def test_more_popularity_scores_higher_but_below_equal_covisitation() -> None:
    x = inputs(n=3)
    x["signals"][0] = [[0, 5, 0], [0, 50, 0], [5, 0, 0]]
    scores, reasons, _ = fused_scores(**x)
    assert scores[0, 1] > scores[0, 0]
    assert scores[0, 2] > scores[0, 0], "co-visitation outweighs the same popularity count"
    assert list(reasons[0]) == [Reason.POPULAR, Reason.POPULAR, Reason.COVISIT]


def test_text_less_items_score_from_behaviour() -> None:
    x = inputs(n=3)
    x["user_emb"][0] = unit(1, 0)
    x["cand_embs"][0, 0] = unit(1, 0)  # similar, has text
    x["cand_has_emb"][0, 0] = True
    # Candidates 1 and 2 have no text; 2 is bought together with the user's items.
    x["signals"][0, 2] = [10, 30, 0]
    scores, reasons, _ = fused_scores(**x)
    assert np.isfinite(scores).all()
    assert scores[0, 2] > scores[0, 1] == 0.0
    assert reasons[0, 0] == Reason.SIMILAR and reasons[0, 1] == Reason.NONE
    assert reasons[0, 2] == Reason.COVISIT


def test_embedding_ignored_when_marked_missing() -> None:
    x = inputs(n=2)
    x["user_emb"][0] = unit(1, 0)
    x["cand_embs"][0] = unit(1, 0)
    x["cand_has_emb"][0] = [True, False]
    scores, _, _ = fused_scores(**x)
    assert scores[0, 0] > 0 == scores[0, 1]


def test_query_and_user_similarity_and_reasons() -> None:
    x = inputs(n=3)
    x["user_emb"][0] = unit(1, 0, 0)
    x["query_emb"][0] = unit(0, 1, 0)
    x["cand_embs"][0] = [unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)]
    x["cand_has_emb"][0] = True
    scores, reasons, _ = fused_scores(**x)
    assert scores[0, 0] > scores[0, 2] and scores[0, 1] > scores[0, 2]
    assert list(reasons[0]) == [Reason.SIMILAR, Reason.QUERY, Reason.NONE]


def test_history_weighted_by_type_and_recency_and_matched() -> None:
    x = inputs(h=3, n=3)
    x["hist_embs"][0] = [unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)]
    x["hist_mask"][0] = True
    x["hist_types"][0] = [EventType.PURCHASE, EventType.VIEW, EventType.PURCHASE]
    x["hist_age_s"][0] = [60, 60, 86_400]  # the third purchase is a day old
    x["cand_embs"][0] = [unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)]
    x["cand_has_emb"][0] = True
    scores, reasons, match = fused_scores(**x)
    assert scores[0, 0] > scores[0, 1] > scores[0, 2]
    assert list(match[0, :2]) == [0, 1] and (reasons[0, :2] == Reason.SIMILAR).all()
    # Masked history contributes nothing.
    x["hist_mask"][0] = False
    scores2, _, match2 = fused_scores(**x)
    assert (scores2 == 0).all() and (match2 == -1).all()


def test_empty_history_and_unknown_user_are_neutral() -> None:
    x = inputs(h=0, n=2)
    x["cand_embs"][0] = [unit(1), unit(0, 1)]
    x["cand_has_emb"][0] = True
    scores, _, match = fused_scores(**x)
    assert (scores == 0).all() and (match == -1).all()


def test_weights_are_frozen_and_checked() -> None:
    w = FusionWeights()
    with pytest.raises(AttributeError):
        w.user = 2.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="type_weights"):
        FusionWeights(type_weights=(1.0,))
    x = inputs(n=2)
    x["signals"][0, 1, 0] = 3
    no_covis = FusionWeights(covis=0.0)
    assert fused_scores(**x, weights=no_covis)[0][0, 1] == 0.0


# --- the v1 scorer over a request, and the request contract ---------------------------


def table() -> ItemTable:
    t = ItemTable(dim=D)
    t.upsert(["shoe", "boot", "pan"], np.stack([unit(1, 0.1), unit(1, 0.2), unit(0, 0, 1)]))
    t.upsert(["gift-card"], np.zeros((1, D)), has_emb=[False])
    return t


def test_v1_scores_candidates_by_number_and_explains_them() -> None:
    t = table()
    shoe, boot, pan, card = (int(x) for x in t.rows(["shoe", "boot", "pan", "gift-card"]))
    req = RecommendRequest(
        **empty_request(2, dim=D).arrays()
        | {
            "user_emb": np.stack([unit(1), np.zeros(D, np.float32)]),
            "history": np.array([[shoe, shoe], [-1, -1]], np.int32),
            "history_types": np.array([[EventType.CLICK] * 2, [0, 0]], np.int32),
            "history_age_s": np.full((2, 2), 30.0, np.float32),
        }
    )
    items = np.array([[boot, pan, card, -1, -1], [-1] * 5])
    signals = np.zeros((2, 5, 3), np.float32)
    signals[0, :3] = [[0, 1, 0.5], [0, 1, 0], [4, 9, 0]]
    scores = FusionScorer().score(req, Mixed(items, np.zeros_like(items, np.int32), signals), t)
    assert scores.shape == (2, 5)
    assert scores[0, 0] > scores[0, 1], "the boot is like the clicked shoe"
    assert np.isfinite(scores[0, 2]) and np.isinf(scores[1]).all()
    reasons, match = explain(req, items[:, :3], signals[:, :3], t)
    assert reasons[0, 2] == Reason.COVISIT and match[0, 0] == 0


def test_validate_names_the_broken_input() -> None:
    req = empty_request(2, dim=D)
    req.validate()
    req.covis_score[0, 0] = np.nan
    with pytest.raises(ValueError, match="COVIS_SCORE holds NaN"):
        req.validate()
    bad = RecommendRequest(**req.arrays() | {"history_types": np.zeros((2, 3), np.int32)})
    with pytest.raises(ValueError, match="HISTORY_TYPES must be"):
        bad.validate()
    bad = RecommendRequest(**req.arrays() | {"user_emb": np.zeros((2, D), np.float64)})
    with pytest.raises(ValueError, match=r"USER_EMB must be float32"):
        bad.validate()


def test_concat_pads_every_list_to_the_widest_and_rows_slices() -> None:
    a = empty_request(2, dim=D)
    b = RecommendRequest(
        **empty_request(1, dim=D).arrays()
        | {
            "covis": np.array([[5, 6, 7]], np.int32),
            "covis_score": np.ones((1, 3), np.float32),
            "covis_source": np.full((1, 3), 2, np.int32),
        }
    )
    both = RecommendRequest.concat([a, b])
    both.validate()
    assert both.size == 3 and both.covis.shape == (3, 3)
    assert (both.covis[:2] == -1).all() and both.rows(2, 3).covis.tolist() == [[5, 6, 7]]
