"""Apache Kafka nodes (KRaft, broker and controller in one JVM): one alone, or a cluster.

The broker is the set of jars Maven Central holds for ``kafka_2.13``
(``infra/kafka/pom.xml``), resolved once into ``infra/kafka/jars/`` and
shared by every stack directory.  The data directory lives under the stack
directory and is formatted only once, so topics survive a broker restart.

A cluster is several such combined nodes that are all voters of one static
controller quorum (``controller.quorum.voters``) and share one cluster id.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import logging
import os
import shutil
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from infra import procs
from shoprec.errors import StackError

log = logging.getLogger("shoprec.infra")

KAFKA_DIR = Path(__file__).resolve().parent / "kafka"
POM = KAFKA_DIR / "pom.xml"
LOG4J2_CONFIG = KAFKA_DIR / "log4j2.yaml"
JARS_DIR = KAFKA_DIR / "jars"
_COMPLETE_MARKER = ".complete"

# What kafka-run-class.sh passes to the broker JVM.
_JVM_OPTS = [
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]


def ensure_jars(jars_dir: Path = JARS_DIR, pom: Path = POM) -> Path:
    """Resolve the broker's classpath into ``jars_dir`` unless already there.

    A marker holding the pom's hash is written after a complete copy, so an
    interrupted copy, or a changed pom (a Kafka upgrade), resolves again.
    """
    jars_dir.mkdir(parents=True, exist_ok=True)
    marker = jars_dir / _COMPLETE_MARKER
    wanted = hashlib.sha256(pom.read_bytes()).hexdigest()
    # Two stacks starting at once (parallel tests) must not copy into one folder together.
    with open(jars_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text().strip() == wanted:
            return jars_dir
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError("Apache Kafka's jars are missing and Maven (mvn) is not installed")
        marker.unlink(missing_ok=True)
        for old in jars_dir.glob("*.jar"):
            old.unlink()
        log.info("resolving Apache Kafka jars from Maven Central into %s", jars_dir)
        started = time.monotonic()
        argv = [
            mvn,
            "-q",
            "-B",
            "dependency:copy-dependencies",
            f"-DoutputDirectory={jars_dir}",
            "-DincludeScope=runtime",
            "-f",
            str(pom),
        ]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise StackError(f"mvn could not resolve Apache Kafka's jars:\n{output}")
        marker.write_text(wanted + "\n")
        log.info("Kafka jars resolved in %.1f s", time.monotonic() - started)
    return jars_dir


def java_binary() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise StackError("Apache Kafka needs Java 17 or newer, and `java` is not on PATH")
    return java


def random_cluster_id() -> str:
    """A cluster id as ``kafka-storage random-uuid`` makes one, without starting a JVM."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        # Kafka's Uuid.randomUuid rejects ids starting with '-' (they read as CLI flags).
        if not cid.startswith("-"):
            return cid


def server_properties(
    *,
    port: int,
    controller_port: int,
    data_dir: Path,
    partitions: int,
    node_id: int = 1,
    voters: Sequence[tuple[int, int]] = (),
    replication_factor: int = 1,
    min_insync: int = 1,
) -> str:
    """A node's ``server.properties``: a combined broker and controller on loopback.

    ``voters`` lists (node id, controller port) of every node of a cluster;
    empty, the node is alone and its quorum is bootstrapped (``--standalone``).
    ``replication_factor`` and ``min_insync`` are the defaults of every topic,
    the internal ones included.
    """
    host = procs.LOOPBACK
    if voters:
        # Static voters: the quorum is the configured set, nothing to bootstrap.
        quorum = "controller.quorum.voters=" + ",".join(
            f"{vid}@{host}:{vport}" for vid, vport in voters
        )
    else:
        quorum = f"controller.quorum.bootstrap.servers={host}:{controller_port}"
    lines = [
        "process.roles=broker,controller",
        f"node.id={node_id}",
        f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        f"advertised.listeners=PLAINTEXT://{host}:{port}",
        "controller.listener.names=CONTROLLER",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        quorum,
        f"log.dirs={data_dir}",
        # Internal topics get as many replicas as the cluster's topics (one
        # node: one, since a topic cannot have more replicas than brokers).
        f"default.replication.factor={replication_factor}",
        f"min.insync.replicas={min_insync}",
        f"offsets.topic.replication.factor={replication_factor}",
        f"transaction.state.log.replication.factor={replication_factor}",
        f"transaction.state.log.min.isr={min_insync}",
        f"share.coordinator.state.topic.replication.factor={replication_factor}",
        f"share.coordinator.state.topic.min.isr={min_insync}",
        # Tests and the demo join consumer groups often; the default waits 3 s.
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=true",
        f"num.partitions={partitions}",
    ]
    return "\n".join(lines) + "\n"


