"""Faults on the cluster, for real, while rees46 events stream through a real worker.

Each test breaks one part of the running cluster mid-stream (a Kafka broker that leads
partitions, a Redis primary failed over by hand or killed, a Triton server, workers
joining and leaving), then checks the promises on what came out: every record counted
once in the worker's books (from its /metrics), every good event folded into user state
exactly once, no dead letters, and what the fault must not cause (degraded output while
a Triton remains, users' histories out of order).  Each reports what it measured (time
to recover, the longest stall of the output, latency before / during / after the fault)
and keeps it in ``bench/results/cluster-faults.json``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from features import keys
from features.connection import open_redis
from infra import procs, redis_cluster
from tests.cluster.cluster import (
    Cluster,
    first_served_after_s,
    latency_windows,
    longest_output_gap_s,
    triton_successes,
    wait_for,
)
from tests.faults.harness import BUCKETS, Scenario, assert_books_balance, count_users

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(900),
]

RATE = 40.0
Report = Callable[[dict[str, Any]], None]


def now_ms() -> float:
    return time.time() * 1000


def windows(
    recs: list[dict[str, Any]], start_ms: float, fault_ms: float, back_ms: float, end_ms: float
) -> dict[str, Any]:
    """Latency of the events sent before the fault (up to 2 s before it, so none was
    still in flight when it struck), while it lasted, and after the cluster was back."""
    return latency_windows(
        recs,
        [
            ("before", start_ms, fault_ms - 2000),
            ("during", fault_ms, back_ms),
            ("after", back_ms, end_ms),
        ],
    )


async def finish(
    s: Scenario, events: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Wait until everything sent is handled, then check what every fault here promises:
    the books close, each event is in state once, every user got a list and none is
    degraded. The output and the worker's final books."""
    caught_up_s = await s.caught_up(timeout_s=300)
    recs, dead = list(s.out.recs), list(s.out.dead)
    assert s.worker.proc.poll() is None, s.worker.tail()
    stats = s.worker.stop()
    assert not dead, [d.value for d in dead]  # a fault is not bad input
    stats["caught_up_s"] = round(caught_up_s, 1)
    assert_books_balance(stats, len(events))
    await s.assert_in_state_once(events)
    assert {r["user_id"] for r in recs} == set(count_users(events))
    degraded = [r for r in recs if r["degraded"]]
    assert not degraded, degraded[:3]
    return recs, stats


def books(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: int(stats[k]) for k in ("events_in", *BUCKETS, "degraded")}


# --- Kafka ----------------------------------------------------------------------------------


async def test_a_kafka_broker_that_leads_partitions_is_killed(
    scenario: Scenario, whole: Cluster, report: Report
) -> None:
    """SIGKILL of the broker leading most input partitions: leadership moves to the other
    two (replication factor 3, min.insync.replicas 2, acks=all), nothing is lost, and the
    records redelivered or re-sent around the kill are counted once."""
    s, c = scenario, whole
    events = s.events(1000)
    topics = list(s.names.events)
    m: dict[str, Any] = {}

    def leaders_moved(node: int) -> bool:
        with_leaders = c.leaders(topics)
        return all(0 <= n != node for ns in with_leaders.values() for n in ns)

    async def kill_a_leader() -> None:
        counts = Counter(n for ns in c.leaders(topics).values() for n in ns)
        node, led = counts.most_common(1)[0]
        m.update(victim=f"broker-{node}", input_partitions_it_led=led)
        m["fault_ms"] = now_ms()
        await asyncio.to_thread(c.kill, f"broker-{node}")
        m["leaders_moved_s"] = round(
            await asyncio.to_thread(wait_for, lambda: leaders_moved(node), 120, "new leaders"),
            2,
        )
        m["back_ms"] = now_ms()

    start_ms = now_ms()
    await s.stream(events, RATE, meanwhile={300: kill_a_leader})
    end_ms = now_ms()
    recs, stats = await finish(s, events)

    # The broker comes back and catches up (its replicas in sync again).
    began = time.monotonic()
    await asyncio.to_thread(c.restore)
    report(
        {
            "victim": m["victim"],
            "input_partitions_it_led": m["input_partitions_it_led"],
            "leaders_moved_s": m["leaders_moved_s"],
            "first_served_after_kill_s": first_served_after_s(recs, m["fault_ms"]),
            "longest_output_stall_s": longest_output_gap_s(recs, m["fault_ms"] - 5000, end_ms),
            "latency_ms": windows(recs, start_ms, m["fault_ms"], m["back_ms"], end_ms),
            "restarted_and_in_sync_s": round(time.monotonic() - began, 1),
            "producer_resends": s.sent.failed_sends,
            "books": books(stats),
            "events_sent": len(events),
            "rate_per_s": RATE,
        }
    )


