"""``shoprec experiment report``: how each arm did, with 95% intervals, against the control.

Read from the per-user records attribution keeps (``features.attribution``: one
``{u:<id>}:xp`` hash per user, read with one SCAN), so every count is exactly what was
credited, once per event.  Per arm:

* ``users``: users assigned to it (a user is counted from their first event in the
  experiment, whether or not a list was emitted: so a holdout is comparable);
* ``lists``: lists shown (for a shadow arm: lists scored for its users, never shown);
* ``clicks``, ``carts``, ``purchases``, ``revenue``: events credited to its lists;
* ``ctr``, CTR@K: the share of lists with at least one credited click;
  ``cart_rate``: with at least one credited add-to-cart; ``purchase_rate``: with a
  credited purchase.  Ratios of sums over users, their interval by the delta method with
  users as the unit (a user's lists are not independent of each other);
* ``conversion``: the share of users with at least one purchase, credited or not (the
  holdout has one too: the baseline), Wilson interval;
* ``revenue_per_user``: all their purchases' revenue per user, and
  ``credited_revenue_per_user``: what was credited to lists; normal intervals;
* ``vs_control``: each metric's difference to the control arm, with a 95% interval
  (independent groups: the two standard errors add in quadrature), and the relative lift.

With a bandit, its allocation per period (``exp:<name>:alloc``) comes with the report.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from features import keys
from features.attribution import allocations, user_records
from features.connection import open_redis
from shoprec.errors import ConfigError
from shoprec.experiments import DEFAULT_EXPERIMENT, Arm, Experiment
from shoprec.settings import Settings
from streams.bandit import Allocation

F64 = npt.NDArray[np.float64]
Z95 = 1.959963984540054
RATES = ("ctr", "cart_rate", "purchase_rate")
PER_USER = ("conversion", "revenue_per_user", "credited_revenue_per_user")
METRICS = (*RATES, *PER_USER)
_RATE_OF = {"ctr": "click", "cart_rate": "cart", "purchase_rate": "purchase"}


@dataclass(frozen=True)
class Estimate:
    """A value with its 95% interval (None where the arm has no data for it)."""

    value: float | None
    low: float | None = None
    high: float | None = None
    se: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "ci95": [self.low, self.high], "se": self.se}


NONE = Estimate(None)


def mean_ci(x: F64) -> Estimate:
    """The mean of per-user values, normal interval."""
    n = x.size
    if n == 0:
        return NONE
    m = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return Estimate(m, m - Z95 * se, m + Z95 * se, se)


def ratio_ci(y: F64, x: F64) -> Estimate:
    """Σy / Σx over users, delta-method interval with the user as the unit."""
    n = x.size
    total = float(x.sum())
    if n == 0 or total <= 0:
        return NONE
    r = float(y.sum()) / total
    if n < 2:
        return Estimate(r, r, r, 0.0)
    resid = y - r * x
    se = float(math.sqrt(float((resid**2).sum()) / (n * (n - 1))) / (total / n))
    return Estimate(r, r - Z95 * se, r + Z95 * se, se)


def proportion_ci(k: int, n: int) -> Estimate:
    """``k`` of ``n``, Wilson interval (sensible near 0 and 1, where conversions live)."""
    if n == 0:
        return NONE
    p = k / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return Estimate(p, centre - half, centre + half, math.sqrt(p * (1 - p) / n))


def paired_ratio_difference(ya: F64, xa: F64, yc: F64, xc: F64) -> dict[str, Any]:
    """``Σya/Σxa - Σyc/Σxc`` over the same users (two arms scoring the same triggers), its
    interval from each user's linearised contribution to both ratios (delta method)."""
    n = xa.size
    # Nothing attributed to either arm: the normal interval would be [0, 0], a certainty
    # the data do not hold; no difference is reported instead.
    if n < 2 or xa.sum() <= 0 or xc.sum() <= 0 or ya.sum() + yc.sum() <= 0:
        return {"diff": None, "ci95": [None, None], "lift": None}
    ra, rc = ya.sum() / xa.sum(), yc.sum() / xc.sum()
    z = (ya - ra * xa) / xa.mean() - (yc - rc * xc) / xc.mean()
    d, se = float(ra - rc), float(z.std(ddof=1) / math.sqrt(n))
    return {
        "diff": d,
        "ci95": [d - Z95 * se, d + Z95 * se],
        "lift": float(ra / rc - 1.0) if rc else None,
        "paired": True,
    }