def shared_cluster_id(path: Path) -> str:
    """The cluster id kept in ``path``, made on first use: every node is formatted with it."""
    try:
        cid = path.read_text().strip()
    except FileNotFoundError:
        cid = ""
    if not cid:
        path.parent.mkdir(parents=True, exist_ok=True)
        cid = random_cluster_id()
        path.write_text(cid + "\n")
    return cid


_METADATA_CORRELATION_ID = 0x5EC


def metadata_request(*, all_topics: bool) -> bytes:
    """A Metadata v4 request, size prefix included.

    Version 4 is the oldest one Kafka 4 still serves, and Tansu serves it too.
    Header v1: api_key=3 (Metadata), api_version=4, correlation id, client id;
    body: the topics (an empty array: none, just brokers; null: every topic),
    no auto-creation.
    """
    client_id = b"shoprec-infra"
    body = struct.pack(">hhih", 3, 4, _METADATA_CORRELATION_ID, len(client_id)) + client_id
    body += struct.pack(">ib", -1 if all_topics else 0, 0)
    return struct.pack(">i", len(body)) + body


def _metadata_payload(host: str, port: int, *, all_topics: bool, timeout: float) -> bytes | None:
    """The Metadata response after its correlation id, or None when nothing sensible answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(metadata_request(all_topics=all_topics))
            head = _recv_exact(sock, 4)
            if head is None:
                return None
            (size,) = struct.unpack(">i", head)
            if size < 12 or size > 64 << 20:
                return None
            payload = _recv_exact(sock, size)
    except OSError:
        return None
    if payload is None or struct.unpack(">i", payload[:4])[0] != _METADATA_CORRELATION_ID:
        return None
    return payload[4:]


def metadata_broker_count(host: str, port: int, timeout: float = 1.0) -> int | None:
    """Brokers listed by a Metadata (v4) request, or None when nothing sensible answers.

    A broker answers Metadata with itself only once it is registered and
    unfenced, so this says "ready for clients" where an open port does not.
    """
    payload = _metadata_payload(host, port, all_topics=False, timeout=timeout)
    if payload is None:
        return None
    _throttle_ms, brokers = struct.unpack(">ii", payload[:8])
    return int(brokers)


@dataclass(frozen=True)
class PartitionInfo:
    """One partition as the cluster's metadata has it (node ids; leader -1: none)."""

    partition: int
    leader: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


@dataclass(frozen=True)
class ClusterMetadata:
    """What a Metadata (v4) answer says: live brokers, the active controller, every topic."""

    brokers: dict[int, str]  # node id -> host:port
    controller: int
    topics: dict[str, list[PartitionInfo]]  # by partition number


