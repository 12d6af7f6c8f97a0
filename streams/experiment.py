"""The experiment in the worker: each user's arm, each arm's lists, credit for what followed.

Per micro-batch, two pipelines (``features.attribution``):

1. after the events are in user state (``streams.ingest``), :meth:`ExperimentRunner.observe`
   gets the arm of every user of the batch (assigning users new to the experiment by the
   stable hash into the current shares, or the bandit's) and credits each click, cart and
   purchase to the list it followed;
2. once the lists are made (``streams.recommend``), :meth:`ExperimentRunner.show` remembers
   them, live and shadow.

Between the two, :func:`rank_by_arm` scores the batch's users arm by arm: one Triton call
per ranker version (the served one when the arm names none), the worker's own pipeline for
``covisitation`` (:class:`CovisitationScorer`) and ``retrieval`` (the fallback's order), no
list for the holdout, and every shadow arm on every user.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from redis.asyncio import Redis

from features.attribution import (
    Attributable,
    Attribution,
    AttributionPolicy,
    AttributionStore,
    Observed,
    ShownList,
    totals_delta,
)
from features.candidates import Mixed
from features.item_table import ItemTable
from ranking.client import RankerClient
from ranking.fusion import Reason
from ranking.pipeline import ComplementOrder, RecommendRequest, TopK
from shoprec.errors import ConfigError
from shoprec.events import ShopEvent
from shoprec.experiments import (
    DEFAULT_EXPERIMENT,
    OUTCOMES,
    Arm,
    ArmKind,
    Experiment,
    assign,
    list_id,
    revenue,
)
from shoprec.settings import Settings
from streams.bandit import Allocation, bandit_stats, thompson
from streams.metrics import WorkerStats

log = logging.getLogger("shoprec.experiment")

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]


class CovisitationScorer:
    """The ``covisitation`` arm: candidates with co-visitation first, by their decayed count,
    then the rest by popularity; retrieval order breaks ties (the pipeline sorts stably).
    The same candidates as every other arm, so the arms differ in their order alone."""

    complements: int | None = None
    complement_order: ComplementOrder = "co-purchase"

    def sync(self, table: ItemTable, changed: I64) -> int:
        return 0

    def score(self, request: RecommendRequest, cands: Mixed, table: ItemTable) -> F32:
        covis, pop = cands.signals[..., 0], cands.signals[..., 1]
        # log1p(covis) >= 0, and 2 + that is above any tanh(.) < 1: co-visited items first.
        out: F32 = np.where(
            covis > 0, 2.0 + np.log1p(np.maximum(covis, 0.0)), np.tanh(np.log1p(pop) / 3.0)
        ).astype(np.float32)
        return out

    def explain(
        self, request: RecommendRequest, items: I64, signals: F32, table: ItemTable
    ) -> tuple[I32, I32]:
        reasons = np.where(signals[..., 0] > 0, Reason.COVISIT, Reason.POPULAR).astype(np.int32)
        return reasons, np.full(items.shape, -1, np.int32)


@dataclass(frozen=True)
class ArmAnswer:
    """One arm's lists for some users of a micro-batch (``rows`` index the triggers)."""

    arm: Arm
    rows: list[int]
    top: TopK
    model: str
    degraded: bool


Rank = Callable[[RecommendRequest, Arm], Awaitable[tuple[TopK, str, bool]]]
"""Scores a request the way one arm does: (top-K, model name, degraded)."""


def take_rows(request: RecommendRequest, rows: Sequence[int]) -> RecommendRequest:
    """The request of some of its users, in ``rows`` order."""
    if len(rows) == request.size and list(rows) == list(range(request.size)):
        return request
    idx = np.asarray(rows, np.int64)
    return RecommendRequest(**{k: v[idx] for k, v in request.arrays().items()})


