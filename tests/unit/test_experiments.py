"""Experiments without services: the configuration, assignment, the attribution rule (the
in-memory twin of the Lua, which ``tests/integration/test_attribution_store.py`` holds
equal to it), the bandit, the arms' scoring and the report's statistics."""

from __future__ import annotations

import gzip
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from features.attribution import (
    Attributable,
    AttributionPolicy,
    MemoryAttribution,
    ShownList,
)
from features.candidates import Mixed
from features.item_table import ItemTable
from ops.experiment import (
    build_report,
    difference,
    format_report,
    mean_ci,
    paired_ratio_difference,
    proportion_ci,
    ratio_ci,
)
from ranking.fusion import Reason
from ranking.pipeline import TopK, empty_request
from shoprec.experiments import (
    DEFAULT_EXPERIMENT,
    Arm,
    Experiment,
    assign,
    list_id,
    load_experiment,
    revenue,
)
from shoprec.settings import Settings
from streams.bandit import Allocation, bandit_stats, thompson
from streams.experiment import CovisitationScorer, ExperimentRunner, rank_by_arm
from streams.metrics import WorkerStats
from streams.observability import StatsCollector, worker_counters

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
AB = {
    "name": "ab",
    "arms": [
        {"name": "ranker", "share": 0.4},
        {"name": "covis", "kind": "covisitation", "share": 0.4, "complements": 3},
        {"name": "holdout", "kind": "holdout", "share": 0.2},
        {"name": "v1", "kind": "ranker", "model_version": "1", "shadow": True},
    ],
    "click_types": ["click", "view"],
}


def rees46_users() -> list[str]:
    with gzip.open(DATA / "rees46-sample" / "events.jsonl.gz", "rb") as fh:
        return list(dict.fromkeys(orjson.loads(line)["user_id"] for line in fh))


# --- configuration ----------------------------------------------------------------------


