"""``shoprec experiment simulate`` on real data: the off-policy estimate and the bandit.

The first 4,000 rees46 events (about 45 minutes of the shop's morning), the trained ranker
of ``model_repo`` against co-visitation order, views counted as clicks:

* the estimate scores every trigger with both arms, so both have the same lists to credit,
  and the difference comes paired by user, with an interval;
* the bandit, replaying the same events with 5-minute periods of event time, moves the
  share of new users toward the arm the estimate found better, and keeps the floor.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.simulate import SimulateOptions, default_experiment, simulate
from shoprec.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
N_EVENTS = 4000


def options(data_dir: Path, bandit: bool) -> SimulateOptions:
    return SimulateOptions(
        data=data_dir / "rees46-sample",
        experiment=default_experiment(bandit, every_s=300.0),
        model_repo=REPO / "model_repo",
        cache=REPO / ".shoprec" / "cache",  # the item vectors, shared with training
        bandit=bandit,
        limit=N_EVENTS,
    )


async def test_the_estimate_and_the_bandit_agree_on_the_better_arm(data_dir: Path) -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    estimate = await simulate(settings, options(data_dir, bandit=False))
    ranker, covis = estimate.arms["ranker"], estimate.arms["covisitation"]
    assert ranker.shadow and covis.shadow and estimate.control == "ranker"
    # Both arms scored every trigger: the same lists to credit, so the comparison pairs.
    assert ranker.lists == covis.lists > 1000
    assert ranker.clicks > 0 and covis.clicks > 0
    versus = covis.vs_control["ctr"]
    assert versus["paired"] and versus["ci95"][0] <= versus["diff"] <= versus["ci95"][1]
    better, worse = ("ranker", "covisitation") if versus["diff"] < 0 else ("covisitation", "ranker")

    bandit = await simulate(settings, options(data_dir, bandit=True))
    shares = [a.shares for a in bandit.allocations]
    assert len(shares) >= 4, shares
    assert shares[0][better] == pytest.approx(0.5, abs=0.05)  # no data: even odds
    assert shares[-1][better] > 0.75 and shares[-1][worse] >= 0.1 - 1e-9  # the floor holds
    print(estimate.arms[worse].vs_control["ctr"], [round(s[better], 2) for s in shares])