async def rank_by_arm(
    request: RecommendRequest,
    arms: Sequence[Arm],
    shadows: Sequence[Arm],
    rank: Rank,
    complements: int,
) -> list[ArmAnswer]:
    """Each user's list from their arm (``arms``, one per row; no list for a holdout), and
    every shadow arm's list for every user.  Users of arms that score alike (same kind,
    version and complements) share one call: the common case, one arm, is one call as
    before.  ``complements`` is what an arm without its own takes (the setting); the
    request carries at least the most any arm takes (:meth:`Experiment.most_complements`)."""
    groups: dict[tuple[ArmKind, str, int], list[int]] = {}
    first: dict[tuple[ArmKind, str, int], Arm] = {}
    for row, arm in enumerate(arms):
        if arm.emits:
            key = (arm.kind, arm.model_version, arm.complements_or(complements))
            groups.setdefault(key, []).append(row)
            first.setdefault(key, arm)
    out: list[ArmAnswer] = []
    for key, rows in groups.items():
        part_request = take_rows(request, rows).with_complements(key[2])
        top, model, degraded = await rank(part_request, first[key])
        # Rows of different arms that score alike: split the answer back per arm.
        by_arm: dict[str, list[int]] = {}
        for j, row in enumerate(rows):
            by_arm.setdefault(arms[row].name, []).append(j)
        for js in by_arm.values():
            part = top if len(js) == len(rows) else top_rows(top, js)
            out.append(ArmAnswer(arms[rows[js[0]]], [rows[j] for j in js], part, model, degraded))
    every = list(range(request.size))
    for arm in shadows:
        if every:
            shadow_request = request.with_complements(arm.complements_or(complements))
            top, model, degraded = await rank(shadow_request, arm)
            out.append(ArmAnswer(arm, every, top, model, degraded))
    return out


def top_rows(top: TopK, rows: Sequence[int]) -> TopK:
    """The lists of some of the users of ``top``, in ``rows`` order."""
    idx = np.asarray(rows, np.int64)
    return TopK(**{k: v[idx] for k, v in top.arrays().items()})


def shown_lists(
    triggers: Sequence[ShopEvent],
    answers: Sequence[tuple[ArmAnswer, Sequence[str | None]]],
    experiment: str,
) -> dict[str, list[ShownList]]:
    """The lists attribution remembers, per user, from each arm's answer and its items as
    ids (``ItemTable.id_of`` of its top items; None, an item not known here, is left out):
    every non-empty list, live or shadow, under the id of its trigger."""
    out: dict[str, list[ShownList]] = {}
    for answer, ids in answers:
        k = answer.top.items.shape[1]
        for r, row in enumerate(answer.rows):
            items = tuple(i for i in ids[r * k : (r + 1) * k] if i is not None)
            if items:
                t = triggers[row]
                out.setdefault(t.user_id, []).append(
                    ShownList(
                        list_id(t.user_id, t.event_id),
                        experiment,
                        answer.arm.name,
                        t.ts,
                        items,
                        answer.arm.shadow,
                    )
                )
    return out


def attributable(experiment: Experiment, event: ShopEvent) -> Attributable | None:
    """The event as attribution sees it, or None when it cannot be credited to a list."""
    outcome = experiment.counts_as(event.type)
    if outcome is None or not event.item_id:
        return None
    value = revenue(event.price, event.qty) if outcome == "purchase" else 0.0
    return Attributable(event.event_id, outcome, event.item_id, event.ts, value)


