"""The client side of the cluster without a cluster: hash slots of the key schema, the
Triton client over several servers (that do not answer), per-server breakers, and how
`shoprec stack status` prints a cluster's report."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from cli.main import format_status
from features import keys
from features.connection import is_cluster, open_redis, open_sync_redis, split_nodes
from infra import redis_cluster
from infra.kafka import ClusterMetadata, PartitionInfo
from infra.procs import free_ports
from infra.stack import ClusterShape, kafka_report_from, redis_report_from
from ranking.breaker import BreakerState, CircuitBreaker
from ranking.client import RankerClient
from shoprec.errors import RankerUnavailable
from shoprec.retry import is_retriable


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


# --- the key schema and Redis Cluster --------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "shadow-2024:"])
def test_each_users_keys_and_each_items_keys_share_one_slot(prefix: str) -> None:
    token = keys.STATE_PREFIX.set(prefix)
    try:
        for user in ["541312140", "u{x}", "a b"]:
            user_slots = {slot(k) for k in [*keys.user_keys(user), keys.user_pending(user)]}
            assert len(user_slots) == 1, (user, user_slots)
        for item in ["44600062", "3900821"]:
            assert slot(keys.item(item)) == slot(keys.item_covis(item))
    finally:
        keys.STATE_PREFIX.reset(token)
    # Users spread over the slots (the tag is the user, not a constant).
    spread = {slot(keys.user_meta(str(u))) for u in range(1000)}
    assert len(spread) > 900


def test_open_redis_gives_the_cluster_client_when_asked() -> None:
    assert is_cluster(open_redis("redis://127.0.0.1:1/0", cluster=True))
    assert not is_cluster(open_redis("redis://127.0.0.1:1/0"))
    assert is_cluster(open_sync_redis("redis://127.0.0.1:1/0", cluster=True, retries=False))
    assert not is_cluster(open_sync_redis("redis://127.0.0.1:1/0"))


def test_cluster_failover_errors_are_retried() -> None:
    from redis.exceptions import (
        ClusterDownError,
        MasterDownError,
        ResponseError,
        SlotNotCoveredError,
        TryAgainError,
    )

    during_failover = [ClusterDownError("x"), MasterDownError("x"), TryAgainError()]
    for exc in [*during_failover, SlotNotCoveredError()]:
        assert is_retriable(exc), exc
    assert not is_retriable(ResponseError("WRONGTYPE"))


# --- per-server breakers and the Triton client over several servers ---------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_twin_breaker_has_the_same_thresholds_and_its_own_state() -> None:
    clock = Clock()
    first = CircuitBreaker("a", failures=2, cool_down_s=0.5, max_cool_down_s=4.0, clock=clock)
    second = first.twin("b")
    assert second.name == "b"
    for _ in range(2):
        second.record_failure()
    assert second.state is BreakerState.OPEN and first.state is BreakerState.CLOSED
    # available() peeks without counting a rejection or starting a probe.
    assert not second.available() and second.rejected == 0
    clock.now = 0.5
    assert second.available() and second.probes == 0
    assert second.allow() and second.probes == 1
    assert not second.available()  # one probe at a time


def test_a_url_without_a_server_is_refused() -> None:
    with pytest.raises(ValueError, match="no Triton server"):
        RankerClient(" , ")


async def test_each_call_tries_two_servers_and_each_server_has_its_breaker() -> None:
    # Nothing listens on these ports: every call fails, on one server and then another.
    clock = Clock()
    urls = [f"127.0.0.1:{p}" for p in free_ports(3)]
    template = CircuitBreaker("t", failures=2, cool_down_s=60.0, max_cool_down_s=60.0, clock=clock)
    client = RankerClient(",".join(urls), timeout_s=0.5, breaker=template)
    try:
        assert [b.name for b in client.breakers] == [f"triton {u}" for u in urls]
        with pytest.raises(RankerUnavailable, match="no server answered") as first:
            await client.encode(["x"])
        assert str(first.value).count("unavailable after") == 2  # two servers tried
        with pytest.raises(RankerUnavailable, match="no server answered"):
            await client.encode(["x"])
        # Round robin: six attempts, two on each server, so all three breakers are open.
        with pytest.raises(RankerUnavailable, match="no server answered"):
            await client.encode(["x"])
        with pytest.raises(RankerUnavailable, match="every server's circuit is open"):
            await client.encode(["x"])
        assert all(b.state is BreakerState.OPEN for b in client.breakers)
        assert template.state is BreakerState.CLOSED  # only the template of the three
    finally:
        await client.close()


async def test_readiness_of_several_servers_fails_only_when_none_answers() -> None:
    urls = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
    client = RankerClient(urls, timeout_s=0.5)
    try:
        with pytest.raises(RankerUnavailable, match="not ready after"):
            await client.wait_ready(timeout_s=0.5)
    finally:
        await client.close()


# --- `shoprec stack status` on a cluster -----------------------------------------------------

CLUSTER_NODES = "\n".join(
    [
        "a1 127.0.0.1:7001@17001 master - 0 0 1 connected 0-5460",
        "b2 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922",
        "c3 127.0.0.1:7003@17003 myself,master - 0 0 3 connected 10923-16383",
        "d4 127.0.0.1:7004@17004 slave a1 0 0 1 connected",
        "e5 127.0.0.1:7005@17005 slave b2 0 0 2 connected",
        "f6 127.0.0.1:7006@17006 slave c3 0 0 3 connected",
    ]
)


def test_status_text_shows_every_part_the_leaders_and_the_slots() -> None:
    parts = {
        role: {"kind": kind, "pid": 100 + i, "port": 7000 + i, "alive": True, "healthy": True}
        for i, (role, kind) in enumerate(
            [("broker-1", "kafka"), ("broker-2", "kafka"), ("broker-3", "kafka")]
            + [(f"redis-{i}", "redis") for i in range(1, 7)]
            + [("triton-1", "triton"), ("triton-2", "triton")]
        )
    }
    parts["triton-2"] |= {"alive": False, "healthy": False}
    meta = ClusterMetadata(
        brokers={1: "h:1", 2: "h:2", 3: "h:3"},
        controller=2,
        topics={
            "shop.views": [
                PartitionInfo(0, 1, (1, 2, 3), (1, 2, 3)),
                PartitionInfo(1, 2, (2, 3, 1), (2, 3)),
            ],
            "__consumer_offsets": [PartitionInfo(0, 3, (3, 1, 2), (3, 1, 2))],
        },
    )
    status: dict[str, dict[str, object]] = dict(parts)
    status["kafka-cluster"] = kafka_report_from(meta, ClusterShape())
    roles = {f"redis-{i}": 7000 + i for i in range(1, 7)}
    info = {"cluster_state": "ok", "cluster_slots_ok": "16384", "cluster_known_nodes": "6"}
    status["redis-cluster"] = redis_report_from(
        info, redis_cluster.parse_nodes(CLUSTER_NODES), roles, ClusterShape(), status
    )
    text = format_status(status)  # type: ignore[arg-type]
    lines = text.splitlines()
    assert any(line.startswith("triton-2") and "DOWN" in line for line in lines)
    assert any(line.startswith("redis-4") and "replica" in line for line in lines)
    assert "Kafka cluster: healthy" in text and "controller" not in text
    assert any("shop.views" in line and "0:broker-1 1:broker-2" in line for line in lines)
    assert "__consumer_offsets" not in text
    assert "under-replicated: shop.views [1]" in text
    assert "Redis Cluster: healthy" in text and "16384 of 16384 slots ok" in text
    assert any(
        line.strip().startswith("redis-1") and "0-5460" in line and "redis-4" in line
        for line in lines
    )
    assert format_status({}).startswith("no stack is running")


def test_a_cluster_url_may_name_several_nodes() -> None:
    """Every node named becomes a startup node, so a client started while the first is down
    still finds the cluster; auth, database and options stay on the first node's URL."""
    first, nodes = split_nodes("rediss://app:s3cret@h1:7000,h2:7001,[::1]:7002/0?ssl_ca_certs=ca")
    assert first == "rediss://app:s3cret@h1:7000/0?ssl_ca_certs=ca"
    assert nodes == [("h1", 7000), ("h2", 7001), ("::1", 7002)]
    assert split_nodes("redis://h") == ("redis://h", [("h", 6379)])
    client = open_redis("redis://127.0.0.1:7000,127.0.0.1:7001/0", cluster=True)
    startup = client.nodes_manager.startup_nodes  # type: ignore[attr-defined]
    assert set(startup) == {"127.0.0.1:7000", "127.0.0.1:7001"}
    with pytest.raises(ValueError, match="only for a cluster"):
        open_redis("redis://h1:7000,h2:7001/0")
