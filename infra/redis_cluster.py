"""Joining Redis nodes into a Redis Cluster, and asking it how it stands.

The nodes themselves are ``RedisServer``s with a cluster bus port.  Once all
answer PING, ``create`` hands them to ``redis-cli --cluster create`` (Debian's
redis-tools), which splits the 16384 hash slots over the primaries and gives
each its replicas; ``ready`` then waits until every node agrees.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from infra import procs
from shoprec.errors import StackError

HASH_SLOTS = 16384
DEFAULT_CLI = "/usr/bin/redis-cli"


def redis_cli_binary() -> str:
    found = shutil.which("redis-cli") or (DEFAULT_CLI if Path(DEFAULT_CLI).is_file() else None)
    if found is None:
        raise StackError("redis-cli is not installed (Debian: apt-get install redis-tools)")
    return found


def command(host: str, port: int, *args: str, timeout: float = 1.0) -> str:
    """Send one command and return its reply as text (a simple, integer or bulk reply).

    Raises OSError when the node does not answer and StackError when it
    answers with an error.  Enough RESP for CLUSTER INFO, CLUSTER NODES and
    INFO, without a client library.
    """
    request = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        request += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        reader = sock.makefile("rb")
        head = reader.readline()
        if not head.endswith(b"\r\n"):
            raise OSError(f"{host}:{port} closed the connection")
        kind, rest = head[:1], head[1:-2].decode()
        if kind in (b"+", b":"):
            return rest
        if kind == b"-":
            raise StackError(f"Redis on {host}:{port} answered {' '.join(args)}: {rest}")
        if kind == b"$" and int(rest) >= 0:
            body = reader.read(int(rest) + 2)
            if len(body) != int(rest) + 2:
                raise OSError(f"{host}:{port} closed the connection mid-reply")
            return body[:-2].decode()
        raise StackError(f"Redis on {host}:{port} gave an unexpected reply to {args[0]}: {head!r}")


def parse_info(text: str) -> dict[str, str]:
    """``key:value`` lines of CLUSTER INFO or INFO (section headers and blanks skipped)."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs if not key.startswith("#")}


@dataclass(frozen=True)
class ClusterNode:
    """One line of CLUSTER NODES."""

    node_id: str
    port: int
    primary: bool
    primary_id: str | None  # a replica's primary
    failed: bool  # flagged fail or fail? (suspected) by the node asked
    slots: tuple[tuple[int, int], ...]  # inclusive ranges

    @property
    def slot_ranges(self) -> list[str]:
        return [str(a) if a == b else f"{a}-{b}" for a, b in self.slots]

    @property
    def slot_count(self) -> int:
        return sum(b - a + 1 for a, b in self.slots)


def parse_nodes(text: str) -> list[ClusterNode]:
    """CLUSTER NODES: ``<id> <ip:port@bus[,host]> <flags> <primary|-> <ping> <pong> <epoch>
    <link> <slot or range>...``; slots being migrated (``[...]``) are left out."""
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split("@", 1)[0]
        flags = set(fields[2].split(","))
        slots = []
        for spec in fields[8:]:
            if spec.startswith("["):
                continue
            first, _, last = spec.partition("-")
            slots.append((int(first), int(last or first)))
        nodes.append(
            ClusterNode(
                node_id=fields[0],
                port=int(address.rsplit(":", 1)[1]) if ":" in address else 0,
                primary="master" in flags,
                primary_id=None if fields[3] == "-" else fields[3],
                failed=bool(flags & {"fail", "fail?"}),
                slots=tuple(sorted(slots)),
            )
        )
    return nodes


def create(ports: Sequence[int], replicas: int, timeout_s: float = 60.0) -> None:
    """``redis-cli --cluster create`` over the nodes on ``ports`` (all on loopback, all empty).

    redis-cli makes the first ``len(ports) // (replicas + 1)`` nodes the
    primaries and the rest their replicas.
    """
    nodes = [f"{procs.LOOPBACK}:{port}" for port in ports]
    argv = [
        redis_cli_binary(),
        "--cluster",
        "create",
        *nodes,
        "--cluster-replicas",
        str(replicas),
        "--cluster-yes",
    ]
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"redis-cli --cluster create did not finish in {timeout_s:.0f} s") from exc
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise StackError(f"redis-cli could not create the Redis Cluster on {nodes}:\n{output}")


def ready(ports: Sequence[int], primaries: int) -> bool:
    """Whether every node says the cluster is ok with all slots covered by ``primaries``
    primaries, knows every node, and each replica's link to its primary is up."""
    try:
        for port in ports:
            info = parse_info(command(procs.LOOPBACK, port, "CLUSTER", "INFO"))
            if (
                info.get("cluster_state") != "ok"
                or info.get("cluster_slots_ok") != str(HASH_SLOTS)
                or info.get("cluster_known_nodes") != str(len(ports))
                or info.get("cluster_size") != str(primaries)
            ):
                return False
            nodes = parse_nodes(command(procs.LOOPBACK, port, "CLUSTER", "NODES"))
            me = next(n for n in nodes if n.port == port)
            if any(n.failed for n in nodes):
                return False
            if not me.primary:
                replication = parse_info(command(procs.LOOPBACK, port, "INFO", "replication"))
                if replication.get("master_link_status") != "up":
                    return False
    except (OSError, StackError, StopIteration):
        return False
    return True


def nodes(ports: Sequence[int]) -> list[ClusterNode] | None:
    """CLUSTER NODES as the first node that answers sees it (None when none does)."""
    for port in ports:
        try:
            return parse_nodes(command(procs.LOOPBACK, port, "CLUSTER", "NODES"))
        except (OSError, StackError):
            continue
    return None


def cluster_info(ports: Sequence[int]) -> dict[str, str] | None:
    """CLUSTER INFO of the first node that answers (None when none does)."""
    for port in ports:
        try:
            return parse_info(command(procs.LOOPBACK, port, "CLUSTER", "INFO"))
        except (OSError, StackError):
            continue
    return None
