"""An experiment on the real stack: the trained ranker against co-visitation order.

Real rees46 events (their recorded times: the window is 30 minutes of the shop's own time;
views count as clicks, the shop logs no clicks) stream through real Kafka, Faust workers
in subprocesses, Redis and Triton, with a holdout beside the two arms:

1. one worker takes the first third;
2. it is restarted with other shares, and a second worker joins (a rebalance): the second
   third;
3. the second worker stops (another rebalance): the last third, then the first 300 events
   once more (a redelivery: they must count nothing again).

Then ``shoprec experiment report --json`` must hold exactly the counts this test computes
on its own from the events it sent and the lists on ``recs.out``: every click, cart and
purchase of an item a list of the same user showed, within the window after the list's
trigger, credited to the latest such list, once.  Every user keeps one arm throughout:
users seen before the shares changed keep the arm of the old shares.

Every event may emit here (``min_emit_interval_ms=0``): a list then exists only for the
last event of its user in a micro-batch, so "the list's trigger came before the event in
the user's stream" is exactly "the list was made before the event was attributed", and
the rule can be computed from the data alone.  (With flood control, an event that shares
a micro-batch with an earlier trigger of its user is not credited to that trigger's list,
which was made after it, knowing it: docs/experiments.md.)
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from infra.stack import Endpoints
from shoprec.experiments import Experiment, assign, revenue
from shoprec.settings import Settings
from streams.topics import TopicNames, ensure_topics, kafka_options
from tests.integration.ops_setup import json_out, load_catalogue, shoprec
from tests.integration.test_end_to_end import consume_all
from tests.worker import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_EVENTS = 2400
RESENT = 300
WINDOW_MS = 30 * 60_000


def experiment(ranker: float, covis: float) -> Experiment:
    return Experiment.model_validate(
        {
            "name": "ranker-vs-covis",
            "control": "ranker",
            "arms": [
                {"name": "ranker", "kind": "ranker", "share": ranker},
                {"name": "covis", "kind": "covisitation", "share": covis},
                {"name": "holdout", "kind": "holdout", "share": 0.2},
            ],
            "click_types": ["click", "view"],
        }
    )


BEFORE, AFTER = experiment(0.4, 0.4), experiment(0.6, 0.2)


def real_events(data_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The first N_EVENTS rees46 events (the file is in event-time order; this test sends
    them in this order, and computes what it expects in the same order), and the
    catalogue records of their items."""
    folder = data_dir / "rees46-sample"
    with gzip.open(folder / "events.jsonl.gz", "rb") as fh:
        events = [orjson.loads(line) for _, line in zip(range(N_EVENTS), fh, strict=False)]
    wanted = {e["item_id"] for e in events}
    with gzip.open(folder / "items.jsonl.gz", "rb") as fh:
        items = [it for line in fh if (it := orjson.loads(line))["item_id"] in wanted]
    return events, items


async def send(settings: Settings, events: Sequence[dict[str, Any]]) -> None:
    names = TopicNames.from_settings(settings)
    producer = AIOKafkaProducer(**kafka_options(settings), acks="all")
    await producer.start()
    try:
        for e in events:  # recorded times kept: a replay of the shop's history
            await producer.send(
                names.event_topic(e["type"]), orjson.dumps(e), key=e["user_id"].encode()
            )
        await producer.flush()
    finally:
        await producer.stop()


def applied(counters: dict[str, Any]) -> int:
    """Events a worker folded into state for the first time (redelivered ones are in
    duplicates)."""
    return int(
        counters["events_in"]
        - counters["duplicates"]
        - counters["dead_lettered"]
        - counters["suppressed"]
    )


async def drained(workers: Sequence[WorkerProcess], done: int, target: int) -> list[int]:
    """Wait until the workers (plus ``done`` by stopped ones) applied ``target`` distinct
    events; returns what each worker applied."""
    deadline = time.monotonic() + 300
    while True:
        counts = [applied(w.counters()) for w in workers]
        if done + sum(counts) >= target:
            return counts
        for w in workers:
            assert w.proc.poll() is None, w.tail()
        assert time.monotonic() < deadline, f"{done + sum(counts)} of {target} events"
        await asyncio.sleep(0.5)


