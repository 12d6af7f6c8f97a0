"""shoprec's own code on the real cluster: the same state on Redis Cluster as on one Redis,
scripts within one hash slot, scripts a node lacks loaded again, topics with three
replicas, the Triton client spread over both servers and past a dead one, and the stack's
status as `shoprec stack status` prints it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import numpy as np
import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ClusterCrossSlotError

from bench.features import private_redis
from cli.main import format_status
from features import keys
from features.connection import ScriptRunner, is_cluster, open_redis
from features.store import ALWAYS_EMIT, FeatureStore, UpdatePolicy, UserUpdate
from infra import procs, redis_cluster
from ranking.client import RankerClient
from streams.topics import TopicNames, ensure_topics
from tests.cluster.cluster import Cluster, triton_successes
from tests.cluster.conftest import stack_env
from tests.faults.harness import Scenario, count_users, load_events, scenario_settings
from tests.integration.ops_setup import json_out, send, shoprec

pytestmark = [pytest.mark.cluster, pytest.mark.integration, pytest.mark.timeout(600)]

POLICY = UpdatePolicy(
    half_life_ms=7 * 86_400_000, history_len=50, ttl_s=3600, min_emit_interval_ms=30_000
)
BATCH = 64


@pytest.fixture(scope="module")
def single_url() -> Iterator[str]:
    with private_redis() as url:
        yield url


@pytest.fixture
async def both(cluster: Cluster, single_url: str) -> AsyncIterator[tuple[Redis, Redis]]:
    """A client of the Redis Cluster and one of a single Redis, as shoprec opens them."""
    on_cluster = open_redis(cluster.faults.endpoints.redis_url, cluster=True)
    single = open_redis(single_url)
    await single.flushdb()
    yield on_cluster, single
    await on_cluster.aclose()
    await single.aclose()


def updates_of(cluster: Cluster, events: Sequence[dict[str, Any]]) -> list[UserUpdate]:
    """Real rees46 events as the ingest agent hands them to the store (item vectors from
    the catalogue BERT embedded on the cluster's Tritons)."""
    vectors = {
        i.item_id: v
        for i, v in zip(
            cluster.faults.catalogue.items, cluster.faults.catalogue.vectors, strict=True
        )
    }
    return [
        UserUpdate(
            event_id=e["event_id"],
            user_id=str(e["user_id"]),
            type=e["type"],
            ts=int(e["ts"]),
            item_id=str(e["item_id"]),
            vector=vectors.get(str(e["item_id"])),
            always_emit=e["type"] in ALWAYS_EMIT,
        )
        for e in events
    ]


async def user_state(redis: Redis, users: Sequence[str]) -> list[tuple[Any, ...]]:
    out = []
    for u in users:
        out.append(
            (
                await redis.get(keys.user_emb(u)),
                await redis.hgetall(keys.user_meta(u)),
                await redis.lrange(keys.user_hist(u), 0, -1),
                await redis.zrange(keys.user_events(u), 0, -1, withscores=True),
                await redis.get(keys.user_pending(u)),
            )
        )
    return out


async def sorted_sets(redis: Redis, names: Sequence[str]) -> dict[str, Any]:
    return {k: await redis.zrange(k, 0, -1, withscores=True) for k in names}


async def test_the_store_keeps_the_same_state_on_the_cluster_as_on_one_redis(
    cluster: Cluster, both: tuple[Redis, Redis]
) -> None:
    on_cluster, single = both
    assert is_cluster(on_cluster) and not is_cluster(single)
    category = {i.item_id: i.category for i in cluster.faults.catalogue.items}
    prefix = f"code{int(asyncio.get_running_loop().time())}:"
    token = keys.STATE_PREFIX.set(prefix)
    try:
        stores = [
            FeatureStore(r, POLICY, category_of=lambda i: category.get(i) or None)
            for r in (on_cluster, single)
        ]
        events = load_events(900)
        updates = updates_of(cluster, events)
        # Every batch twice: the second time, each event is a duplicate on both.
        for start in range(0, len(updates), BATCH):
            part = updates[start : start + BATCH]
            results = [await s.apply_events(part) for s in stores]
            assert results[0] == results[1]
            again = [await s.apply_events(part) for s in stores]
            assert again[0] == again[1] and not any(r.applied for r in again[0])
        users = sorted({u.user_id for u in updates})
        state = [await user_state(r, users) for r in (on_cluster, single)]
        assert state[0] == state[1]
        assert all(meta for _, meta, *_ in state[0])

        # The user keys spread over every primary, each user's keys in one slot.
        nodes = {on_cluster.get_node_from_key(keys.user_meta(u)).name for u in users}  # type: ignore[attr-defined]
        assert len(nodes) == 3
        # Global keys (popularity buckets) and per-item co-visitation, the same on both.
        names = {k.decode() async for k in single.scan_iter(match=f"{prefix}*", count=10_000)}
        zsets = sorted(n for n in names if not n.startswith(f"{prefix}{{u:"))
        assert any(n.endswith(":cv") for n in zsets) and any("pop:" in n for n in zsets)
        assert await sorted_sets(on_cluster, zsets) == await sorted_sets(single, zsets)

        # What the recommender reads: the same context from both.
        some = users[:40]
        trigger = {u: int(events[-1]["ts"]) for u in some}
        contexts = [await s.read_context(some, trigger) for s in stores]
        for a, b in zip(contexts[0].users.values(), contexts[1].users.values(), strict=True):
            assert np.array_equal(a.embedding, b.embedding)
            assert (a.history, a.covis, a.category_trending) == (
                b.history,
                b.covis,
                b.category_trending,
            )
        assert contexts[0].trending == contexts[1].trending

        # Confirming publishes clears pending triggers on whichever node holds each user.
        pending = [(u, p.decode()) for u, (*_, p) in zip(users, state[0], strict=True) if p]
        assert pending
        cleared = [await s.confirm_published(pending) for s in stores]
        assert cleared == [len(pending), len(pending)]
    finally:
        keys.STATE_PREFIX.reset(token)


async def test_a_node_without_the_scripts_gets_them_again(
    cluster: Cluster, both: tuple[Redis, Redis]
) -> None:
    """A replica promoted by a failover has an empty script cache: NOSCRIPT is answered by
    loading the script there, and the calls that found none are sent again."""
    on_cluster, _ = both
    store = FeatureStore(on_cluster, POLICY)
    updates = updates_of(cluster, load_events(200))
    token = keys.STATE_PREFIX.set(f"noscript{int(asyncio.get_running_loop().time())}:")
    try:
        await store.apply_events(updates[:50])
        for port in cluster.redis_ports():
            if cluster.is_primary(cluster.redis_role_of_port()[port]):
                assert redis_cluster.command(procs.LOOPBACK, port, "SCRIPT", "FLUSH") == "OK"
        results = await store.apply_events(updates[50:])
        assert sum(r.applied for r in results) == len(updates) - 50
        assert sum(r.applied for r in await store.apply_events(updates)) == 0
    finally:
        keys.STATE_PREFIX.reset(token)


async def test_a_script_whose_keys_span_slots_is_refused(
    both: tuple[Redis, Redis],
) -> None:
    on_cluster, _ = both
    script = on_cluster.register_script("return #KEYS")
    runner = ScriptRunner(on_cluster)
    assert await runner.run([(script, [keys.user_meta("7"), keys.user_hist("7")], [])]) == [2]
    with pytest.raises(ClusterCrossSlotError, match="share one hash slot"):
        await runner.run([(script, [keys.user_meta("7"), keys.user_meta("8")], [])])


async def test_topics_are_created_with_three_replicas(cluster: Cluster) -> None:
    settings = scenario_settings(cluster.faults.endpoints)
    assert settings.kafka_replication_factor == 3
    await ensure_topics(settings)
    names = TopicNames.from_settings(settings)
    wanted = [*names.events, names.catalog, names.recs_out, names.dlq]

    def replicated() -> bool:
        meta = cluster.kafka_metadata()
        return meta is not None and all(
            len(meta.topics.get(t, [])) == settings.topic_partitions
            and all(len(p.replicas) == 3 and len(p.isr) == 3 for p in meta.topics[t])
            for t in wanted
        )

    await asyncio.to_thread(procs.wait_until, replicated, 30, "topics with 3 in-sync replicas")
    leaders = cluster.leaders(wanted)
    assert {leader for ls in leaders.values() for leader in ls} == {1, 2, 3}


async def test_the_triton_client_spreads_calls_and_survives_a_dead_server(
    cluster: Cluster,
) -> None:
    ep = cluster.faults.endpoints
    urls, metrics = ep.triton_url.split(","), ep.triton_metrics.split(",")
    assert len(urls) == 2
    texts = [i.text() for i in cluster.faults.catalogue.items if i.text()][:256]
    before = [triton_successes(m, "item_encoder") for m in metrics]
    async with RankerClient(ep.triton_url, timeout_s=30.0) as client:
        await client.wait_ready(["item_encoder"], timeout_s=60)
        embedded = await client.encode(texts)  # 4 requests of 64, spread over both
        reference = await client.encode(["red running shoes"])
        for _ in range(6):
            await client.encode(texts[:8])
    after = [triton_successes(m, "item_encoder") for m in metrics]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert embedded.shape == (len(texts), keys.EMB_DIM)
    assert all(n >= 3 for n in served), served  # both took a share

    # A server that does not answer: every call still succeeds, on the other one, and its
    # breaker opens, so after a few calls it is no longer tried.
    dead = f"127.0.0.1:{procs.free_port()}"
    async with RankerClient(f"{dead},{urls[0]}", timeout_s=5.0) as client:
        await client.wait_ready(["item_encoder"], timeout_s=60)
        for _ in range(12):
            out = await client.encode(["red running shoes"])
            assert np.allclose(out, reference, atol=1e-5)  # a real answer each time
        dead_breaker, live_breaker = client.breakers
        assert dead_breaker.opened >= 1 and live_breaker.opened == 0
        # Once open, the dead server is skipped but for a probe per cool-down.
        assert dead_breaker.probes <= 3, dead_breaker.probes


def test_stack_status_shows_leaders_and_slots(cluster: Cluster) -> None:
    status = cluster.faults.stack.status()
    stack_dir = cluster.faults.stack.stack_dir
    shown = subprocess.run(
        [sys.executable, "-m", "cli.main", "stack", "status"],
        cwd=stack_dir,
        env=stack_env(stack_dir),
        capture_output=True,
        text=True,
        check=False,
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr  # every part healthy
    text = shown.stdout
    assert text.strip() == format_status(cluster.faults.stack.status()).strip()
    # The topics `stack up --cluster` created, three replicas each, are listed.
    assert "shop.views" in text and "recs.out" in text
    assert "Kafka cluster: healthy" in text and "Redis Cluster: healthy" in text
    for role in ["broker-1", "broker-2", "broker-3", "triton-1", "triton-2"]:
        assert role in text
    primaries = status["redis-cluster"]["primaries"]
    redis_section = text[text.index("Redis Cluster:") :].splitlines()
    for role, part in primaries.items():
        line = next(line for line in redis_section if line.strip().startswith(role + " "))
        assert " ".join(part["slots"]) in line and part["replicas"][0] in line
    assert "under-replicated: none" in text
    topic = next(t for t in status["kafka-cluster"]["leaders"] if not t.startswith("__"))
    assert any(line.strip().startswith(topic) and "0:broker-" in line for line in text.splitlines())


# One micro-batch at a time keeps each user's events in partition order.
@pytest.mark.scenario(agent_concurrency=1)
async def test_operator_tools_work_on_the_cluster(scenario: Scenario) -> None:
    """rebuild-state (folded in Python, and --exact through the worker's script) and
    inspect on the cluster: the rebuilt state equals what the worker wrote, key by key,
    over all three primaries."""
    s = scenario
    events = s.events(400)
    # Every event on one topic (the type comes from the payload): the worker keeps a user's
    # order within a partition, not across topics, and co-visitation depends on that order;
    # across five topics the live state and a rebuild may fold a user's events in other
    # orders and differ for that reason alone (tests/integration/ops_setup.py does the same).
    view_topic = s.names.event_topic("view")
    await send(
        s.settings,
        [(view_topic, str(e["user_id"]).encode(), orjson.dumps(e)) for e in events],
    )
    await s.caught_up()
    s.worker.stop()
    users = count_users(events)
    for name, extra in (("rb1", []), ("rb2", ["--exact"])):
        prefix = f"{s.settings.state_prefix}{name}:"
        done = json_out(
            shoprec(s.settings, "rebuild-state", "--state-prefix", prefix, "--json", *extra)
        )
        assert done["applied"] == len(events), done
        assert done["verify"]["equal"], done["verify"]
        assert done["verify"]["users_equal"] == len(users)
    user = max(users, key=lambda u: users[u])
    doc = json_out(shoprec(s.settings, "inspect", "user", user, "--json"))
    assert doc["known"] and doc["counters"]["events"] == users[user]
