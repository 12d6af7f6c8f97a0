"""The fused ranker module, its artefact and the serving glue (no services)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from features.candidates import Mixed
from features.item_table import ItemTable
from ranking import export
from ranking.model import (
    MEMORY_ONLY_AGE_S,
    FusedRanker,
    RankerConfig,
    age_bucket,
    choose_device,
    memory_signals,
)
from ranking.pipeline import RecommendRequest, empty_request
from ranking.serve import LearnedRanker
from ranking.train import sampled_softmax_loss
from shoprec.events import EventType

B, H, N, D = 3, 7, 11, 384


def _inputs(seed: int = 0, cand_batch: int = B) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    types = torch.randint(1, 5, (B, H), generator=g)
    types[0, 3:] = 0  # short history
    types[2] = 0  # no history at all
    return {
        "user_emb": torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1),
        "query_emb": torch.zeros(B, D),
        "hist_text": torch.randn(B, H, D, generator=g),
        "hist_has_text": types > 0,
        "hist_rows": torch.randint(0, 20, (B, H), generator=g) * (types > 0),
        "hist_types": types,
        "hist_age_s": torch.rand(B, H, generator=g) * 1e5,
        "cand_text": torch.randn(cand_batch, N, D, generator=g),
        "cand_has_text": torch.ones(cand_batch, N, dtype=torch.bool),
        "cand_rows": torch.randint(0, 20, (cand_batch, N), generator=g),
        "signals": torch.rand(B, N, 5, generator=g) * 5,
    }


@pytest.fixture
def model() -> FusedRanker:
    torch.manual_seed(0)
    return FusedRanker(RankerConfig(n_items=19)).eval()


def test_scores_every_candidate_even_without_history(model: FusedRanker) -> None:
    with torch.inference_mode():
        out = model(**_inputs())
    assert out.shape == (B, N)
    assert torch.isfinite(out).all()


def test_scoring_from_the_item_cache_equals_the_plain_forward(model: FusedRanker) -> None:
    # Serving computes item_cache once per catalogue change and gathers its rows per
    # request; the scores must be the ones the trained module gives (within 1e-5).
    x = _inputs(seed=3)
    scripted = torch.jit.script(model)
    with torch.inference_mode():
        plain = model(**x)
        for m in (model, scripted):
            hist = m.items(x["hist_text"], x["hist_has_text"], x["hist_rows"])
            cand = m.item_cache(x["cand_text"], x["cand_has_text"], x["cand_rows"])
            cached = m.score(
                x["user_emb"],
                x["query_emb"],
                hist,
                x["hist_text"],
                x["hist_types"],
                x["hist_age_s"],
                *cand,
                x["cand_text"],
                x["signals"],
            )
            assert torch.allclose(cached, plain, atol=1e-5)


def test_shared_candidates_broadcast_like_per_user_copies(model: FusedRanker) -> None:
    shared = _inputs(cand_batch=1)
    copied = dict(shared)
    for k in ("cand_text", "cand_has_text", "cand_rows"):
        copied[k] = shared[k].expand(B, *shared[k].shape[1:])
    with torch.inference_mode():
        torch.testing.assert_close(model(**shared), model(**copied))


def test_history_padding_is_ignored(model: FusedRanker) -> None:
    a = _inputs()
    b = dict(a)
    b["hist_text"] = a["hist_text"].clone()
    b["hist_text"][0, 3:] = 99.0  # behind the padding of user 0
    with torch.inference_mode():
        torch.testing.assert_close(model(**a)[0], model(**b)[0])


def test_query_similarity_raises_the_matching_item(model: FusedRanker) -> None:
    x = _inputs()
    target = torch.nn.functional.normalize(x["cand_text"][1, 4], dim=0)
    with_query = dict(x, query_emb=target.expand(B, D).clone())
    with torch.inference_mode():
        gain = model(**with_query)[1] - model(**x)[1]
    assert int(gain.argmax()) == 4


def test_torchscript_matches_eager(model: FusedRanker) -> None:
    scripted = torch.jit.script(model)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(**_inputs()), model(**_inputs()))


def test_age_buckets_are_logarithmic() -> None:
    got = age_bucket(torch.tensor([0.0, 1.0, 3.0, 1e3, 1e12]))
    assert got.tolist() == [0, 1, 2, 9, 23]


def test_cpu_without_cuda_is_fp32() -> None:
    device, dtype = choose_device()
    if torch.cuda.is_available():
        assert device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    else:
        assert (device.type, dtype) == ("cpu", torch.float32)


def test_sampled_softmax_prefers_positive_over_negatives() -> None:
    good = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    bad = torch.tensor([[0.0, 0.0, 5.0, 0.0]])
    mask = torch.tensor([[True, False]])  # two positive slots, one used
    assert sampled_softmax_loss(good, mask) < sampled_softmax_loss(bad, mask)


def _table(ids: list[str]) -> ItemTable:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(len(ids), D)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    table = ItemTable()
    has = np.array([not i.startswith("plain") for i in ids])
    table.upsert(ids, emb * has[:, None], has_emb=has, in_stock=np.ones(len(ids), np.bool_))
    return table


def test_the_served_artefact_scores_a_request_as_the_plain_module_does(
    tmp_path: Path, model: FusedRanker
) -> None:
    """Serving caches each item's projections per catalogue change and gathers them per
    request; the scores must be the trained module's own (within 1e-5), padding -inf."""
    ids = [f"item-{i}" for i in range(12)] + ["plain-1"]
    known = ["", *ids[:19]]
    known += [""] * (20 - len(known))
    export.save(tmp_path / "fused_ranker" / "9", model, RankerConfig(n_items=19), known, {"x": 1})
    ranker = LearnedRanker(tmp_path / "fused_ranker" / "9")
    assert ranker.scripted and ranker.rows["item-0"] == 1
    assert ranker.complements is None, "no choice recorded: each request's complements"
    assert ranker.complement_order == "co-purchase"
    export.set_complements(tmp_path / "fused_ranker" / "9", 4, "ranker")
    chosen = LearnedRanker(tmp_path / "fused_ranker" / "9", script=False)
    assert (chosen.complements, chosen.complement_order) == (4, "ranker")
    export.set_complements(tmp_path / "fused_ranker" / "9", 4, "popularity")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="complement_order 'popularity' is not one of"):
        export.load(tmp_path / "fused_ranker" / "9")
    export.set_complements(tmp_path / "fused_ranker" / "9", 0)
    table = _table(ids)
    ranker.sync(table, table.take_changed())
    num = {i: int(n) for i, n in zip(ids, table.rows(ids), strict=True)}
    items = np.array([[num["item-3"], num["plain-1"], -1], [num["item-5"], -1, -1]])
    signals = np.zeros((2, 3, 3), np.float32)
    signals[0, :2] = [[2, 10, 0.3], [0, 50, 0]]
    request = RecommendRequest(
        **empty_request(2).arrays()
        | {
            "user_emb": np.stack([np.ones(D, np.float32) / np.sqrt(D), np.zeros(D, np.float32)]),
            "history": np.array([[num["item-1"], num["item-3"]], [-1, -1]], np.int32),
            "history_types": np.array([[EventType.CART, EventType.VIEW], [0, 0]], np.int32),
            "history_age_s": np.array([[30.0, 90.0], [0.0, 0.0]], np.float32),
        }
    )
    scores = ranker.score(request, Mixed(items, np.zeros_like(items, np.int32), signals), table)
    assert scores.shape == (2, 3)
    assert np.isfinite(scores[0, :2]).all() and np.isfinite(scores[1, 0])

    # The same users through the eager module of the saved artefact, inputs built by hand.
    again = export.load(tmp_path / "fused_ranker" / "9").model
    hist_text, hist_has = table.lookup(["item-1", "item-3"])
    cand_text, cand_has = table.lookup(["item-3", "plain-1"])
    with torch.inference_mode():
        direct = again(
            user_emb=torch.from_numpy(request.user_emb[:1]),
            query_emb=torch.zeros(1, D),
            hist_text=torch.from_numpy(hist_text)[None],
            hist_has_text=torch.from_numpy(hist_has)[None],
            hist_rows=torch.tensor([[ranker.rows["item-1"], ranker.rows["item-3"]]]),
            hist_types=torch.tensor([[EventType.CART, EventType.VIEW]]),
            hist_age_s=torch.tensor([[30.0, 90.0]]),
            cand_text=torch.from_numpy(cand_text)[None],
            cand_has_text=torch.from_numpy(cand_has)[None],
            cand_rows=torch.tensor([[ranker.rows["item-3"], ranker.rows["plain-1"]]]),
            # item-3 is in the history once, 90 s ago: the repeat signals
            signals=torch.tensor([[[2, 10, 0.3, 1, 90.0], [0, 50, 0, 0, 0]]]),
        )
    np.testing.assert_allclose(scores[0, :2], direct[0].numpy(), rtol=1e-5, atol=1e-5)


