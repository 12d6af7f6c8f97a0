"""Thompson sampling over an experiment's arms: new users go where lists get results.

Each arm that emits lists has a Beta posterior over the chance that a list it shows earns
the bandit's reward (at least one attributed click, cart or purchase, as configured):
``Beta(1 + rewarded lists, 1 + lists - rewarded lists)``, from the experiment's counters.
The allocation is probability matching: each arm's share is the posterior probability that
it is the best (``draws`` samples, seeded by the experiment and the period, so every worker
that computes it from the same counts gets the same shares), with ``min_share`` kept for
every arm so none stops being explored.  The holdout keeps its configured share, outside
the bandit; shadow arms get no users.

What moves is the assignment of users new to the experiment: users keep their arm (sticky,
``shoprec.experiments``), so traffic follows a change of allocation as new users come.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from shoprec.experiments import Experiment, unit_hash


@dataclass(frozen=True)
class Allocation:
    """The shares of new users in one period, and the counts they came from."""

    period: int
    ts: int  # when it was computed (ms; event time offline, wall-clock live)
    shares: dict[str, float]  # every live arm, the holdout included; they add up to 1
    p_best: dict[str, float]  # the bandit arms' posterior probability of being the best
    stats: dict[str, tuple[float, float]]  # bandit arm -> (rewarded lists, lists)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "period": self.period,
                "ts": self.ts,
                "shares": self.shares,
                "p_best": self.p_best,
                "stats": {a: list(v) for a, v in self.stats.items()},
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str | Mapping[str, Any]) -> Allocation:
        doc = raw if isinstance(raw, Mapping) else orjson.loads(raw)
        return cls(
            int(doc["period"]),
            int(doc["ts"]),
            {str(k): float(v) for k, v in doc["shares"].items()},
            {str(k): float(v) for k, v in doc["p_best"].items()},
            {str(k): (float(v[0]), float(v[1])) for k, v in doc["stats"].items()},
        )


def bandit_stats(
    experiment: Experiment, totals: Mapping[str, float]
) -> dict[str, tuple[float, float]]:
    """(rewarded lists, lists) per bandit arm from the experiment's counters
    (``features.attribution.totals_delta`` names them)."""
    if experiment.bandit is None:
        return {}
    reward = experiment.bandit.reward
    out = {}
    for arm in experiment.live_arms:
        if arm.emits:
            lists = totals.get(f"{arm.name}:lists", 0.0)
            rewarded = min(totals.get(f"{arm.name}:{reward}_lists", 0.0), lists)
            out[arm.name] = (rewarded, lists)
    return out


def thompson(
    experiment: Experiment, stats: Mapping[str, tuple[float, float]], period: int, ts: int
) -> Allocation:
    """The allocation for ``period`` from ``stats`` (see the module docstring)."""
    bandit = experiment.bandit
    if bandit is None:
        raise ValueError(f"experiment {experiment.name!r} has no bandit")
    arms = [a.name for a in experiment.live_arms if a.emits]
    fixed = {a.name: a.share for a in experiment.live_arms if not a.emits}
    s = np.array([stats.get(a, (0.0, 0.0))[0] for a in arms], np.float64)
    n = np.array([stats.get(a, (0.0, 0.0))[1] for a in arms], np.float64)
    seed = int(unit_hash(experiment.name, "bandit", str(period)) * 2**63)
    rng = np.random.default_rng(seed)
    draws = rng.beta(1.0 + s, 1.0 + np.maximum(n - s, 0.0), size=(bandit.draws, len(arms)))
    p_best = np.bincount(draws.argmax(axis=1), minlength=len(arms)) / bandit.draws
    free = 1.0 - sum(fixed.values())
    matched = bandit.min_share + (1.0 - bandit.min_share * len(arms)) * p_best
    shares = {a: float(free * m) for a, m in zip(arms, matched, strict=True)} | fixed
    return Allocation(
        period,
        ts,
        shares,
        {a: float(p) for a, p in zip(arms, p_best, strict=True)},
        {a: (float(x), float(y)) for a, x, y in zip(arms, s, n, strict=True)},
    )