# --- Redis Cluster ----------------------------------------------------------------------------


async def test_a_redis_primary_is_failed_over_by_hand(
    scenario: Scenario, whole: Cluster, report: Report
) -> None:
    """``CLUSTER FAILOVER`` on a primary's replica: the replica takes over its slots, the
    worker follows the MOVED replies, and the books close with every event once."""
    s, c = scenario, whole
    events = s.events(800)
    primary, replica = c.primary_and_replica()
    m: dict[str, Any] = {}

    async def fail_over() -> None:
        m["fault_ms"] = now_ms()
        answer = redis_cluster.command(procs.LOOPBACK, c.port(replica), "CLUSTER", "FAILOVER")
        assert answer == "OK"
        took = await asyncio.to_thread(
            wait_for,
            lambda: c.is_primary(replica) and not c.is_primary(primary) and c.redis_ok(),
            60,
            f"{replica} to take over from {primary}",
        )
        m["replica_took_over_s"] = round(took, 2)
        m["back_ms"] = now_ms()

    start_ms = now_ms()
    await s.stream(events, RATE, meanwhile={250: fail_over})
    end_ms = now_ms()
    recs, stats = await finish(s, events)

    assert c.is_primary(replica) and not c.is_primary(primary)
    report(
        {
            "primary": primary,
            "replica": replica,
            "replica_took_over_s": m["replica_took_over_s"],
            "first_served_after_failover_s": first_served_after_s(recs, m["fault_ms"]),
            "longest_output_stall_s": longest_output_gap_s(recs, m["fault_ms"] - 5000, end_ms),
            "latency_ms": windows(recs, start_ms, m["fault_ms"], m["back_ms"], end_ms),
            "books": books(stats),
            "events_sent": len(events),
            "rate_per_s": RATE,
        }
    )


async def test_a_redis_primary_is_killed(
    scenario: Scenario, whole: Cluster, report: Report
) -> None:
    """SIGKILL of a primary: after cluster-node-timeout (5 s) its replica is elected and
    takes its slots; meanwhile the worker retries the calls of that node alone (the other
    nodes' replies are kept), so the books close; the killed node comes back as a replica."""
    s, c = scenario, whole
    events = s.events(900)
    primary, replica = c.primary_and_replica()
    m: dict[str, Any] = {}

    async def kill_primary() -> None:
        m["fault_ms"] = now_ms()
        await asyncio.to_thread(c.kill, primary)
        took = await asyncio.to_thread(
            wait_for,
            lambda: c.is_primary(replica) and c.redis_ok(),
            60,
            f"{replica} elected in place of {primary}",
        )
        m["replica_took_over_s"] = round(took, 2)
        m["back_ms"] = now_ms()

    start_ms = now_ms()
    await s.stream(events, RATE, meanwhile={250: kill_primary})
    end_ms = now_ms()
    recs, stats = await finish(s, events)

    log = s.worker.log()
    began = time.monotonic()
    await asyncio.to_thread(c.restore)
    rejoined = not c.is_primary(primary)
    assert rejoined, f"{primary} should come back as a replica"
    report(
        {
            "primary": primary,
            "replica": replica,
            "replica_took_over_s": m["replica_took_over_s"],
            "first_served_after_kill_s": first_served_after_s(recs, m["fault_ms"]),
            "longest_output_stall_s": longest_output_gap_s(recs, m["fault_ms"] - 5000, end_ms),
            "latency_ms": windows(recs, start_ms, m["fault_ms"], m["back_ms"], end_ms),
            "killed_node_back_as_replica_s": round(time.monotonic() - began, 1),
            # What the worker did meanwhile: script calls of the dead node sent again
            # (features.connection.ScriptRunner), and whole batches retried (shoprec.retry).
            "worker_script_resends": log.count("script calls not run"),
            "worker_batch_retries": log.count("; retry "),
            "books": books(stats),
            "events_sent": len(events),
            "rate_per_s": RATE,
        }
    )