def difference(a: Estimate, b: Estimate) -> dict[str, Any]:
    """``a - b`` with a normal 95% interval, and ``a / b - 1``."""
    if a.value is None or b.value is None or a.se is None or b.se is None:
        return {"diff": None, "ci95": [None, None], "lift": None}
    if a.value == 0 and b.value == 0:  # nothing in either arm: no interval to speak of
        return {"diff": None, "ci95": [None, None], "lift": None}
    d = a.value - b.value
    se = math.sqrt(a.se**2 + b.se**2)
    return {
        "diff": d,
        "ci95": [d - Z95 * se, d + Z95 * se],
        "lift": (a.value / b.value - 1.0) if b.value else None,
    }


@dataclass
class ArmReport:
    name: str
    kind: str
    share: float
    shadow: bool
    complements: int | None = None  # the arm's own number after a purchase; None: the setting
    users: int = 0
    lists: int = 0
    clicks: int = 0
    carts: int = 0
    purchases: int = 0
    revenue: float = 0.0
    buyers: int = 0
    spend: float = 0.0
    metrics: dict[str, Estimate] = field(default_factory=dict)
    vs_control: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "share": self.share,
            "shadow": self.shadow,
            "complements": self.complements,
            "users": self.users,
            "lists": self.lists,
            "clicks": self.clicks,
            "carts": self.carts,
            "purchases": self.purchases,
            "revenue": round(self.revenue, 4),
            "buyers": self.buyers,
            "spend": round(self.spend, 4),
            **{m: e.to_json() for m, e in self.metrics.items()},
            "vs_control": self.vs_control,
        }


@dataclass
class Report:
    experiment: str
    control: str
    k: int
    window_ms: int
    arms: dict[str, ArmReport]
    allocations: list[Allocation] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "control": self.control,
            "k": self.k,
            "window_ms": self.window_ms,
            "arms": {name: a.to_json() for name, a in self.arms.items()},
            "bandit": [
                {
                    "period": a.period,
                    "ts": a.ts,
                    "shares": a.shares,
                    "p_best": a.p_best,
                    # bandit arm -> [rewarded lists, lists]: what the shares came from
                    "stats": {arm: list(v) for arm, v in a.stats.items()},
                }
                for a in self.allocations
            ],
        }


def _num(rec: Mapping[str, str], name: str) -> float:
    return float(rec.get(name, 0.0))