def test_memory_signals_count_the_whole_past_and_bound_the_age() -> None:
    """A model with ``RankerConfig.memory`` reads the count from the user's memory and the
    age from the history; an item only in the memory is old: ``MEMORY_ONLY_AGE_S``, or the
    history's oldest event's age when that is older."""
    old = MEMORY_ONLY_AGE_S
    hist = np.array([[7, 3, 7, -1], [-1, -1, -1, -1]], np.int64)
    ages = np.array([[5.0, 60.0, 80.0, 0.0], [0.0] * 4], np.float32)
    memory = np.array([[3, 7, 9, -1], [9, -1, -1, -1]], np.int64)
    counts = np.array([[4.5, 2.0, 0.25, 0.0], [1.5, 0.0, 0.0, 0.0]], np.float32)
    items = np.array([[7, 3, 9, 11, -1], [9, 7, 11, 3, -1]], np.int64)
    got = memory_signals(hist, ages, memory, counts, items)
    want = [
        # 7: memory 2.0 ties the history's 2 events, newest 5 s ago; 3: the memory's 4.5
        # over the history's one; 9: memory only; 11: never seen; -1: padding never repeats.
        [[2.0, 5.0], [4.5, 60.0], [0.25, old], [0.0, 0.0], [0.0, 0.0]],
        [[1.5, old], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],  # no history
    ]
    np.testing.assert_array_equal(got, np.array(want, np.float32))
    # A history reaching further back than MEMORY_ONLY_AGE_S bounds the age from below.
    far = memory_signals(hist, ages * 1e5, memory, counts, items)
    assert far[0, 2].tolist() == [0.25, 80.0 * 1e5]
    # A memory shorter than the history lost item 7: the history's count stands in.
    short = memory_signals(hist, ages, memory[:, :1], counts[:, :1], items)
    assert short[0, 0].tolist() == [2.0, 5.0]