# --- Triton ----------------------------------------------------------------------------------


async def test_a_triton_server_is_killed(
    scenario: Scenario, whole: Cluster, report: Report
) -> None:
    """SIGKILL of one of the two Tritons: calls that fail there go to the other at once,
    its breaker opens, the survivor takes the whole load, and no recommendation is
    degraded while one server remains."""
    s, c = scenario, whole
    events = s.events(900)
    metrics = c.faults.endpoints.triton_metrics.split(",")
    ranker = s.settings.ranker_model
    m: dict[str, Any] = {}

    async def kill_triton() -> None:
        m["before"] = [triton_successes(x, ranker) for x in metrics]
        m["fault_ms"] = now_ms()
        await asyncio.to_thread(c.kill, "triton-1")
        m["back_ms"] = now_ms()  # nothing to wait for: the other server is there

    start_ms = now_ms()
    await s.stream(events, RATE, meanwhile={300: kill_triton})
    end_ms = now_ms()
    survivor_calls = triton_successes(metrics[1], ranker) - m["before"][1]
    recs, stats = await finish(s, events)

    assert stats["degraded"] == 0
    assert all(r["model"].startswith(f"{ranker}@") for r in recs)
    # Before the kill both servers ranked; after it, the survivor took every batch.
    assert min(m["before"]) > 0, m["before"]
    after_kill = [r for r in recs if r["trigger"]["ts"] > m["fault_ms"]]
    assert survivor_calls > 0 and len(after_kill) > 200
    log = s.worker.log()
    assert "circuit open after" in log, s.worker.tail()
    report(
        {
            "killed": "triton-1",
            "ranker_calls_before_kill": m["before"],
            "survivor_ranker_calls_after_kill": survivor_calls,
            "degraded": stats["degraded"],
            "breaker_probes_of_dead_server": log.count("circuit half-open: probing"),
            "longest_output_stall_s": longest_output_gap_s(recs, m["fault_ms"] - 5000, end_ms),
            "latency_ms": windows(recs, start_ms, m["fault_ms"], m["fault_ms"] + 5000, end_ms),
            "books": books(stats),
            "events_sent": len(events),
            "rate_per_s": RATE,
        }
    )


# --- workers ---------------------------------------------------------------------------------


async def history_in_redis(s: Scenario, users: list[str]) -> dict[str, list[str]]:
    """Each user's history as Redis holds it, oldest first (``item|type|ts``)."""
    redis = open_redis(s.settings.redis_url, cluster=s.settings.redis_cluster)
    token = keys.STATE_PREFIX.set(s.settings.state_prefix)
    try:
        out = {}
        for u in users:
            raw = await redis.lrange(keys.user_hist(u), 0, -1)
            out[u] = [x.decode() for x in reversed(raw)]
        return out
    finally:
        keys.STATE_PREFIX.reset(token)
        await redis.aclose()