class _Reader:
    """Reads the big-endian fields of a Kafka response, in order."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> tuple[int, ...]:
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return tuple(int(v) for v in values)

    def int32(self) -> int:
        return self.take(">i")[0]

    def string(self) -> str | None:
        (size,) = self.take(">h")
        if size < 0:
            return None
        raw = self.data[self.pos : self.pos + size]
        if len(raw) != size:
            raise struct.error("string runs past the end of the response")
        self.pos += size
        return raw.decode()

    def int32_array(self) -> tuple[int, ...]:
        return tuple(self.int32() for _ in range(self.int32()))


def parse_metadata(payload: bytes) -> ClusterMetadata:
    """A Metadata v4 response body (after the correlation id); struct.error if truncated."""
    r = _Reader(payload)
    r.int32()  # throttle time
    brokers = {}
    for _ in range(r.int32()):
        node_id = r.int32()
        host = r.string()
        port = r.int32()
        r.string()  # rack
        brokers[node_id] = f"{host}:{port}"
    r.string()  # cluster id
    controller = r.int32()
    topics: dict[str, list[PartitionInfo]] = {}
    for _ in range(r.int32()):
        r.take(">h")  # error code
        name = r.string() or ""
        r.take(">b")  # is internal
        partitions = []
        for _ in range(r.int32()):
            r.take(">h")  # error code
            index, leader = r.take(">ii")
            partitions.append(PartitionInfo(index, leader, r.int32_array(), r.int32_array()))
        topics[name] = sorted(partitions, key=lambda p: p.partition)
    return ClusterMetadata(brokers=brokers, controller=controller, topics=topics)


def describe_cluster(host: str, port: int, timeout: float = 2.0) -> ClusterMetadata | None:
    """Brokers, controller and every topic's partitions, or None when nothing sensible answers."""
    payload = _metadata_payload(host, port, all_topics=True, timeout=timeout)
    if payload is None:
        return None
    try:
        return parse_metadata(payload)
    except (struct.error, UnicodeDecodeError):
        return None


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def broker_ready(host: str, port: int) -> bool:
    count = metadata_broker_count(host, port)
    return count is not None and count > 0


@dataclass(frozen=True)
class KafkaBroker:
    """Apache Kafka in ``workdir``: server.properties, data/ and kafka.log.

    Alone by default.  As a node of a cluster it has its ``node_id``, the
    quorum's ``voters`` and ``cluster_id_file``, the cluster id every node is
    formatted with.
    """

    workdir: Path
    port: int
    controller_port: int
    heap: str = "512m"
    partitions: int = 4
    jars_dir: Path = JARS_DIR
    node_id: int = 1
    voters: tuple[tuple[int, int], ...] = ()
    cluster_id_file: Path | None = None
    replication_factor: int = 1
    min_insync: int = 1

    kind = "kafka"
    # A controlled shutdown takes about 2 s; give it room before SIGKILL.
    grace_s = 30.0

    @property
    def endpoint(self) -> str:
        return f"{procs.LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "kafka.log"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def config_path(self) -> Path:
        return self.workdir / "server.properties"

    def ports(self) -> dict[str, int]:
        return {"port": self.port, "controller": self.controller_port}

    def prepare(self) -> None:
        """Fetch the jars if needed, write the config, format storage the first time."""
        ensure_jars(self.jars_dir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            server_properties(
                port=self.port,
                controller_port=self.controller_port,
                data_dir=self.data_dir,
                partitions=self.partitions,
                node_id=self.node_id,
                voters=self.voters,
                replication_factor=self.replication_factor,
                min_insync=self.min_insync,
            )
        )
        # Formatting again would refuse (or, with --ignore-formatted, forget
        # nothing but waste a JVM start): the data must outlive restarts.
        if (self.data_dir / "meta.properties").exists():
            return
        if self.cluster_id_file is not None:
            cluster_id = shared_cluster_id(self.cluster_id_file)
        else:
            cluster_id = random_cluster_id()
        argv = [
            java_binary(),
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            "-cp",
            self.classpath(),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(self.config_path),
        ]
        if not self.voters:
            argv.append("--standalone")
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise StackError(f"formatting Kafka storage in {self.data_dir} failed:\n{output}")

    def classpath(self) -> str:
        return f"{self.jars_dir}/*"

    def argv(self) -> list[str]:
        return [
            java_binary(),
            f"-Xmx{self.heap}",
            *_JVM_OPTS,
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            "-cp",
            self.classpath(),
            "kafka.Kafka",
            str(self.config_path),
        ]

    def start(self) -> procs.Proc:
        self.prepare()
        return procs.start(self.kind, self.argv(), self.log_path, cwd=self.workdir)

    def ready(self) -> bool:
        return broker_ready(procs.LOOPBACK, self.port)