def build_report(
    experiment: Experiment,
    records: Iterable[Mapping[str, str]],
    *,
    k: int,
    window_ms: int,
    allocations: Sequence[Allocation] = (),
    control: str | None = None,
) -> Report:
    """The report of ``experiment`` from its per-user records (see the module docstring).

    ``control`` overrides the experiment's; when it is a shadow arm (an offline estimate,
    where every arm scores every trigger), the other shadow arms are compared with it
    user by user (:func:`paired_ratio_difference`)."""
    recs = list(records)
    arms = {
        a.name: ArmReport(a.name, a.kind, a.share, a.shadow, a.complements)
        for a in (*experiment.arms, *_arms_only_in(recs, experiment))
    }
    for name, arm in arms.items():
        # A live arm's users are those assigned to it; a shadow arm's, those it scored for.
        mine = (
            [r for r in recs if _num(r, f"{name}:lists") > 0]
            if arm.shadow
            else [r for r in recs if r.get("arm") == name]
        )
        arm.users = len(mine)

        def col(what: str, rows: list[Mapping[str, str]] = mine, arm: str = name) -> F64:
            return np.array([_num(r, f"{arm}:{what}") for r in rows], np.float64)

        lists = col("lists")
        arm.lists = int(lists.sum())
        arm.clicks, arm.carts, arm.purchases = (int(col(o).sum()) for o in _RATE_OF.values())
        arm.revenue = float(col("revenue").sum())
        for metric, outcome in _RATE_OF.items():
            arm.metrics[metric] = ratio_ci(col(f"{outcome}_lists"), lists)
        if not arm.shadow:
            spend = np.array([_num(r, "spend") for r in mine], np.float64)
            buyers = sum(_num(r, "buys") > 0 for r in mine)
            arm.buyers, arm.spend = int(buyers), float(spend.sum())
            arm.metrics["conversion"] = proportion_ci(arm.buyers, arm.users)
            arm.metrics["revenue_per_user"] = mean_ci(spend)
            arm.metrics["credited_revenue_per_user"] = mean_ci(col("revenue"))
    control_name = control or experiment.control_arm
    base = arms.get(control_name)
    if base is not None and base.shadow:
        for arm in arms.values():
            if arm.shadow and arm is not base:
                arm.vs_control = _paired(recs, arm.name, base.name)
    elif base is not None:
        for arm in arms.values():
            if arm is not base and not arm.shadow:
                arm.vs_control = {
                    m: difference(e, base.metrics.get(m, NONE)) for m, e in arm.metrics.items()
                }
    return Report(experiment.name, control_name, k, window_ms, arms, list(allocations))


def _paired(recs: Sequence[Mapping[str, str]], arm: str, control: str) -> dict[str, Any]:
    both = [r for r in recs if _num(r, f"{arm}:lists") > 0 or _num(r, f"{control}:lists") > 0]

    def col(name: str, what: str) -> F64:
        return np.array([_num(r, f"{name}:{what}") for r in both], np.float64)

    return {
        metric: paired_ratio_difference(
            col(arm, f"{outcome}_lists"),
            col(arm, "lists"),
            col(control, f"{outcome}_lists"),
            col(control, "lists"),
        )
        for metric, outcome in _RATE_OF.items()
    }


def _arms_only_in(recs: Sequence[Mapping[str, str]], experiment: Experiment) -> list[Arm]:
    """Arms users are still in that the configuration no longer names (removed arms)."""
    known = {a.name for a in experiment.arms}
    gone = sorted({r["arm"] for r in recs if r.get("arm") and r["arm"] not in known})
    return [Arm(name=g, kind="ranker", share=0.0) for g in gone]


async def read_report(settings: Settings, name: str | None = None) -> Report:
    """The report of the configured experiment, or of the one called ``name`` (a past one:
    its arms are those its users are in), from Redis under ``SHOPREC_STATE_PREFIX``."""
    experiment = settings.experiment or DEFAULT_EXPERIMENT
    wanted = name or experiment.name
    keys.STATE_PREFIX.set(settings.state_prefix)
    redis = open_redis(settings.redis_url, cluster=settings.redis_cluster, timeout_s=30.0)
    try:
        records = [rec async for _, rec in user_records(redis, wanted)]
        allocated = [Allocation.from_json(a) for a in await allocations(redis, wanted)]
    finally:
        await redis.aclose()
    if wanted != experiment.name:
        if not records:
            raise ConfigError(
                f"no user records of experiment {wanted!r} under state prefix "
                f"{settings.state_prefix!r} (SHOPREC_STATE_PREFIX)"
            )
        experiment = _inferred(wanted, records)
    return build_report(
        experiment,
        records,
        k=settings.top_k,
        window_ms=settings.attribution_window_ms,
        allocations=allocated,
    )


def _inferred(name: str, records: Sequence[Mapping[str, str]]) -> Experiment:
    arms = sorted({r["arm"] for r in records if r.get("arm")})
    share = 1.0 / len(arms)
    return Experiment.model_validate(
        {"name": name, "arms": [{"name": a, "share": share} for a in arms]}
    )


# --- text and plot ------------------------------------------------------------------------


def _pct(e: Estimate) -> str:
    if e.value is None or e.low is None or e.high is None:
        return "-"
    return f"{100 * e.value:.2f}% [{100 * e.low:.2f}, {100 * e.high:.2f}]"