def expected_credits(
    events: Sequence[dict[str, Any]], lists: Sequence[dict[str, Any]], exp: Experiment
) -> dict[str, dict[str, float]]:
    """What attribution must have credited, computed here from the events and ``recs.out``.

    Per user, walking their events in the order sent: a list becomes visible once its
    trigger event is passed; each click (or view), cart or purchase of an item goes to the
    latest visible list shown within the window before it (trigger time < event time <=
    trigger time + window) that holds the item.  Event ids count once."""
    by_trigger = {rec["trigger"]["event_id"]: rec for rec in lists if rec["items"]}
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    shown: dict[str, list[dict[str, Any]]] = defaultdict(list)  # newest first
    first: set[tuple[str, str]] = set()
    seen: set[str] = set()
    for e in events:
        if e["event_id"] in seen:
            continue
        seen.add(e["event_id"])
        outcome = exp.counts_as(e["type"])
        if outcome is not None:
            for rec in shown[e["user_id"]]:
                t = rec["trigger"]["ts"]
                ids = [i["item_id"] for i in rec["items"]]
                if t < e["ts"] <= t + WINDOW_MS and e["item_id"] in ids:
                    arm = out[rec["arm"]]
                    arm[outcome] += 1
                    if (rec["list_id"], outcome) not in first:
                        first.add((rec["list_id"], outcome))
                        arm[f"{outcome}_lists"] += 1
                    if outcome == "purchase":
                        arm["revenue"] += revenue(e.get("price"), e.get("qty"))
                    break
        rec = by_trigger.get(e["event_id"])
        if rec is not None:
            shown[e["user_id"]].insert(0, rec)
    return out


async def test_two_arms_and_a_holdout_report_exactly_what_followed_the_lists(
    stack: Endpoints, data_dir: Path, tmp_path: Path
) -> None:
    from tests.integration.helpers import isolated_settings

    events, items = real_events(data_dir)
    third = N_EVENTS // 3
    # The resent events go first in the last phase: once its new events are all applied,
    # every partition has read past them.
    phases = [events[:third], events[third : 2 * third], events[:RESENT] + events[2 * third :]]
    first = isolated_settings(stack, experiment=BEFORE, topic_partitions=4, min_emit_interval_ms=0)
    later = first.model_copy(update={"experiment": AFTER})
    names = TopicNames.from_settings(first)
    await ensure_topics(first)
    redis = Redis.from_url(stack.redis_url)
    stopped: list[dict[str, Any]] = []
    a = WorkerProcess(first, tmp_path / "a.log")
    b: WorkerProcess | None = None
    try:
        await load_catalogue(first, redis, a, items)

        await send(first, phases[0])
        await drained([a], 0, third)
        stopped.append(a.stop())

        a = WorkerProcess(later, tmp_path / "a2.log")
        b = WorkerProcess(later, tmp_path / "b.log")
        await a.ready()
        await b.ready()
        await send(later, phases[1])
        done = sum(applied(s) for s in stopped)
        per_worker = await drained([a, b], done, 2 * third)
        assert min(per_worker) > 0, "the second worker got no partition: no rebalance"
        stopped.append(b.stop())
        b = None

        await send(later, phases[2])
        done = sum(applied(s) for s in stopped)
        await drained([a], done, N_EVENTS)
        stopped.append(a.stop())
    finally:
        a.close()
        if b is not None:
            b.close()
        await redis.aclose()

    records = await consume_all(first, names.recs_out, lambda rs: False, timeout_s=20)
    lists = [orjson.loads(r.value) for r in records]
    report = json_out(shoprec(later, "experiment", "report", "--json"))
    text = shoprec(later, "experiment", "report", "--plot", str(tmp_path / "report.png"))
    assert text.returncode == 0, text.stderr
    assert "CTR@K" in text.stdout and (tmp_path / "report.png").stat().st_size > 10_000
    print(text.stdout)  # the report of a real replay (pytest -s shows it)

    # One arm per user, whatever worker and whatever shares: the first assignment stays.
    arms: dict[str, set[str]] = defaultdict(set)
    for rec in lists:
        arms[rec["user_id"]].add(rec["arm"])
        assert rec["experiment"] == "ranker-vs-covis" and len(rec["list_id"]) == 16
        if rec["arm"] == "ranker":
            assert rec["model"].startswith("fused_ranker@") and not rec["degraded"]
        else:
            assert rec["model"] == "covisitation@worker"
    assert all(len(a) == 1 for a in arms.values())
    early = {e["user_id"] for e in phases[0]}
    old_shares, new_shares = list(BEFORE.shares().items()), list(AFTER.shares().items())
    expected_arm = {
        e["user_id"]: assign(
            e["user_id"], "ranker-vs-covis", old_shares if e["user_id"] in early else new_shares
        )
        for e in events
    }
    for user, got in arms.items():
        assert got == {expected_arm[user]}, user
    moved = [u for u in early if assign(u, "ranker-vs-covis", new_shares) != expected_arm[u]]
    assert [u for u in moved if u in arms], "no early user would move under the new shares"
    held = {u for u, arm in expected_arm.items() if arm == "holdout"}
    assert held and not held & arms.keys()  # the holdout gets nothing

    # The report's counts are exactly the ones computed here.
    credits = expected_credits(events, lists, BEFORE)
    unique = {rec["list_id"]: rec for rec in lists if rec["items"]}
    for name in ("ranker", "covis", "holdout"):
        arm = report["arms"][name]
        mine = [u for u, a in expected_arm.items() if a == name]
        buys = [e for e in events if e["type"] == "purchase" and expected_arm[e["user_id"]] == name]
        assert arm["users"] == len(mine), name
        assert arm["lists"] == sum(1 for r in unique.values() if r["arm"] == name), name
        want = credits.get(name, {})
        assert arm["clicks"] == want.get("click", 0), name
        assert arm["carts"] == want.get("cart", 0), name
        assert arm["purchases"] == want.get("purchase", 0), name
        assert arm["revenue"] == pytest.approx(want.get("revenue", 0.0), abs=1e-3), name
        assert arm["buyers"] == len({e["user_id"] for e in buys}), name
        spend = sum(revenue(e.get("price"), e.get("qty")) for e in buys)
        assert arm["spend"] == pytest.approx(spend, abs=1e-3), name
        if arm["lists"]:
            assert arm["ctr"]["value"] == pytest.approx(want.get("click_lists", 0) / arm["lists"])
    # Something was credited, in both arms: the comparison means something.
    assert report["arms"]["ranker"]["clicks"] > 20 and report["arms"]["covis"]["clicks"] > 10
    assert report["arms"]["covis"]["vs_control"]["ctr"]["diff"] is not None

    # The workers' Prometheus counters add up to the same credits (each counted once).
    counted: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for final in stopped:
        for arm_name, values in final["experiments"].get("ranker-vs-covis", {}).items():
            for what, n in values.items():
                counted[arm_name][what] += n
    for name in ("ranker", "covis"):
        assert counted[name]["lists"] == report["arms"][name]["lists"]
        assert counted[name]["click"] == report["arms"][name]["clicks"]
        assert counted[name]["users"] == report["arms"][name]["users"]
    assert counted["holdout"]["users"] == report["arms"]["holdout"]["users"]
    held_out = sum(s["held_out"] for s in stopped)
    assert held_out > 0


