"""The cluster profile without services: configs, ports, roles, parsers of what clusters say."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import procs, redis_cluster, triton
from infra.kafka import (
    ClusterMetadata,
    KafkaBroker,
    PartitionInfo,
    describe_cluster,
    metadata_request,
    parse_metadata,
    server_properties,
    shared_cluster_id,
)
from infra.redis_server import RedisServer, redis_conf
from infra.stack import (
    ClusterShape,
    Endpoints,
    Stack,
    build_services,
    component_of,
    format_env_file,
    kafka_report_from,
    member_roles,
    redis_report_from,
)
from infra.triton import TritonServer, shm_prefix_for, triton_env
from shoprec.errors import StackError
from shoprec.settings import Settings
from tests.kafka_answer import answering_once


def props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")


def settings(stack_dir: Path, **overrides: object) -> Settings:
    return Settings(stack_dir=stack_dir, _env_file=None, **overrides)  # type: ignore[arg-type]


# --- the shape ------------------------------------------------------------------------


def test_default_shape_is_three_kafka_six_redis_two_tritons() -> None:
    shape = ClusterShape()
    assert member_roles("broker", shape) == ["broker-1", "broker-2", "broker-3"]
    assert member_roles("redis", shape) == [f"redis-{i}" for i in range(1, 7)]
    assert member_roles("triton", shape) == ["triton-1", "triton-2"]
    assert (shape.replication_factor, shape.min_insync) == (3, 2)
    assert member_roles("broker", None) == ["broker"]
    assert component_of("redis-4") == "redis" and component_of("triton") == "triton"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kafka_nodes": 2}, "replication_factor <= kafka_nodes"),
        ({"min_insync": 3}, "min_insync < replication_factor"),
        ({"min_insync": 0}, "1 <= min_insync"),
        ({"redis_primaries": 2}, "at least 3 primaries"),
        ({"tritons": 0}, "at least one Triton"),
    ],
)
def test_a_shape_that_cannot_survive_a_failure_is_refused(
    fields: dict[str, int], message: str
) -> None:
    with pytest.raises(StackError, match=message):
        ClusterShape(**fields)  # type: ignore[arg-type]


# --- Kafka ----------------------------------------------------------------------------


def test_cluster_node_properties_name_every_voter_and_replicate(tmp_path: Path) -> None:
    p = props(
        server_properties(
            port=19093,
            controller_port=29093,
            data_dir=tmp_path / "data",
            partitions=4,
            node_id=2,
            voters=((1, 29092), (2, 29093), (3, 29094)),
            replication_factor=3,
            min_insync=2,
        )
    )
    assert p["node.id"] == "2"
    assert p["process.roles"] == "broker,controller"
    assert p["listeners"] == "PLAINTEXT://127.0.0.1:19093,CONTROLLER://127.0.0.1:29093"
    assert p["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19093"
    assert p["controller.quorum.voters"] == (
        "1@127.0.0.1:29092,2@127.0.0.1:29093,3@127.0.0.1:29094"
    )
    assert "controller.quorum.bootstrap.servers" not in p  # static quorum: nothing to bootstrap
    assert p["default.replication.factor"] == "3"
    assert p["min.insync.replicas"] == "2"
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "share.coordinator.state.topic.replication.factor",
    ):
        assert p[key] == "3", key
    assert p["transaction.state.log.min.isr"] == "2"
    assert p["share.coordinator.state.topic.min.isr"] == "2"


def test_single_node_properties_keep_one_replica(tmp_path: Path) -> None:
    p = props(server_properties(port=1, controller_port=2, data_dir=tmp_path, partitions=4))
    assert p["node.id"] == "1"
    assert p["controller.quorum.bootstrap.servers"] == "127.0.0.1:2"
    assert "controller.quorum.voters" not in p
    assert p["default.replication.factor"] == p["min.insync.replicas"] == "1"
    assert p["offsets.topic.replication.factor"] == "1"


def test_the_cluster_id_is_made_once_and_shared(tmp_path: Path) -> None:
    path = tmp_path / "cluster" / "kafka.cluster-id"
    first = shared_cluster_id(path)
    assert len(first) == 22
    assert shared_cluster_id(path) == first
    path.write_text("")
    assert shared_cluster_id(path) != first  # an empty file is made anew, never used


def test_metadata_request_asks_for_no_topics_or_for_all() -> None:
    for all_topics, count in ((False, 0), (True, -1)):
        raw = metadata_request(all_topics=all_topics)
        (size,) = struct.unpack(">i", raw[:4])
        assert size == len(raw) - 4
        assert struct.unpack(">hh", raw[4:8]) == (3, 4)  # Metadata v4
        assert struct.unpack(">ib", raw[-5:]) == (count, 0)  # topics, no auto-creation


def _string(text: str | None) -> bytes:
    if text is None:
        return struct.pack(">h", -1)
    return struct.pack(">h", len(text)) + text.encode()


def _int32s(values: list[int]) -> bytes:
    return struct.pack(">i", len(values)) + b"".join(struct.pack(">i", v) for v in values)


def metadata_v4_body(
    brokers: dict[int, int], controller: int, topics: dict[str, list[tuple[int, int, list[int]]]]
) -> bytes:
    """A Metadata v4 response after the correlation id; partitions as (index, leader, isr),
    every partition replicated on all brokers."""
    body = struct.pack(">i", 0) + struct.pack(">i", len(brokers))
    for node_id, port in brokers.items():
        body += struct.pack(">i", node_id) + _string("127.0.0.1") + struct.pack(">i", port)
        body += _string(None)
    body += _string("cid") + struct.pack(">i", controller) + struct.pack(">i", len(topics))
    for name, parts in topics.items():
        body += struct.pack(">h", 0) + _string(name) + struct.pack(">b", name.startswith("__"))
        body += struct.pack(">i", len(parts))
        for index, leader, isr in parts:
            body += struct.pack(">hii", 0, index, leader) + _int32s(sorted(brokers)) + _int32s(isr)
    return body


def test_parse_metadata_reads_brokers_controller_and_partitions() -> None:
    body = metadata_v4_body(
        {1: 9092, 2: 9093, 3: 9094},
        controller=2,
        topics={"shop.clicks": [(1, 3, [3, 1]), (0, 1, [1, 2, 3])], "__consumer_offsets": []},
    )
    meta = parse_metadata(body)
    assert meta.brokers == {1: "127.0.0.1:9092", 2: "127.0.0.1:9093", 3: "127.0.0.1:9094"}
    assert meta.controller == 2
    assert meta.topics["shop.clicks"] == [
        PartitionInfo(0, 1, (1, 2, 3), (1, 2, 3)),
        PartitionInfo(1, 3, (1, 2, 3), (3, 1)),
    ]
    assert meta.topics["__consumer_offsets"] == []
    with pytest.raises(struct.error):
        parse_metadata(body[:-3])


@pytest.fixture
def fake_kafka() -> Iterator[tuple[int, list[bytes]]]:
    """A socket answering one Metadata request with a three-broker cluster."""
    with answering_once(metadata_v4_body({1: 1, 2: 2, 3: 3}, 1, {"t": [(0, 2, [2, 3, 1])]})) as s:
        yield s


def test_describe_cluster_asks_a_broker(fake_kafka: tuple[int, list[bytes]]) -> None:
    port, seen = fake_kafka
    meta = describe_cluster("127.0.0.1", port)
    assert meta is not None
    assert sorted(meta.brokers) == [1, 2, 3]
    assert meta.topics["t"] == [PartitionInfo(0, 2, (1, 2, 3), (2, 3, 1))]
    assert struct.unpack(">i", seen[0][-5:-1]) == (-1,)  # every topic
    assert describe_cluster("127.0.0.1", procs.free_port(), timeout=0.2) is None


def test_kafka_report_names_leaders_by_role_and_flags_missing_replicas() -> None:
    meta = ClusterMetadata(
        brokers={1: "h:1", 3: "h:3"},
        controller=3,
        topics={
            "shop.clicks": [
                PartitionInfo(0, 1, (1, 2, 3), (1, 3)),
                PartitionInfo(1, 3, (3, 1, 2), (3, 1)),
            ],
            "recs.out": [PartitionInfo(0, 3, (3, 1, 2), (3, 1, 2))],
        },
    )
    report = kafka_report_from(meta, ClusterShape())
    assert report["healthy"] is False  # broker 2 is not registered
    assert report["brokers"] == ["broker-1", "broker-3"]
    assert "controller" not in report  # KRaft names a random broker to clients
    assert report["leaders"] == {
        "recs.out": ["broker-3"],
        "shop.clicks": ["broker-1", "broker-3"],
    }
    assert report["under_replicated"] == {"shop.clicks": [0, 1]}

    offline = ClusterMetadata(
        brokers={1: "h:1", 2: "h:2", 3: "h:3"},
        controller=1,
        topics={"t": [PartitionInfo(0, -1, (2,), ())]},
    )
    report = kafka_report_from(offline, ClusterShape())
    assert report["leaders"] == {"t": [None]}
    assert report["healthy"] is False  # a partition without a leader


def test_kafka_node_formats_with_the_shared_cluster_id_and_no_standalone(tmp_path: Path) -> None:
    services = build_services(
        settings(tmp_path),
        stack_dir=tmp_path,
        model_repo=tmp_path,
        broker="kafka",
        ports={
            "broker-1": {"port": 11, "controller": 21},
            "broker-2": {"port": 12, "controller": 22},
            "broker-3": {"port": 13, "controller": 23},
        },
        cluster=ClusterShape(),
    )
    nodes = [services[f"broker-{i}"] for i in (1, 2, 3)]
    assert all(isinstance(n, KafkaBroker) for n in nodes)
    brokers = [n for n in nodes if isinstance(n, KafkaBroker)]
    assert [b.node_id for b in brokers] == [1, 2, 3]
    assert {b.voters for b in brokers} == {((1, 21), (2, 22), (3, 23))}
    assert {b.cluster_id_file for b in brokers} == {tmp_path / "cluster" / "kafka.cluster-id"}
    assert len({b.workdir for b in brokers}) == 3
    assert {b.heap for b in brokers} == {"384m"}
    assert brokers[1].ports() == {"port": 12, "controller": 22}


# --- Redis ----------------------------------------------------------------------------


def test_redis_cluster_node_conf(tmp_path: Path) -> None:
    conf = redis_conf(port=7001, data_dir=tmp_path, cluster_bus_port=17001).splitlines()
    assert "bind 127.0.0.1" in conf
    assert "cluster-enabled yes" in conf
    assert "cluster-config-file nodes.conf" in conf
    assert "cluster-port 17001" in conf
    assert any(line.startswith("cluster-node-timeout ") for line in conf)
    assert 'save ""' in conf and "appendonly no" in conf
    plain = redis_conf(port=7001, data_dir=tmp_path).splitlines()
    assert not [line for line in plain if line.startswith(("cluster", "repl-"))]


def test_a_new_cluster_forgets_the_old_one(tmp_path: Path) -> None:
    node = RedisServer(workdir=tmp_path, port=1, cluster_bus_port=2)
    assert node.ports() == {"port": 1, "bus": 2}
    assert RedisServer(workdir=tmp_path, port=1).ports() == {"port": 1}
    node.cluster_config_path.write_text("old cluster\n")
    node.forget_cluster()
    assert not node.cluster_config_path.exists()
    node.forget_cluster()  # nothing to forget: fine


CLUSTER_NODES = """\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002 master - 0 1700000000000 2 connected 5461-10922 [5461->-c3]
c3 127.0.0.1:7003@17003,host3 master,fail - 0 1700000000000 3 connected 10923-16383
d4 127.0.0.1:7004@17004 slave a1 0 1700000000000 1 connected
e5 127.0.0.1:7005@17005 slave b2 0 1700000000000 2 connected
f6 127.0.0.1:7006@17006 slave,fail? c3 0 1700000000000 3 connected 42
"""


def test_parse_cluster_nodes() -> None:
    nodes = {n.node_id: n for n in redis_cluster.parse_nodes(CLUSTER_NODES)}
    assert nodes["a1"].primary and nodes["a1"].slot_ranges == ["0-5460"]
    assert nodes["a1"].slot_count == 5461
    assert nodes["b2"].slots == ((5461, 10922),)  # the migrating slot is left out
    assert nodes["c3"].failed and nodes["c3"].port == 7003
    assert not nodes["d4"].primary and nodes["d4"].primary_id == "a1"
    assert nodes["f6"].failed and nodes["f6"].slot_ranges == ["42"]
    assert not nodes["e5"].failed and nodes["e5"].slots == ()


def test_parse_info_skips_headers() -> None:
    text = "# Replication\r\nrole:slave\r\nmaster_link_status:up\r\n\r\n"
    assert redis_cluster.parse_info(text) == {"role": "slave", "master_link_status": "up"}


def test_redis_report_names_primaries_slots_and_replicas_by_role() -> None:
    seen = redis_cluster.parse_nodes(CLUSTER_NODES)
    roles = {f"redis-{i}": 7000 + i for i in range(1, 7)}
    report: dict[str, dict[str, object]] = {role: {} for role in roles}
    info = {"cluster_state": "fail", "cluster_slots_ok": "10923", "cluster_known_nodes": "6"}
    summary = redis_report_from(info, seen, roles, ClusterShape(), report)
    assert summary["healthy"] is False and summary["state"] == "fail"
    assert summary["primaries"] == {
        "redis-1": {"slots": ["0-5460"], "replicas": ["redis-4"]},
        "redis-2": {"slots": ["5461-10922"], "replicas": ["redis-5"]},
        "redis-3": {"slots": ["10923-16383"], "replicas": ["redis-6"]},
    }
    assert report["redis-4"]["cluster_role"] == "replica"
    assert report["redis-3"]["cluster_role"] == "primary" and report["redis-3"]["cluster_failed"]


@pytest.fixture
def fake_redis() -> Iterator[int]:
    """Answers each connection's command: CLUSTER INFO (bulk), PING (simple), else an error."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                request = conn.recv(4096)
                if b"CLUSTER" in request:
                    body = b"cluster_state:ok\r\ncluster_known_nodes:6\r\n"
                    conn.sendall(b"$%d\r\n%s\r\n" % (len(body), body))
                elif b"PING" in request:
                    conn.sendall(b"+PONG\r\n")
                else:
                    conn.sendall(b"-ERR unknown command\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    server.close()
    thread.join(timeout=2)


def test_redis_command_reads_bulk_simple_and_error_replies(fake_redis: int) -> None:
    info = redis_cluster.parse_info(
        redis_cluster.command("127.0.0.1", fake_redis, "CLUSTER", "INFO")
    )
    assert info == {"cluster_state": "ok", "cluster_known_nodes": "6"}
    assert redis_cluster.command("127.0.0.1", fake_redis, "PING") == "PONG"
    with pytest.raises(StackError, match="unknown command"):
        redis_cluster.command("127.0.0.1", fake_redis, "NOPE")
    with pytest.raises(OSError):
        redis_cluster.command("127.0.0.1", procs.free_port(), "PING", timeout=0.2)
    assert redis_cluster.cluster_info([procs.free_port(), fake_redis]) == info
    assert redis_cluster.cluster_info([procs.free_port()]) is None


# --- Triton ---------------------------------------------------------------------------


def test_each_cluster_triton_has_its_own_shm_prefix_and_ports(tmp_path: Path) -> None:
    ports = {
        **{f"redis-{i}": {"port": 7000 + i, "bus": 17000 + i} for i in range(1, 7)},
        "triton-1": {"port": 8001, "http": 8000, "metrics": 8002},
        "triton-2": {"port": 8004, "http": 8003, "metrics": 8005},
    }
    services = build_services(
        settings(tmp_path),
        stack_dir=tmp_path,
        model_repo=tmp_path / "repo",
        broker="kafka",
        ports=ports,
        cluster=ClusterShape(),
    )
    one, two = services["triton-1"], services["triton-2"]
    assert isinstance(one, TritonServer) and isinstance(two, TritonServer)
    assert one.shm_prefix and two.shm_prefix and one.shm_prefix != two.shm_prefix
    assert one.shm_prefix == shm_prefix_for(tmp_path / "cluster" / "triton-1")
    assert one.model_repo == two.model_repo == tmp_path / "repo"
    assert (two.grpc_port, two.http_port, two.metrics_port) == (8004, 8003, 8005)
    # Both name every node of the cluster's Redis, so either finds it with one node down.
    nodes = ",".join(f"127.0.0.1:{7000 + i}" for i in range(1, 7))
    assert one.redis_url == two.redis_url == f"redis://{nodes}/0"
    assert one.redis_cluster and two.redis_cluster
    flag = f"--backend-config=python,shm-region-prefix-name={one.shm_prefix}"
    assert flag in one.argv(tmp_path / "ts")
    single = TritonServer(tmp_path, tmp_path, 1, 2, 3, "redis://x")
    assert not any(a.startswith("--backend-config") for a in single.argv(tmp_path / "ts"))


def test_shm_prefix_is_stable_and_short(tmp_path: Path) -> None:
    assert shm_prefix_for(tmp_path / "a") == shm_prefix_for(tmp_path / "a")
    assert shm_prefix_for(tmp_path / "a") != shm_prefix_for(tmp_path / "b")
    assert len(shm_prefix_for(tmp_path / ("x" * 200))) < 32


def test_triton_env_says_redis_is_a_cluster() -> None:
    def env(cluster: bool) -> dict[str, str]:
        return triton_env(
            {},
            redis_url="redis://127.0.0.1:1/0",
            venv_bin=Path("/v"),
            libpython_dir=Path("/l"),
            wheel_libs=Path("/w"),
            redis_cluster=cluster,
        )

    assert env(True)["SHOPREC_REDIS_CLUSTER"] == "true"
    assert "SHOPREC_REDIS_CLUSTER" not in env(False)


def test_a_dead_servers_regions_are_found_by_its_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(triton, "SHM_DIR", tmp_path)
    server = TritonServer(tmp_path / "w", tmp_path, 1, 2, 3, "r", shm_prefix="shoprec_abc_")
    ours = tmp_path / "shoprec_abc_1234"
    ours.write_bytes(b"")
    (tmp_path / "shoprec_abd_5678").write_bytes(b"")  # another server's
    (tmp_path / "triton_python_backend_shm_region_9").write_bytes(b"")
    gone = procs.Proc("triton", procs.free_port(), None, tmp_path / "t.log")
    assert server.shm_regions(gone) == [ours]


# --- the stack's ports, files and refusals -------------------------------------------


def test_cluster_ports_are_free_and_distinct(tmp_path: Path) -> None:
    stack = Stack(
        settings(
            tmp_path,
            kafka_port=0,
            redis_port=0,
            triton_http_port=0,
            triton_grpc_port=0,
            triton_metrics_port=0,
        )
    )
    ports = stack._resolve_ports(["broker", "redis", "triton"], ClusterShape())
    assert sorted(ports) == sorted(
        [f"broker-{i}" for i in (1, 2, 3)]
        + [f"redis-{i}" for i in range(1, 7)]
        + ["triton-1", "triton-2"]
    )
    assert set(ports["broker-1"]) == {"port", "controller"}
    assert set(ports["redis-1"]) == {"port", "bus"}
    assert set(ports["triton-2"]) == {"port", "http", "metrics"}
    every = [port for keys in ports.values() for port in keys.values()]
    assert len(every) == len(set(every)) == 3 * 2 + 6 * 2 + 2 * 3


def test_fixed_cluster_ports_count_up_from_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(procs, "port_open", lambda host, port, timeout=0.5: False)
    stack = Stack(settings(tmp_path))  # the default ports: 9092, 6379, 8000-8002
    ports = stack._resolve_ports(["broker", "redis", "triton"], ClusterShape())
    assert [ports[f"broker-{i}"]["port"] for i in (1, 2, 3)] == [9092, 9093, 9094]
    assert [ports[f"redis-{i}"]["port"] for i in range(1, 7)] == list(range(6379, 6385))
    assert ports["triton-1"] == {"http": 8000, "port": 8001, "metrics": 8002}
    assert ports["triton-2"] == {"http": 8003, "port": 8004, "metrics": 8005}
    with pytest.raises(StackError, match="redis-2 would need port 65536"):
        Stack(settings(tmp_path, redis_port=65535))._resolve_ports(["redis"], ClusterShape())


def test_the_cluster_refuses_tansu_before_starting_anything(tmp_path: Path) -> None:
    stack = Stack(settings(tmp_path / "s", broker="tansu"))
    with pytest.raises(StackError, match="cluster profile runs Apache Kafka"):
        stack.up(components=("broker",), cluster=True)
    assert not (tmp_path / "s").exists()


CLUSTER_ENDPOINTS = Endpoints(
    broker="kafka",
    kafka_bootstrap="127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094",
    redis_url="redis://127.0.0.1:16379/0",
    triton_url="127.0.0.1:18001,127.0.0.1:18004",
    triton_http="127.0.0.1:18000,127.0.0.1:18003",
    triton_metrics="127.0.0.1:18002,127.0.0.1:18005",
    redis_cluster=True,
    kafka_replication_factor=3,
)


def test_cluster_stack_env_lines() -> None:
    assert format_env_file(CLUSTER_ENDPOINTS).splitlines()[1:] == [
        "SHOPREC_KAFKA_BOOTSTRAP=127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094",
        "SHOPREC_KAFKA_REPLICATION_FACTOR=3",
        "SHOPREC_REDIS_URL=redis://127.0.0.1:16379/0",
        "SHOPREC_REDIS_CLUSTER=true",
        "SHOPREC_TRITON_URL=127.0.0.1:18001,127.0.0.1:18004",
    ]


def test_settings_read_a_cluster_stack_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("SHOPREC_")]:
        monkeypatch.delenv(name)
    env_file = tmp_path / "stack.env"
    env_file.write_text(format_env_file(CLUSTER_ENDPOINTS))
    s = Settings(_env_file=env_file)
    assert s.kafka_bootstrap.split(",") == [
        "127.0.0.1:19092",
        "127.0.0.1:19093",
        "127.0.0.1:19094",
    ]
    assert s.faust_broker.count("kafka://") == 3
    assert s.kafka_replication_factor == 3
    assert s.redis_cluster is True
    assert s.triton_url == "127.0.0.1:18001,127.0.0.1:18004"
    assert Settings(_env_file=None).redis_cluster is False