@pytest.mark.scenario(topic_partitions=6)
async def test_workers_join_and_leave_and_each_users_order_holds(
    scenario: Scenario, whole: Cluster, report: Report
) -> None:
    """One worker, then three (two join), then two (one leaves): the six partitions of each
    input topic move between them at every change, each record is counted once over all
    three, and every user's history in Redis is in the order the events were sent."""
    s = scenario
    events = s.events(1400)
    m: dict[str, Any] = {}
    joined_all = asyncio.Event()

    async def join() -> None:
        m["join_ms"] = now_ms()
        began = time.monotonic()
        joined = [s.start_worker("worker-b"), s.start_worker("worker-c")]
        for w in joined:
            await w.ready()

        def all_work() -> bool:
            return all(int(w.counters()["events_in"]) > 0 for w in joined)

        await asyncio.to_thread(wait_for, all_work, 120, "the new workers to get partitions")
        m["joined_and_working_s"] = round(time.monotonic() - began, 1)
        m["joined_ms"] = now_ms()
        joined_all.set()

    async def leave() -> None:
        await joined_all.wait()
        m["leave_ms"] = now_ms()
        m["left_stats"] = await asyncio.to_thread(s.workers[1].stop)
        m["left_ms"] = now_ms()

    start_ms = now_ms()
    # Both beside the stream: events keep coming while the group rebalances.
    await s.stream(events, RATE, meanwhile={200: join, 900: leave})
    end_ms = now_ms()
    caught_up_s = await s.caught_up(timeout_s=300)
    recs, dead = list(s.out.recs), list(s.out.dead)
    a, _, c = s.workers
    stats = [a.stop(), m["left_stats"], c.stop()]
    assert not dead

    for one in stats:
        assert one["events_in"] == sum(one[b] for b in BUCKETS), one
        assert int(one["events_in"]) > 0, "every worker had partitions"
    # State first: a record no worker applied names its user here, where books one short
    # cannot tell a lost record from a miscount (seen in CI: 1,399 of 1,400, one user's
    # event missing, before the consumer held commits behind records fetched and never
    # handled; streams/transport.py).
    await s.assert_in_state_once(events)
    events_in = sum(int(x["events_in"]) for x in stats)
    duplicates = sum(int(x["duplicates"]) for x in stats)
    assert events_in - duplicates == len(events), stats

    # Per-user order.  Each event type has its topic, partitioned by user: Kafka keeps one
    # user's events of one type in order, through every rebalance, and so must the worker:
    # the history each user's state holds (the newest SHOPREC_HISTORY_LEN arrivals) has,
    # type by type, the newest of that type's events in the order they were sent.  Across
    # types (two topics) nothing orders them; how often they arrived out of the order they
    # were sent in is measured, not asserted.
    sent: dict[str, list[str]] = {}
    for e in events:
        sent.setdefault(str(e["user_id"]), []).append(f"{e['item_id']}|{e['type']}|{e['ts']}")
    held = await history_in_redis(s, sorted(sent))

    def of_type(entries: list[str], kind: str) -> list[str]:
        return [x for x in entries if x.split("|")[1] == kind]

    out_of_order = {}
    for u, h in held.items():
        for kind in {x.split("|")[1] for x in h}:
            got, want = of_type(h, kind), of_type(sent[u], kind)
            if got != want[-len(got) :]:
                out_of_order[(u, kind)] = (got, want)
    assert not out_of_order, list(out_of_order.items())[:3]
    across_types = sum(1 for u, h in held.items() if h != sent[u][-len(h) :])
    in_one_type = sum(
        1 for u in sent if any(len(of_type(sent[u], k)) > 1 for k in {"view", "cart", "purchase"})
    )

    per_worker = [int(x["events_in"]) for x in stats]
    report(
        {
            "workers": "1 -> 3 (two join) -> 2 (one leaves)",
            "partitions_per_topic": s.settings.topic_partitions,
            "events_in_per_worker": per_worker,
            "joined_and_working_s": m["joined_and_working_s"],
            "stall_at_join_s": longest_output_gap_s(recs, m["join_ms"], m["joined_ms"] + 5000),
            "stall_at_leave_s": longest_output_gap_s(recs, m["leave_ms"], m["left_ms"] + 5000),
            "latency_ms": latency_windows(
                recs,
                [
                    ("one_worker", start_ms, m["join_ms"]),
                    ("rebalancing_to_three", m["join_ms"], m["joined_ms"]),
                    ("three_workers", m["joined_ms"], m["leave_ms"]),
                    ("rebalancing_to_two", m["leave_ms"], m["left_ms"] + 5000),
                    ("two_workers", m["left_ms"] + 5000, end_ms),
                ],
            ),
            "users_checked_for_order": len(held),
            "users_with_several_events_of_one_type": in_one_type,
            "users_out_of_order_within_a_type": len(out_of_order),
            "users_whose_types_interleaved_otherwise_than_sent": across_types,
            "caught_up_s": round(caught_up_s, 1),
            "events_sent": len(events),
            "rate_per_s": RATE,
        }
    )