async def test_an_arm_can_name_a_ranker_version_and_a_missing_one_stops_the_start(
    stack: Endpoints,
) -> None:
    from features.attribution import AttributionPolicy, MemoryAttribution
    from ranking.client import RankerClient
    from ranking.pipeline import empty_request
    from shoprec.errors import ConfigError
    from streams.experiment import ExperimentRunner
    from streams.metrics import WorkerStats

    client = RankerClient(stack.triton_url, timeout_s=20.0)
    try:
        await client.wait_ready(timeout_s=120)
        served = (await client.recommend(empty_request(1))).model_version
        assert (await client.recommend(empty_request(1), served)).model_version == served
        assert await client.serves_version(served) and not await client.serves_version("999")
        for version, ok in ((served, True), ("999", False)):
            exp = Experiment.model_validate(
                {"name": "v", "arms": [{"name": "r", "share": 1.0, "model_version": version}]}
            )
            policy = AttributionPolicy("v", ("r",), WINDOW_MS, 60)
            runner = ExperimentRunner(exp, MemoryAttribution(policy), WorkerStats())
            if ok:
                await runner.check_versions(client)
            else:
                with pytest.raises(ConfigError, match="does not serve fused_ranker version 999"):
                    await runner.check_versions(client)
    finally:
        await client.close()


async def test_the_bandit_moves_new_users_toward_the_arm_whose_lists_get_clicked(
    stack: Endpoints, data_dir: Path, tmp_path: Path
) -> None:
    """The same real events, the same two arms, no holdout: a Thompson-sampling bandit with
    a new allocation every second of wall-clock time, the events sent over about 20 s.  The
    arm the report finds better at the end is the one the allocations moved toward, and the
    other keeps its floor."""
    from tests.integration.helpers import isolated_settings

    events, items = real_events(data_dir)
    bandit = Experiment.model_validate(
        {
            "name": "bandit",
            "arms": [
                {"name": "ranker", "kind": "ranker", "share": 0.5},
                {"name": "covis", "kind": "covisitation", "share": 0.5},
            ],
            "click_types": ["click", "view"],
            "bandit": {"reward": "click", "min_share": 0.1, "every_s": 1.0},
        }
    )
    settings = isolated_settings(stack, experiment=bandit, min_emit_interval_ms=0)
    await ensure_topics(settings)
    redis = Redis.from_url(stack.redis_url)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        await load_catalogue(settings, redis, worker, items)
        for start in range(0, N_EVENTS, 100):  # paced: new users keep coming for a while
            await send(settings, events[start : start + 100])
            await asyncio.sleep(0.8)
        await drained([worker], 0, N_EVENTS)
        worker.stop()
    finally:
        worker.close()
        await redis.aclose()
    report = json_out(shoprec(settings, "experiment", "report", "--json"))
    ctr = {a: report["arms"][a]["ctr"]["value"] for a in ("ranker", "covis")}
    better, worse = sorted(ctr, key=lambda a: -ctr[a])
    shares = [a["shares"] for a in report["bandit"]]
    assert len(shares) >= 5, shares
    assert shares[0][better] == pytest.approx(0.5, abs=0.05)  # no lists yet: even odds
    assert shares[-1][better] > 0.75 and shares[-1][worse] >= 0.1 - 1e-9
    # New users followed: the better arm got more of them than the even split would give.
    assert report["arms"][better]["users"] > report["arms"][worse]["users"]
    print(ctr, [round(s[better], 2) for s in shares])