class ExperimentRunner:
    """Assignment, attribution and the bandit for one worker (see the module docstring)."""

    def __init__(
        self,
        experiment: Experiment,
        store: Attribution,
        stats: WorkerStats,
        clock_s: Callable[[], float] = time.time,
    ) -> None:
        self.experiment = experiment
        self._store = store
        self._stats = stats
        self._clock_s = clock_s
        self._arms = {a.name: a for a in experiment.arms}
        self._allocation: Allocation | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, redis: Redis, stats: WorkerStats
    ) -> ExperimentRunner | None:
        """The configured experiment (one arm, the served ranker, when none is), or None
        when ``SHOPREC_ATTRIBUTION_WINDOW_MS`` is 0."""
        if settings.attribution_window_ms == 0:
            if settings.experiment is not None:
                raise ConfigError(
                    f"experiment {settings.experiment.name!r} needs attribution: set "
                    "SHOPREC_ATTRIBUTION_WINDOW_MS above 0 or unset SHOPREC_EXPERIMENT"
                )
            return None
        experiment = settings.experiment or DEFAULT_EXPERIMENT
        policy = AttributionPolicy(
            experiment.name,
            tuple(a.name for a in experiment.live_arms),
            settings.attribution_window_ms,
            settings.user_ttl_s,
        )
        return cls(experiment, AttributionStore(redis, policy), stats)

    async def check_versions(self, ranker: RankerClient) -> None:
        """Fail at start-up, saying what to fix, when an arm names a ranker version Triton
        does not serve (every call of that arm would fail and open the breaker)."""
        for arm in self.experiment.arms:
            version = arm.model_version if arm.kind == "ranker" else ""
            if version and not await ranker.serves_version(version):
                raise ConfigError(
                    f"experiment {self.experiment.name!r}, arm {arm.name!r}: Triton does not "
                    f"serve {ranker.ranker_model} version {version}; keep it loaded "
                    "(config.pbtxt: version_policy: { specific: { versions: [...] } }) or "
                    "change the arm's model_version (SHOPREC_EXPERIMENT)"
                )

    @property
    def shadows(self) -> tuple[Arm, ...]:
        return self.experiment.shadow_arms

    def arm(self, name: str) -> Arm:
        return self._arms[name]

    async def shares(self) -> dict[str, float]:
        """The shares new users are assigned by now: the configuration's, or the bandit's
        allocation of the current period (computed once per period by whichever worker
        asks first, and read by the others)."""
        bandit = self.experiment.bandit
        if bandit is None:
            return self.experiment.shares()
        now = self._clock_s()
        period = int(now // bandit.every_s)
        if self._allocation is None or self._allocation.period != period:
            stats = bandit_stats(self.experiment, await self._store.totals())
            proposal = thompson(self.experiment, stats, period, int(now * 1000))
            stored = await self._store.allocation(period, proposal.to_json())
            self._allocation = Allocation.from_json(stored)
            log.info("bandit allocation %s", self._allocation.shares)
        return self._allocation.shares

    async def observe(self, events: Sequence[ShopEvent]) -> dict[str, str]:
        """Each user's arm, after crediting their clicks, carts and purchases (exactly once)."""
        per_user: dict[str, list[Attributable]] = {}
        for e in events:
            found = attributable(self.experiment, e)
            per_user.setdefault(e.user_id, [])
            if found is not None:
                per_user[e.user_id].append(found)
        return await self._observe(per_user)

    async def arms_of(self, users: Iterable[str]) -> dict[str, str]:
        """The arm of each of ``users`` (assigning the new ones), without events: what a
        caller that recommends outside the event stream (the pull API) asks."""
        return await self._observe({u: [] for u in users})

    async def _observe(self, per_user: Mapping[str, list[Attributable]]) -> dict[str, str]:
        if not per_user:
            return {}
        shares = list((await self.shares()).items())
        name = self.experiment.name
        observed = await self._store.observe(
            {u: (assign(u, name, shares), events) for u, events in per_user.items()}
        )
        self._count(observed, [])
        return {u: o.arm for u, o in observed.items()}

    async def show(self, lists: Mapping[str, Sequence[ShownList]]) -> None:
        """Remember the lists the batch's users were shown (and their shadow lists)."""
        recorded = await self._store.show(lists)
        self._count({}, recorded)

    def _count(self, observed: Mapping[str, Observed], shown: Sequence[ShownList]) -> None:
        delta = totals_delta(observed, shown)
        self._store.count(delta)
        counts: dict[tuple[str, str], float] = {}
        for key, value in delta.items():
            arm, _, what = key.rpartition(":")
            if what in ("users", "lists", "revenue", "buys", "spend", *OUTCOMES):
                counts[(arm, what)] = counts.get((arm, what), 0.0) + value
        self._stats.observe_experiment(self.experiment.name, counts)

    async def flush(self) -> None:
        await self._store.flush()
