"""A single-node Apache Kafka broker (KRaft, broker and controller in one JVM).

The broker is the set of jars Maven Central holds for ``kafka_2.13``
(``infra/kafka/pom.xml``), resolved once into ``infra/kafka/jars/`` and
shared by every stack directory.  The data directory lives under the stack
directory and is formatted only once, so topics survive a broker restart.
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


def server_properties(*, port: int, controller_port: int, data_dir: Path, partitions: int) -> str:
    """The broker's ``server.properties``: one combined node on loopback."""
    host = procs.LOOPBACK
    lines = [
        "process.roles=broker,controller",
        "node.id=1",
        f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        f"advertised.listeners=PLAINTEXT://{host}:{port}",
        "controller.listener.names=CONTROLLER",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        f"controller.quorum.bootstrap.servers={host}:{controller_port}",
        f"log.dirs={data_dir}",
        # One node: internal topics cannot have more than one replica.
        "offsets.topic.replication.factor=1",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        # Tests and the demo join consumer groups often; the default waits 3 s.
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=true",
        f"num.partitions={partitions}",
    ]
    return "\n".join(lines) + "\n"


def metadata_broker_count(host: str, port: int, timeout: float = 1.0) -> int | None:
    """Brokers listed by a Metadata (v4) request, or None when nothing sensible answers.

    A broker answers Metadata with itself only once it is registered and
    unfenced, so this says "ready for clients" where an open port does not.
    Version 4 is the oldest one Kafka 4 still serves, and Tansu serves it too.
    """
    client_id = b"shoprec-infra"
    correlation_id = 0x5EC
    # Header v1: api_key=3 (Metadata), api_version=4, correlation id, client id;
    # body: an empty topic array (no topics, just brokers), no auto-creation.
    body = struct.pack(">hhih", 3, 4, correlation_id, len(client_id)) + client_id
    body += struct.pack(">ib", 0, 0)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            head = _recv_exact(sock, 4)
            if head is None:
                return None
            (size,) = struct.unpack(">i", head)
            if size < 12 or size > 1 << 20:
                return None
            payload = _recv_exact(sock, size)
    except OSError:
        return None
    if payload is None:
        return None
    got_id, _throttle_ms, brokers = struct.unpack(">iii", payload[:12])
    return brokers if got_id == correlation_id else None


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
    """Apache Kafka in ``workdir``: server.properties, data/ and kafka.log."""

    workdir: Path
    port: int
    controller_port: int
    heap: str = "512m"
    partitions: int = 4
    jars_dir: Path = JARS_DIR

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
            )
        )
        # Formatting again would refuse (or, with --ignore-formatted, forget
        # nothing but waste a JVM start): the data must outlive restarts.
        if (self.data_dir / "meta.properties").exists():
            return
        argv = [
            java_binary(),
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            "-cp",
            self.classpath(),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            random_cluster_id(),
            "-c",
            str(self.config_path),
            "--standalone",
        ]
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
