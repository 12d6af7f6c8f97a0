"""What the cluster tests share: the running cluster, killing and restoring its nodes, who
leads what, and how each fault test measures and reports what it saw.

Faults are real: a node is killed with SIGKILL (its whole process group, as a crashed
machine would leave it), a Redis primary is failed over with ``CLUSTER FAILOVER`` sent
to its replica.  ``Cluster.restore`` starts whatever is down again and waits until both
clusters are whole (every partition fully in sync, every primary with a replica), so the
next test starts from a healthy cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infra import procs, redis_cluster
from infra.kafka import ClusterMetadata, describe_cluster
from infra.stack import component_of
from tests.faults.harness import FaultStack

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results" / "cluster-faults.json"


@dataclass
class Cluster:
    """The cluster the suite runs on, and what a fault test does to it."""

    faults: FaultStack

    @property
    def stack_state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.faults.stack.state_path.read_text())
        return state

    def roles(self, component: str) -> list[str]:
        return [r for r in self.stack_state["components"] if component_of(r) == component]

    def port(self, role: str) -> int:
        return int(self.stack_state["components"][role]["ports"]["port"])

    def proc(self, role: str) -> procs.Proc:
        return procs.Proc.from_json(role, self.stack_state["components"][role])

    def kill(self, role: str) -> float:
        """SIGKILL ``role``'s whole process group; returns when it is gone (monotonic time
        of the kill)."""
        proc = self.proc(role)
        killed_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        procs.wait_until(lambda: not procs.group_members(proc.pid), 30, f"{role} to die")
        return killed_at

    # --- Kafka ------------------------------------------------------------------------

    def kafka_metadata(self) -> ClusterMetadata | None:
        for role in self.roles("broker"):
            with contextlib.suppress(KeyError):
                meta = describe_cluster(procs.LOOPBACK, self.port(role))
                if meta is not None:
                    return meta
        return None

    def leaders(self, topics: Iterable[str]) -> dict[str, list[int]]:
        """The leader (node id, -1 none) of every partition of ``topics``."""
        meta = self.kafka_metadata()
        assert meta is not None, "no broker answers"
        return {t: [p.leader for p in meta.topics.get(t, [])] for t in topics}

    def kafka_whole(self) -> bool:
        """Every broker up, every partition led and with all its replicas in sync."""
        meta = self.kafka_metadata()
        if meta is None or len(meta.brokers) != len(self.roles("broker")):
            return False
        parts = [p for ps in meta.topics.values() for p in ps]
        return all(p.leader >= 0 and len(p.isr) == len(p.replicas) for p in parts)

    # --- Redis Cluster ------------------------------------------------------------------

    def redis_ports(self) -> list[int]:
        return [self.port(r) for r in self.roles("redis")]

    def redis_nodes(self) -> list[redis_cluster.ClusterNode]:
        nodes = redis_cluster.nodes(self.redis_ports())
        assert nodes is not None, "no Redis node answers"
        return nodes

    def redis_role_of_port(self) -> dict[int, str]:
        return {self.port(r): r for r in self.roles("redis")}

    def primary_and_replica(self, slot: int | None = None) -> tuple[str, str]:
        """A primary (the one serving ``slot`` if given) and its replica, as stack roles."""
        nodes = [n for n in self.redis_nodes() if not n.failed]
        by_id = {n.node_id: n for n in nodes}
        role = self.redis_role_of_port()
        for n in nodes:
            if not n.primary or n.primary_id is not None:
                continue
            if slot is not None and not any(a <= slot <= b for a, b in n.slots):
                continue
            replicas = [r for r in nodes if r.primary_id == n.node_id]
            if replicas and n.node_id in by_id:
                return role[n.port], role[replicas[0].port]
        raise AssertionError(f"no primary with a live replica (slot {slot})")

    def is_primary(self, role: str) -> bool:
        port = self.port(role)
        try:
            nodes = redis_cluster.parse_nodes(
                redis_cluster.command(procs.LOOPBACK, port, "CLUSTER", "NODES")
            )
        except OSError:
            return False
        me = next((n for n in nodes if n.port == port), None)
        return me is not None and me.primary and bool(me.slots)

    def redis_ok(self) -> bool:
        info = redis_cluster.cluster_info(self.redis_ports())
        return info is not None and info.get("cluster_state") == "ok"

    def redis_whole(self) -> bool:
        """Every node up and agreeing, three primaries, each with a linked replica."""
        return redis_cluster.ready(self.redis_ports(), 3)

    # --- putting it back ----------------------------------------------------------------

    def restore(self, timeout_s: float = 300.0) -> None:
        """Start every node that is down, then wait until both clusters are whole."""
        stack = self.faults.stack
        for role, part in stack.status().items():
            if role.endswith("-cluster") or part["alive"]:
                continue
            with contextlib.suppress(Exception):
                stack.stop_component(role)  # a half-dead group (Triton's stubs)
            stack.start_component(role, timeout_s=timeout_s)
        procs.wait_until(self.kafka_whole, timeout_s, "the Kafka cluster whole again")
        procs.wait_until(self.redis_whole, timeout_s, "the Redis Cluster whole again")


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll until ``predicate`` holds; the seconds it took."""
    return procs.wait_until(predicate, timeout_s, what, interval=0.05)