def test_an_experiment_parses_from_json_a_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = load_experiment(orjson.dumps(AB).decode())
    assert exp is not None and exp.control_arm == "ranker"
    assert [a.name for a in exp.live_arms] == ["ranker", "covis", "holdout"]
    assert [a.name for a in exp.shadow_arms] == ["v1"]
    assert exp.counts_as("view") == "click" and exp.counts_as("search") is None
    path = tmp_path / "ab.json"
    path.write_bytes(orjson.dumps(AB))
    assert load_experiment(str(path)) == exp
    monkeypatch.setenv("SHOPREC_EXPERIMENT", str(path))
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.experiment == exp
    # To a child process and back, as JSON.
    monkeypatch.setenv("SHOPREC_EXPERIMENT", settings.as_env()["SHOPREC_EXPERIMENT"])
    assert Settings(_env_file=None).experiment == exp  # type: ignore[call-arg]
    assert load_experiment("") is None
    assert DEFAULT_EXPERIMENT.counts_as("view") is None  # a click is a click by default


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}]}, "add up"),
        ({"arms": [{"name": "a", "share": 1.0}, {"name": "a", "share": 0.0}]}, "unique"),
        ({"arms": [{"name": "a", "share": 1.0, "shadow": True}]}, "not a shadow"),
        (
            {"arms": [{"name": "a", "share": 1.0}, {"name": "s", "share": 0.1, "shadow": True}]},
            "has no share",
        ),
        ({"control": "nope"}, "not one of the arms"),
        ({"arms": [{"name": "x y", "share": 1.0}]}, "pattern"),
        (
            {
                "bandit": {"min_share": 0.4},
                "arms": [
                    {"name": "a", "share": 0.3},
                    {"name": "b", "share": 0.3},
                    {"name": "c", "kind": "retrieval", "share": 0.4},
                ],
            },
            "exceeds 1",
        ),
    ],
)
def test_a_wrong_experiment_says_what_is_wrong(change: dict[str, object], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        Experiment.model_validate(AB | change)


def test_assignment_is_stable_reproducible_and_follows_the_shares() -> None:
    users = rees46_users()
    shares = list(Experiment.model_validate(AB).shares().items())
    arms = [assign(u, "ab", shares) for u in users]
    assert arms == [assign(u, "ab", shares) for u in users]  # no state, same answer
    counts = {a: arms.count(a) for a in ("ranker", "covis", "holdout")}
    n = len(users)
    for arm, share in shares:
        # Binomial: within 4 standard deviations of the share.
        assert abs(counts[arm] / n - share) < 4 * math.sqrt(share * (1 - share) / n), counts
    # Another experiment's name reshuffles the users.
    other = [assign(u, "ab2", shares) for u in users]
    assert 0.3 < np.mean([a == b for a, b in zip(arms, other, strict=True)]) < 0.6


def test_list_ids_and_revenue() -> None:
    assert list_id("u1", "e1") == list_id("u1", "e1") != list_id("u1", "e2")
    assert len(list_id("u1", "e1")) == 16
    assert revenue(2.55, 6) == pytest.approx(15.3) and revenue(35.79, None) == 35.79
    assert revenue(None, 3) == 0.0


# --- the attribution rule -----------------------------------------------------------------


POLICY = AttributionPolicy("ab", ("ranker", "covis", "holdout"), window_ms=1000, ttl_s=60)


def shown(lid: str, arm: str, ts: int, items: str, shadow: bool = False) -> ShownList:
    return ShownList(lid, "ab", arm, ts, tuple(items.split()), shadow)


def click(eid: str, item: str, ts: int, outcome: str = "click", rev: float = 0.0) -> Attributable:
    return Attributable(eid, outcome, item, ts, rev)  # type: ignore[arg-type]


async def test_an_event_goes_to_the_latest_list_that_showed_the_item_in_the_window() -> None:
    m = MemoryAttribution(POLICY)
    first = await m.observe({"u": ("ranker", [])})
    assert first["u"].arm == "ranker" and first["u"].new
    await m.show({"u": [shown("L1", "ranker", 100, "a b c"), shown("S1", "v1", 100, "c d", True)]})
    await m.show({"u": [shown("L2", "ranker", 500, "c e")]})
    out = await m.observe(
        {
            "u": (
                "covis",  # proposed, ignored: the user has an arm
                [
                    click("e1", "c", 600),  # L2 (newest holding c); S1 (shadow) beside it
                    click("e2", "a", 700),  # L1
                    click("e3", "e", 500),  # not after L2's trigger: nothing
                    click("e4", "b", 1101),  # L1's window (100 + 1000) is over
                    click("e5", "c", 900, "purchase", 9.5),  # L2 again, first purchase
                    click("e1", "c", 600),  # the same event id: nothing, once
                ],
            )
        }
    )
    o = out["u"]
    assert o.arm == "ranker" and not o.new
    assert [e.event_id for e in o.fresh] == ["e1", "e2", "e3", "e4", "e5"]
    got = [(c.event.event_id, c.list_id, c.position, c.first, c.shadow) for c in o.credits]
    assert got == [
        ("e1", "L2", 1, True, False),
        ("e1", "S1", 1, True, True),
        ("e2", "L1", 1, True, False),
        ("e5", "L2", 1, True, False),
        ("e5", "S1", 1, True, True),
    ]
    ((_, rec),) = m.records()
    assert rec["ranker:click"] == "2.0" and rec["ranker:click_lists"] == "2.0"
    assert rec["ranker:revenue"] == "9.5" and rec["spend"] == "9.5" and rec["buys"] == "1.0"
    assert rec["v1:click"] == "1.0" and rec["ranker:lists"] == "2.0" and rec["v1:lists"] == "1.0"


async def test_a_list_is_remembered_once_and_old_ones_leave_after_the_window() -> None:
    m = MemoryAttribution(POLICY)
    a = shown("L1", "ranker", 100, "a")
    assert await m.show({"u": [a]}) == [a]
    assert await m.show({"u": [a]}) == []  # emitted again for a redelivered trigger
    await m.show({"u": [shown("L2", "ranker", 2000, "b")]})
    assert [x["id"] for x in m.users["u"].lists] == ["L2"]


async def test_shares_changing_moves_only_new_users_and_a_removed_arm_reassigns() -> None:
    m = MemoryAttribution(POLICY)
    assert (await m.observe({"u": ("covis", [])}))["u"].arm == "covis"
    assert (await m.observe({"u": ("ranker", [])}))["u"].arm == "covis"  # sticky
    narrower = AttributionPolicy("ab", ("ranker", "holdout"), 1000, 60)
    m.policy = narrower  # the covis arm was removed from the configuration
    again = (await m.observe({"u": ("ranker", [])}))["u"]
    assert again.arm == "ranker" and again.new
    m.policy = AttributionPolicy("next", ("ranker", "holdout"), 1000, 60)
    assert (await m.observe({"u": ("holdout", [])}))["u"].new  # a new experiment: fresh


# --- the bandit -----------------------------------------------------------------------------


def bandit_experiment(min_share: float = 0.1) -> Experiment:
    return Experiment.model_validate(
        AB | {"bandit": {"reward": "click", "min_share": min_share, "every_s": 60}}
    )


def test_thompson_moves_new_users_toward_the_arm_whose_lists_get_clicked() -> None:
    exp = bandit_experiment()
    even = thompson(exp, {}, period=1, ts=0)
    assert even.shares["holdout"] == pytest.approx(0.2)
    assert even.shares["ranker"] == pytest.approx(0.4, abs=0.03)
    totals = {"ranker:lists": 400, "ranker:click_lists": 80, "covis:lists": 400,
              "covis:click_lists": 40}  # fmt: skip
    stats = bandit_stats(exp, totals)
    assert stats == {"ranker": (80.0, 400.0), "covis": (40.0, 400.0)}
    moved = thompson(exp, stats, period=2, ts=0)
    assert moved.shares["ranker"] == pytest.approx(0.8 * 0.9, abs=0.01)  # all but the floor
    assert moved.shares["covis"] == pytest.approx(0.8 * 0.1, abs=0.01)
    assert sum(moved.shares.values()) == pytest.approx(1.0)
    # Every worker computes the same allocation from the same counts.
    assert thompson(exp, stats, 2, 0) == moved
    assert Allocation.from_json(moved.to_json()) == moved


async def test_the_runner_assigns_by_the_bandit_s_allocation_of_the_period() -> None:
    exp = bandit_experiment()
    store = MemoryAttribution(AttributionPolicy("ab", ("ranker", "covis", "holdout"), 1000, 60))
    store.count({"ranker:lists": 1000, "ranker:click_lists": 300, "covis:lists": 1000})
    clock = [120.0]
    runner = ExperimentRunner(exp, store, WorkerStats(), clock_s=lambda: clock[0])
    users = rees46_users()[:600]
    arms = await runner.arms_of(users)
    share = sum(a == "ranker" for a in arms.values()) / len(users)
    assert share == pytest.approx(0.72, abs=0.08)
    assert list(store.allocations) == [2]  # period 120 s // 60 s
    clock[0] = 130.0
    await runner.arms_of(["another"])
    assert list(store.allocations) == [2]  # the same period: no new allocation


# --- arms and metrics ------------------------------------------------------------------------


def test_covisitation_order_puts_co_visited_items_first_then_popular_ones() -> None:
    items = np.array([[5, 6, 7, 8]], np.int64)
    signals = np.zeros((1, 4, 3), np.float32)
    signals[0, :, 0] = [0.0, 3.0, 0.0, 1.0]  # co-visitation
    signals[0, :, 1] = [50.0, 0.0, 5.0, 0.0]  # popularity
    signals[0, :, 2] = [0.9, 0.1, 0.8, 0.2]  # retrieval: ignored
    cands = Mixed(items, np.zeros((1, 4), np.int32), signals)
    scorer = CovisitationScorer()
    scores = scorer.score(empty_request(1), cands, ItemTable())
    assert list(np.argsort(-scores[0], kind="stable")) == [1, 3, 0, 2]
    reasons, _ = scorer.explain(empty_request(1), items, signals, ItemTable())
    assert list(reasons[0]) == [Reason.POPULAR, Reason.COVISIT, Reason.POPULAR, Reason.COVISIT]


async def test_users_of_arms_that_score_alike_share_one_call_and_get_their_own_answer() -> None:
    exp = Experiment.model_validate(
        {
            "name": "x",
            "arms": [
                {"name": "a", "share": 0.3},
                {"name": "b", "share": 0.3},  # the served ranker too: one call with a
                {"name": "c", "kind": "covisitation", "share": 0.2},
                {"name": "h", "kind": "holdout", "share": 0.2},
                {"name": "s", "kind": "retrieval", "shadow": True},
            ],
        }
    )
    calls: list[tuple[str, int]] = []

    async def rank(request, arm):  # type: ignore[no-untyped-def]
        calls.append((arm.kind, request.size))
        rows = np.arange(request.size, dtype=np.int32)[:, None]
        top = TopK(rows, rows.astype(np.float32), rows, rows, rows)
        return top, arm.kind, False

    per_row = [exp.arm(n) for n in ("a", "h", "b", "c", "a")]
    answers = await rank_by_arm(empty_request(5), per_row, exp.shadow_arms, rank, 10)
    assert calls == [("ranker", 3), ("covisitation", 1), ("retrieval", 5)]
    got = {a.arm.name: (a.rows, a.top.items[:, 0].tolist()) for a in answers}
    assert got == {
        "a": ([0, 4], [0, 2]),
        "b": ([2], [1]),
        "c": ([3], [0]),
        "s": ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]),
    }


