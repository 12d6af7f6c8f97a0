"""The cluster profile for real: three Kafka nodes, a Redis Cluster of six, two Tritons.

Brought up once on free loopback ports with the project's model repository,
checked part by part (replicas in sync, slots covered, models served by both
Tritons, only loopback listens), then brought down: no process, no shared
memory and, wiped, no data is left.
"""

# redis-py's cluster client (RedisCluster, its pipeline) has no type annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from features.connection import open_sync_redis
from infra import procs, redis_cluster
from infra.kafka import ClusterMetadata, describe_cluster
from infra.stack import DEFAULT_MODEL_REPO, Endpoints, Stack, component_of
from infra.triton import SHM_DIR, model_names
from shoprec.settings import Settings
from tests.integration.test_stack import processes_mentioning
from tests.stack import running, stack_settings

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


@dataclass
class Running:
    stack: Stack
    endpoints: Endpoints
    root: Path
    up_s: float


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("cluster-stack")
    stack = Stack(stack_settings(root / "stack"), model_repo=DEFAULT_MODEL_REPO)
    started = time.monotonic()
    endpoints = stack.up(timeout_s=400, cluster=True)
    try:
        yield Running(stack, endpoints, root, time.monotonic() - started)
    finally:
        stack.down(wipe=True)
        assert processes_mentioning(str(root)) == []


def settings_from_env_file(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in [k for k in Settings.model_fields]:
        monkeypatch.delenv(f"SHOPREC_{name.upper()}", raising=False)
    return Settings(_env_file=stack.env_path)


def metadata(bootstrap: str) -> ClusterMetadata:
    for hp in bootstrap.split(","):
        host, port = hp.rsplit(":", 1)
        meta = describe_cluster(host, int(port))
        if meta is not None:
            return meta
    raise AssertionError(f"no broker of {bootstrap} answers Metadata")


def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s} s"
        time.sleep(0.25)


def test_every_node_is_up_and_the_clusters_are_whole(cluster: Running) -> None:
    status = cluster.stack.status()
    nodes = {role: part for role, part in status.items() if "-cluster" not in role}
    assert sorted(nodes) == sorted(
        ["broker-1", "broker-2", "broker-3", "triton-1", "triton-2"]
        + [f"redis-{i}" for i in range(1, 7)]
    )
    for role, part in status.items():
        assert part["healthy"], (role, part)
    assert {part["kind"] for role, part in nodes.items() if component_of(role) == "broker"} == {
        "kafka"
    }

    kafka = status["kafka-cluster"]
    assert kafka["brokers"] == ["broker-1", "broker-2", "broker-3"]
    assert (kafka["replication_factor"], kafka["min_insync_replicas"]) == (3, 2)

    redis_part = status["redis-cluster"]
    assert redis_part["state"] == "ok" and redis_part["known_nodes"] == 6
    primaries = redis_part["primaries"]
    assert len(primaries) == 3
    assert all(len(p["replicas"]) == 1 for p in primaries.values())
    roles = [status[r]["cluster_role"] for r in nodes if component_of(r) == "redis"]
    assert sorted(roles) == ["primary"] * 3 + ["replica"] * 3
    covered = set()
    for p in primaries.values():
        for spec in p["slots"]:
            first, _, last = spec.partition("-")
            covered |= set(range(int(first), int(last or first) + 1))
    assert covered == set(range(16384))
    print(f"\ncluster up in {cluster.up_s:.1f} s")