def _money(e: Estimate) -> str:
    if e.value is None or e.low is None or e.high is None:
        return "-"
    return f"{e.value:.2f} [{e.low:.2f}, {e.high:.2f}]"


def _diff(d: Mapping[str, Any], percent: bool) -> str:
    if d.get("diff") is None:
        return "-"
    scale, unit = (100.0, " pp") if percent else (1.0, "")
    lo, hi = d["ci95"]
    return f"{scale * d['diff']:+.2f}{unit} [{scale * lo:+.2f}, {scale * hi:+.2f}]"


def format_report(report: Report) -> str:
    """The report as text: one block per arm, then the bandit's allocations."""
    lines = [
        f"experiment {report.experiment}: control {report.control}, K = {report.k}, "
        f"window {report.window_ms / 60_000:g} min (95% intervals in brackets)",
    ]
    for arm in report.arms.values():
        role = "shadow, never shown" if arm.shadow else f"share {arm.share:g}"
        if arm.complements is not None:
            role = f"{arm.complements} complements, {role}"
        lines += [
            "",
            f"{arm.name} ({arm.kind}, {role}): {arm.users} users, {arm.lists} lists; credited "
            f"{arm.clicks} clicks, {arm.carts} carts, {arm.purchases} purchases, "
            f"revenue {arm.revenue:.2f}",
        ]
        for metric, estimate in arm.metrics.items():
            money = "revenue" in metric
            shown = _money(estimate) if money else _pct(estimate)
            versus = arm.vs_control.get(metric)
            tail = f"   vs control {_diff(versus, not money)}" if versus else ""
            label = "CTR@K" if metric == "ctr" else metric.replace("_", " ")
            lines.append(f"  {label:26} {shown}{tail}")
    if report.allocations:
        lines += ["", "bandit allocation of new users (when computed, UTC: shares)"]
        for a in report.allocations:
            shares = ", ".join(f"{n} {s:.2f}" for n, s in a.shares.items())
            when = dt.datetime.fromtimestamp(a.ts / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
            lines.append(f"  {when}: {shares}")
    return "\n".join(lines)


def plot_report(report: Report, path: Path) -> Path:
    """A PNG: each metric per arm with its interval, and the bandit's allocation over time."""
    try:
        import matplotlib
    except ImportError as exc:  # a dev dependency: the worker image does not carry it
        raise ConfigError("the plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in METRICS if any(m in a.metrics for a in report.arms.values())]
    n = len(panels) + (1 if report.allocations else 0)
    cols = 3
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    flat = list(axes.flat)
    names = list(report.arms)
    for ax, metric in zip(flat, panels, strict=False):
        values: list[float] = []
        errs: list[list[float]] = [[], []]
        labels: list[str] = []
        for name in names:
            e = report.arms[name].metrics.get(metric, NONE)
            if e.value is None or e.low is None or e.high is None:
                continue
            values.append(e.value)
            errs[0].append(e.value - e.low)
            errs[1].append(e.high - e.value)
            labels.append(name + (" (shadow)" if report.arms[name].shadow else ""))
        ax.bar(range(len(values)), values, yerr=errs, capsize=4, color="#4c78a8")
        ax.set_xticks(range(len(values)), labels, rotation=20, fontsize=8)
        ax.set_title("CTR@K" if metric == "ctr" else metric.replace("_", " "), fontsize=10)
    if report.allocations:
        ax = flat[len(panels)]
        arms = list(report.allocations[-1].shares)
        t = [(a.ts - report.allocations[0].ts) / 1000.0 for a in report.allocations]
        ys = [[a.shares.get(name, 0.0) for a in report.allocations] for name in arms]
        ax.stackplot(t, ys, labels=arms, step="post")
        ax.set_ylim(0, 1)
        ax.set_xlabel("seconds since the first allocation")
        ax.set_title("bandit: share of new users", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    for ax in flat[n:]:
        ax.axis("off")
    fig.suptitle(f"experiment {report.experiment} (95% intervals)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