async def test_each_arm_gets_its_own_number_of_complements_from_one_request() -> None:
    exp = Experiment.model_validate(
        {
            "name": "x",
            "arms": [
                {"name": "ten", "share": 0.5},  # the setting's number
                {"name": "two", "complements": 2, "share": 0.5},
                {"name": "none", "complements": 0, "shadow": True},
            ],
        }
    )
    assert exp.most_complements(3) == 3 and exp.most_complements(1) == 2
    request = replace(
        empty_request(2),
        bought_with=np.array([[7, 8, 9], [4, 5, -1]], np.int32),
        bought_with_score=np.array([[3.0, 2.0, 1.0], [2.0, 1.0, 0.0]], np.float32),
        bought_with_source=np.array([[1, 1, 1], [2, 2, -1]], np.int32),
    )
    seen: dict[str, tuple[list[list[int]], list[list[float]], list[list[int]]]] = {}

    async def rank(request, arm):  # type: ignore[no-untyped-def]
        request.validate()
        seen[arm.name] = (
            request.bought_with.tolist(),
            request.bought_with_score.tolist(),
            request.bought_with_source.tolist(),
        )
        rows = np.arange(request.size, dtype=np.int32)[:, None]
        return TopK(rows, rows.astype(np.float32), rows, rows, rows), arm.name, False

    per_row = [exp.arm("ten"), exp.arm("two")]
    await rank_by_arm(request, per_row, exp.shadow_arms, rank, 3)
    assert seen["ten"] == ([[7, 8, 9]], [[3.0, 2.0, 1.0]], [[1, 1, 1]])
    assert seen["two"] == ([[4, 5]], [[2.0, 1.0]], [[2, 2]])
    assert seen["none"] == ([[-1], [-1]], [[0.0], [0.0]], [[-1], [-1]])
    with pytest.raises(ValidationError, match="no list"):
        Arm(name="h", kind="holdout", complements=0)