def test_stack_env_points_at_every_node(cluster: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings_from_env_file(cluster.stack, monkeypatch)
    ep = cluster.endpoints
    assert s.kafka_bootstrap == ep.kafka_bootstrap
    assert len(s.kafka_bootstrap.split(",")) == 3
    assert s.kafka_replication_factor == 3
    assert s.redis_url.get_secret_value() == ep.redis_url
    assert s.redis_cluster is True
    assert len(s.triton_url.split(",")) == 2
    for endpoint in [*s.kafka_bootstrap.split(","), *s.triton_url.split(",")]:
        assert endpoint.startswith("127.0.0.1:")
    assert ep.redis_url.startswith("redis://127.0.0.1:")


def _listening_inodes() -> dict[int, str]:
    """Listening TCP sockets: inode -> local address (hex, as /proc/net/tcp* writes it)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                found[int(fields[9])] = fields[1].rsplit(":", 1)[0]
    return found


def test_everything_listens_on_loopback_only(cluster: Running) -> None:
    state = json.loads(cluster.stack.state_path.read_text())
    listening = _listening_inodes()
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, v4 in v6
    checked = 0
    for role, entry in state["components"].items():
        for pid in procs.group_members(entry["pid"]):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = fd.readlink().name
                except OSError:
                    continue
                if target.startswith("socket:["):
                    address = listening.get(int(target[8:-1]))
                    if address is not None:
                        assert address in loopback, (role, pid, address)
                        checked += 1
    # Kafka: client + controller ports; Redis: client + bus; Triton: HTTP, gRPC, metrics.
    assert checked >= 3 * 2 + 6 * 2 + 2 * 3


async def test_a_topic_has_three_in_sync_replicas_and_min_isr_two(cluster: Running) -> None:
    bootstrap = cluster.endpoints.kafka_bootstrap
    topic = f"cluster-rf3-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        created = await admin.create_topics([NewTopic(topic, 6, 3)])
        assert [err for _, err, *_ in created.topic_errors] == [0]
        # The broker that answers may not have applied the new topic's metadata yet
        # (CI saw an answer without entries): ask again until it knows the topic.
        configs: dict[str, str] = {}
        answer: Any = {}
        deadline = time.monotonic() + 30
        while "min.insync.replicas" not in configs and time.monotonic() < deadline:
            described = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic, None)]
            )
            answer = described[0].to_object()["resources"][0]
            configs = {e["config_names"]: e["config_value"] for e in answer["config_entries"]}
            if "min.insync.replicas" not in configs:
                await asyncio.sleep(0.5)
        assert configs.get("min.insync.replicas") == "2", answer
    finally:
        await admin.close()

    # acks=all is answered once the in-sync replicas have the record.
    value = uuid.uuid4().bytes
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(12):
            await producer.send_and_wait(topic, value, key=f"user-{i}".encode())
    finally:
        await producer.stop()
    group = f"cluster-{uuid.uuid4().hex[:8]}"
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        seen = 0
        deadline = time.monotonic() + 30
        while seen < 12 and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            seen += sum(len(msgs) for msgs in batches.values())
        assert seen == 12
        await consumer.commit()
    finally:
        await consumer.stop()

    def replicated(name: str, partitions: int | None = None) -> bool:
        parts = metadata(bootstrap).topics.get(name, [])
        if not parts or (partitions is not None and len(parts) != partitions):
            return False
        return all(len(p.replicas) == 3 and len(p.isr) == 3 and p.leader >= 0 for p in parts)

    wait_for(lambda: replicated(topic, 6), 30, f"{topic} fully in sync")
    # The offsets topic the group committed to is replicated the same way.
    wait_for(lambda: replicated("__consumer_offsets"), 30, "__consumer_offsets in sync")
    leaders = {p.leader for p in metadata(bootstrap).topics[topic]}
    assert leaders == {1, 2, 3}  # leadership spread over the three nodes

    report = cluster.stack.status()["kafka-cluster"]
    assert len(report["leaders"][topic]) == 6
    assert set(report["leaders"][topic]) == {"broker-1", "broker-2", "broker-3"}
    assert topic not in report["under_replicated"]


def test_redis_cluster_info_and_a_cluster_client(cluster: Running) -> None:
    state = json.loads(cluster.stack.state_path.read_text())
    ports = [e["ports"]["port"] for r, e in state["components"].items() if r.startswith("redis")]
    for port in ports:
        info = redis_cluster.parse_info(redis_cluster.command("127.0.0.1", port, "CLUSTER", "INFO"))
        assert info["cluster_state"] == "ok"
        assert info["cluster_known_nodes"] == "6"
        assert info["cluster_slots_assigned"] == info["cluster_slots_ok"] == "16384"
        assert info["cluster_size"] == "3"

    # shoprec's cluster client finds every node from SHOPREC_REDIS_URL alone, which names
    # all six (any of them would do).
    assert cluster.endpoints.redis_url.count(",") == 5
    client: Any = open_sync_redis(cluster.endpoints.redis_url, cluster=True)
    try:
        assert len(client.get_primaries()) == 3 and len(client.get_replicas()) == 3
        keys = [f"{{u:{i}}}:state" for i in range(50)]
        for key in keys:
            client.set(key, key)
        assert [client.get(k) for k in keys] == [k.encode() for k in keys]
        used = {client.keyslot(k) for k in keys}
        owners = {client.get_node_from_key(k).port for k in keys}
        assert len(used) > 3 and len(owners) == 3  # the keys spread over all primaries
        # One hash tag, one slot: a pipeline of one user's keys stays on one node.
        pipe = client.pipeline()
        # (redis-py refuses MGET in a cluster pipeline, whatever the slots.)
        pipe.set("{u:7}:a", 1).set("{u:7}:b", 2).get("{u:7}:a").get("{u:7}:b")
        assert pipe.execute()[-2:] == [b"1", b"2"]
        assert client.mget("{u:7}:a", "{u:7}:b") == [b"1", b"2"]
        primary_port = client.get_node_from_key("{u:7}:a").port
    finally:
        client.close()
    # The primary's replica has the writes (WAIT counts the replicas that acknowledged).
    node = redis.Redis(host="127.0.0.1", port=primary_port)
    try:
        assert node.execute_command("WAIT", 1, 5000) == 1
    finally:
        node.close()


def _infer_text(http: str, text: str) -> list[float]:
    body = {"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]}
    req = urllib.request.Request(
        f"http://{http}/v2/models/item_encoder/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        out = json.loads(resp.read())
    return [float(v) for v in out["outputs"][0]["data"]]


def test_both_tritons_serve_every_model_apart(cluster: Running) -> None:
    https = cluster.endpoints.triton_http.split(",")
    assert len(https) == 2 and len(set(https)) == 2
    for http in https:
        with urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=5) as resp:
            assert resp.status == 200
        for name in model_names(DEFAULT_MODEL_REPO):
            with urllib.request.urlopen(f"http://{http}/v2/models/{name}/ready", timeout=5) as r:
                assert r.status == 200
    one, two = (_infer_text(http, "red running shoes") for http in https)
    assert len(one) == 384 and one == pytest.approx(two, abs=1e-5)
    for metrics in cluster.endpoints.triton_metrics.split(","):
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as resp:
            assert b"nv_inference_request_success" in resp.read()

    # Each server's python stubs use shared memory under a prefix of its own.
    status = cluster.stack.status()
    prefixes = set()
    for role in ("triton-1", "triton-2"):
        service = cluster.stack._service(role, json.loads(cluster.stack.state_path.read_text()))
        prefix = getattr(service, "shm_prefix", None)
        assert prefix and list(SHM_DIR.glob(f"{prefix}*")), role
        prefixes.add(prefix)
        assert status[role]["healthy"]
    assert len(prefixes) == 2


def test_a_broker_and_a_replica_restart_and_rejoin(cluster: Running) -> None:
    stack = cluster.stack
    stack.stop_component("broker-2")
    report = stack.status()
    assert report["broker-2"]["alive"] is False
    wait_for(
        lambda: stack.status()["kafka-cluster"]["brokers"] == ["broker-1", "broker-3"],
        30,
        "broker-2 gone from the metadata",
    )
    stack.start_component("broker-2", timeout_s=120)
    wait_for(lambda: stack.status()["kafka-cluster"]["healthy"], 60, "Kafka whole again")

    replica = next(r for r, p in stack.status().items() if p.get("cluster_role") == "replica")
    stack.stop_component(replica)
    stack.start_component(replica, timeout_s=30)
    # nodes.conf was kept: the node rejoins as the same replica, nothing to re-create.
    state = json.loads(stack.state_path.read_text())
    ports = [e["ports"]["port"] for r, e in state["components"].items() if r.startswith("redis")]
    wait_for(lambda: redis_cluster.ready(ports, 3), 60, f"{replica} rejoined")
    assert stack.status()[replica]["cluster_role"] == "replica"


def test_down_leaves_nothing_behind(cluster: Running) -> None:
    stack = cluster.stack
    state = json.loads(stack.state_path.read_text())
    recorded = [procs.Proc.from_json(role, e) for role, e in state["components"].items()]
    group_pids = [pid for proc in recorded for pid in procs.group_members(proc.pid)]
    prefixes = [
        getattr(stack._service(role, state), "shm_prefix", None)
        for role in state["components"]
        if role.startswith("triton")
    ]
    started = time.monotonic()
    stack.down(wipe=True)
    print(f"\ncluster down in {time.monotonic() - started:.1f} s")
    for proc in recorded:
        assert not procs.is_alive(proc), proc
        assert procs.group_members(proc.pid) == []
    assert [pid for pid in group_pids if running(pid)] == []
    assert processes_mentioning(str(cluster.root)) == []
    assert all(prefix and not list(SHM_DIR.glob(f"{prefix}*")) for prefix in prefixes)
    assert not stack.state_path.exists() and not stack.env_path.exists()
    assert not (stack.stack_dir / "cluster").exists()
    assert stack.status() == {}