def test_a_memory_model_is_served_the_memory_counts(tmp_path: Path) -> None:
    """The served artefact of a memory model scores with the request's MEMORY counts: the
    same scores as the module given those signals, and not those of the history alone."""
    torch.manual_seed(0)
    cfg = RankerConfig(n_items=19, memory=True)
    model = FusedRanker(cfg).eval()
    with torch.no_grad():  # make the repeat count matter to the score
        model.scalar_lin.weight[0, 9] = 2.0
    ids = [f"item-{i}" for i in range(12)]
    export.save(tmp_path / "fused_ranker" / "9", model, cfg, ["", *ids], {"x": 1})
    ranker = LearnedRanker(tmp_path / "fused_ranker" / "9")
    table = _table(ids)
    ranker.sync(table, table.take_changed())
    num = {i: int(n) for i, n in zip(ids, table.rows(ids), strict=True)}
    items = np.array([[num["item-3"], num["item-5"]]])
    request = RecommendRequest(
        **empty_request(1).arrays()
        | {
            "history": np.array([[num["item-1"]]], np.int32),
            "history_types": np.array([[EventType.VIEW]], np.int32),
            "history_age_s": np.array([[40.0]], np.float32),
            "memory": np.array([[num["item-5"], num["item-1"]]], np.int32),
            "memory_count": np.array([[6.0, 1.0]], np.float32),
        }
    )
    signals = np.zeros((1, 2, 3), np.float32)
    scores = ranker.score(request, Mixed(items, np.zeros_like(items, np.int32), signals), table)
    again = export.load(tmp_path / "fused_ranker" / "9").model
    hist_text, hist_has = table.lookup(["item-1"])
    cand_text, cand_has = table.lookup(["item-3", "item-5"])
    with torch.inference_mode():
        direct = again(
            user_emb=torch.zeros(1, D),
            query_emb=torch.zeros(1, D),
            hist_text=torch.from_numpy(hist_text)[None],
            hist_has_text=torch.from_numpy(hist_has)[None],
            hist_rows=torch.tensor([[ranker.rows["item-1"]]]),
            hist_types=torch.tensor([[EventType.VIEW]]),
            hist_age_s=torch.tensor([[40.0]]),
            cand_text=torch.from_numpy(cand_text)[None],
            cand_has_text=torch.from_numpy(cand_has)[None],
            cand_rows=torch.tensor([[ranker.rows["item-3"], ranker.rows["item-5"]]]),
            # item-5: 6 events in the memory, not in the history: old
            signals=torch.tensor([[[0, 0, 0, 0, 0], [0, 0, 0, 6.0, MEMORY_ONLY_AGE_S]]]),
        )
    np.testing.assert_allclose(scores[0], direct[0].numpy(), rtol=1e-5, atol=1e-5)
    assert scores[0, 1] > scores[0, 0]