def test_per_arm_counters_reach_prometheus_and_come_back() -> None:
    stats = WorkerStats()
    stats.observe_experiment("ab", {("ranker", "lists"): 3, ("ranker", "click"): 2})
    stats.observe_experiment("ab", {("ranker", "revenue"): 9.5, ("holdout", "users"): 1})
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(StatsCollector(stats))
    text = generate_latest(registry).decode()
    assert 'shoprec_arm_attributed_total{arm="ranker",experiment="ab",outcome="click"} 2.0' in text
    back = worker_counters(text)["experiments"]["ab"]
    assert back["ranker"] == {"lists": 3.0, "click": 2.0, "revenue": 9.5}
    assert back["holdout"] == {"users": 1.0}


def test_intervals() -> None:
    wilson = proportion_ci(5, 100)
    assert wilson.value == 0.05 and wilson.low == pytest.approx(0.0215, abs=1e-3)
    assert wilson.high == pytest.approx(0.1118, abs=1e-3)
    m = mean_ci(np.array([1.0, 2.0, 3.0, 4.0]))
    assert m.value == 2.5 and m.se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    # A ratio of sums: users with more lists weigh more.
    r = ratio_ci(np.array([1.0, 0.0, 3.0]), np.array([2.0, 2.0, 6.0]))
    assert r.value == pytest.approx(0.4)
    # Two arms on the same triggers: identical rates differ by exactly 0.
    y, x = np.array([1.0, 0.0, 2.0]), np.array([3.0, 1.0, 4.0])
    same = paired_ratio_difference(y, x, y, x)
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0]
    # Nothing attributed to either arm: no difference, not a zero-width "+0.00 [+0.00, +0.00]".
    none = np.zeros(3)
    assert paired_ratio_difference(none, x, none, x)["diff"] is None
    assert difference(proportion_ci(0, 50), proportion_ci(0, 80))["diff"] is None
    assert difference(proportion_ci(1, 50), proportion_ci(0, 80))["diff"] == pytest.approx(0.02)


def test_the_report_compares_each_arm_with_the_control() -> None:
    exp = Experiment.model_validate(AB)
    records = (
        [{"exp": "ab", "arm": "ranker", "ranker:lists": "4", "ranker:click_lists": "2"}] * 30
        + [{"exp": "ab", "arm": "covis", "covis:lists": "4", "covis:click_lists": "1"}] * 30
        + [{"exp": "ab", "arm": "holdout", "buys": "1", "spend": "10"}] * 3
        + [{"exp": "ab", "arm": "holdout"}] * 27
    )
    report = build_report(exp, records, k=10, window_ms=1_800_000)
    assert report.arms["ranker"].metrics["ctr"].value == 0.5
    assert report.arms["covis"].vs_control["ctr"]["diff"] == pytest.approx(-0.25)
    holdout = report.arms["holdout"]
    assert holdout.users == 30 and holdout.metrics["conversion"].value == pytest.approx(0.1)
    assert holdout.metrics["revenue_per_user"].value == pytest.approx(1.0)
    assert holdout.metrics["ctr"].value is None
    text = format_report(report)
    assert "CTR@K" in text and "vs control -25.00 pp" in text
    assert "covis (covisitation, 3 complements, share 0.4)" in text
    assert "ranker (ranker, share 0.4)" in text
    doc = report.to_json()
    assert doc["arms"]["covis"]["complements"] == 3 and doc["arms"]["ranker"]["complements"] is None
    assert doc["arms"]["covis"]["ctr"]["ci95"][1] < doc["arms"]["ranker"]["ctr"]["ci95"][1]
