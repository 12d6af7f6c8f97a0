"""The fused ranker's baseline path: an untrained model is co-visitation with a popularity
tie-break, a trained one keeps serving's contract (``forward = score(item_cache(...))``,
TorchScript), and artefacts written before the path existed still load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ranking import export
from ranking.model import ITEM_BIAS_SCALE, FusedRanker, RankerConfig, init_baselines
from tests.unit.test_model import B, N, _inputs
from tests.unit.test_model import (
    test_scoring_from_the_item_cache_equals_the_plain_forward as cache_equals_forward,
)

SERVED_V2 = Path(__file__).resolve().parents[2] / "model_repo" / "fused_ranker" / "2"


@pytest.fixture
def trained() -> FusedRanker:
    """A baseline-path model with trained-looking weights (residual and biases non-zero)."""
    torch.manual_seed(0)
    m = FusedRanker(RankerConfig(n_items=19, base=True)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(m.head[3].weight)  # type: ignore[arg-type]
        torch.nn.init.normal_(m.item_bias.weight)
    return m


def test_scoring_from_the_item_cache_equals_the_plain_forward(trained: FusedRanker) -> None:
    """The item's bias travels in the head term's last channel: the cache keeps its three
    ``[..., d]`` tensors and serving's composition stays exact, eager and scripted (the
    plain model's own test, run on a trained baseline-path model)."""
    cand = trained.item_cache(*(_inputs(3)[k] for k in ("cand_text", "cand_has_text", "cand_rows")))
    assert all(t.shape == (B, N, trained.target_q.out_features) for t in cand)
    cache_equals_forward(trained)


def test_an_untrained_baseline_path_ranks_as_covisitation_then_popularity() -> None:
    """The cold-shop start: co-visited items first, by decayed count (even counts decayed
    by years), the rest by popularity; the learned part adds nothing yet."""
    torch.manual_seed(1)
    model = FusedRanker(RankerConfig(n_items=19, base=True)).eval()
    init_baselines(model, torch.zeros(20))
    x = _inputs(5)
    covis = torch.zeros(B, N)
    covis[:, :5] = torch.tensor([3.0, 1e-9, 0.5, 2e-7, 40.0])
    pop = torch.rand(B, N) * 100
    zero = torch.zeros(B, N)
    x["signals"] = torch.stack([covis, pop, zero, zero, zero], -1)
    with torch.inference_mode():
        order = model(**x).argsort(dim=1, descending=True)
    for b in range(B):
        expected = sorted(range(N), key=lambda i: (-float(covis[b, i]), -float(pop[b, i])))
        assert order[b].tolist() == expected


def test_item_popularity_breaks_ties_below_one_covisitation_step() -> None:
    model = FusedRanker(RankerConfig(n_items=3, base=True)).eval()
    init_baselines(model, torch.tensor([0.0, 5.0, 500.0, 0.0]))
    bias = model.item_bias.weight.detach()[:, 0]
    assert float(bias[0]) == 0.0 and float(bias[3]) == 0.0  # unknown, never seen
    assert 0 < float(bias[1]) < float(bias[2]) == pytest.approx(ITEM_BIAS_SCALE)


def test_the_served_artefact_written_before_the_baseline_path_still_loads() -> None:
    art = export.load(SERVED_V2)
    assert not art.config.base and float(art.model.item_bias.weight.detach().abs().sum()) == 0.0
    torch.jit.script(art.model)
