"""A throwaway Redis on loopback: no persistence, state lives as long as the process.

Alone, or as one node of a Redis Cluster (see ``redis_cluster.py`` for how
the nodes are joined into one).
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from infra import procs
from shoprec.errors import StackError

DEFAULT_BINARY = "/usr/bin/redis-server"


def redis_binary() -> str:
    found = shutil.which("redis-server") or (
        DEFAULT_BINARY if Path(DEFAULT_BINARY).is_file() else None
    )
    if found is None:
        raise StackError("redis-server is not installed (Debian: apt-get install redis-server)")
    return found


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


CLUSTER_CONFIG_FILE = "nodes.conf"
# How long a primary may be unreachable before its replica takes over.  Redis's
# default is 15 s; on loopback nothing is slow, and the fault tests measure
# failover, so 5 s keeps them short without mistaking a busy node for a dead one.
CLUSTER_NODE_TIMEOUT_MS = 5000


def redis_conf(*, port: int, data_dir: Path, cluster_bus_port: int | None = None) -> str:
    """The server's config file; the feature store rebuilds from Kafka, so nothing is saved.

    With ``cluster_bus_port`` the server is a Redis Cluster node: its peers
    gossip on that port (set explicitly: Redis's default, port + 10000, may
    be taken or out of range when ports are picked free).
    """
    lines = [
        f"port {port}",
        f"bind {procs.LOOPBACK}",
        "protected-mode yes",
        "daemonize no",
        # Empty: log to stdout, which procs.start sends to redis.log.
        'logfile ""',
        'save ""',
        "appendonly no",
        f"dir {_quote(str(data_dir))}",
    ]
    if cluster_bus_port is not None:
        lines += [
            "cluster-enabled yes",
            # The node's own record of the cluster (ids, peers, slots), kept in
            # `dir`: a restarted node reads it and rejoins as the same node.
            f"cluster-config-file {CLUSTER_CONFIG_FILE}",
            f"cluster-port {cluster_bus_port}",
            f"cluster-node-timeout {CLUSTER_NODE_TIMEOUT_MS}",
            # A primary waits this long (default 5 s) for more replicas before
            # it streams its data to them; each has one replica, so it need not.
            "repl-diskless-sync-delay 0",
        ]
    return "\n".join(lines) + "\n"


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether Redis answers PING (it answers -LOADING while it loads a dataset)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass(frozen=True)
class RedisServer:
    """redis-server in ``workdir``: redis.conf and redis.log (and nodes.conf in a cluster).

    ``cluster_bus_port`` makes it a Redis Cluster node; None: a plain server.
    """

    workdir: Path
    port: int
    cluster_bus_port: int | None = None

    kind = "redis"
    grace_s = 10.0

    @property
    def url(self) -> str:
        return f"redis://{procs.LOOPBACK}:{self.port}/0"

    @property
    def endpoint(self) -> str:
        return self.url

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "redis.conf"

    @property
    def cluster_config_path(self) -> Path:
        return self.workdir / CLUSTER_CONFIG_FILE

    def ports(self) -> dict[str, int]:
        if self.cluster_bus_port is None:
            return {"port": self.port}
        return {"port": self.port, "bus": self.cluster_bus_port}

    def forget_cluster(self) -> None:
        """Drop the node's record of a former cluster, so it starts as a new, empty node.

        Nothing is persisted, so a former cluster's slots and peers (on ports
        since given to others) would only confuse a new one.  A node that is
        restarted within its cluster keeps the record and rejoins.
        """
        self.cluster_config_path.unlink(missing_ok=True)

    def start(self) -> procs.Proc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            redis_conf(
                port=self.port, data_dir=self.workdir, cluster_bus_port=self.cluster_bus_port
            )
        )
        return procs.start(
            self.kind, [redis_binary(), str(self.config_path)], self.log_path, cwd=self.workdir
        )

    def ready(self) -> bool:
        return ping(procs.LOOPBACK, self.port)