# --- measuring ----------------------------------------------------------------------------


def latency_ms(rec: dict[str, Any]) -> float:
    """From the event's send (its ``ts``, stamped when sent) to the worker's publish."""
    return float(rec["emitted_ts"] - rec["trigger"]["ts"])


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    arr = np.asarray(values, dtype=np.float64)
    out = {f"p{q}": round(float(np.percentile(arr, q)), 1) for q in (50, 95, 99)}
    return {"n": len(values)} | out | {"max": round(float(arr.max()), 1)}


def latency_windows(
    recs: Sequence[dict[str, Any]], bounds_ms: Sequence[tuple[str, float, float]]
) -> dict[str, dict[str, float]]:
    """Latency percentiles of the recommendations whose trigger was sent in each window
    ``(name, from_ms, to_ms)`` (wall-clock ms, as the events' ``ts``)."""
    return {
        name: percentiles([latency_ms(r) for r in recs if lo <= r["trigger"]["ts"] < hi])
        for name, lo, hi in bounds_ms
    }


def longest_output_gap_s(recs: Sequence[dict[str, Any]], from_ms: float, to_ms: float) -> float:
    """The longest time no recommendation was published, between two that were, within
    ``[from_ms, to_ms]`` (while events arrive steadily, this is how long the stall lasted)."""
    emitted = sorted(r["emitted_ts"] for r in recs if from_ms <= r["emitted_ts"] <= to_ms)
    gaps = np.diff(np.asarray(emitted, dtype=np.float64)) if len(emitted) > 1 else [0.0]
    return round(float(max(gaps)) / 1000, 2)


def first_served_after_s(recs: Sequence[dict[str, Any]], at_ms: float) -> float | None:
    """Seconds from ``at_ms`` to the first publish of a recommendation for an event sent
    after it (None if there was none)."""
    later = [r["emitted_ts"] for r in recs if r["trigger"]["ts"] >= at_ms]
    return round((min(later) - at_ms) / 1000, 2) if later else None


def triton_successes(metrics_hostport: str, model: str) -> int:
    """``nv_inference_request_success`` of ``model`` on one Triton (0 if it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://{metrics_hostport}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return 0
    total = 0
    for line in text.splitlines():
        if line.startswith("nv_inference_request_success{") and f'model="{model}"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def record(name: str, result: dict[str, Any], path: Path = RESULTS) -> None:
    """Keep ``result`` under ``name`` in the suite's results file (other tests' kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    doc.setdefault("machine", {"cpus": os.cpu_count()})
    doc.setdefault("tests", {})[name] = result | {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
