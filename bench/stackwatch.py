"""What every process of a benchmark's stack spent, around a measured phase.

A capacity model needs the cost of one event in each part, not only in the workers: on
a small machine the parts share the cores, so the events/s one run reaches says little
about a deployment where each part has its own.  :class:`StackWatch` samples, before and
after a phase, the CPU seconds of each part's whole process group (a Triton server with
its python-backend stubs, a Kafka JVM, each Redis node), of this process (the load
generator, the output reader and the lag probe) and of the workers; and, on Redis, the
commands each node ran (``INFO commandstats``: script calls, and the commands the scripts
ran inside) and its memory.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra import procs, redis_cluster
from infra.stack import component_of


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes of one process group."""
    total = 0.0
    for pid in procs.group_members(pgid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited between listing and reading
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def commandstats(port: int) -> dict[str, int]:
    """Calls per command on one Redis node (commands run by scripts included)."""
    text = redis_cluster.command(procs.LOOPBACK, port, "INFO", "commandstats", timeout=5.0)
    out = {}
    for key, value in redis_cluster.parse_info(text).items():
        if key.startswith("cmdstat_"):
            calls = dict(p.split("=", 1) for p in value.split(","))
            out[key.removeprefix("cmdstat_")] = int(calls["calls"])
    return out


def is_replica(port: int) -> bool:
    text = redis_cluster.command(procs.LOOPBACK, port, "INFO", "replication", timeout=5.0)
    return redis_cluster.parse_info(text).get("role") == "slave"


def used_memory(port: int) -> int:
    text = redis_cluster.command(procs.LOOPBACK, port, "INFO", "memory", timeout=5.0)
    return int(redis_cluster.parse_info(text)["used_memory"])


@dataclass
class Sample:
    cpu_s: dict[str, float]  # role -> CPU seconds so far ("generator": this process)
    redis_calls: dict[int, dict[str, int]]  # port -> command -> calls
    redis_memory: dict[int, int]  # port -> used_memory bytes
    at: float = field(default_factory=time.monotonic)
    redis_replicas: set[int] = field(default_factory=set)  # ports of the replicas now


@dataclass
class StackWatch:
    """The stack's process groups by role (``broker-1``, ``redis-4``, ``triton-2``, or the
    single ``broker``, ``redis``, ``triton``) and its Redis ports."""

    groups: dict[str, int]
    redis_ports: list[int] = field(default_factory=list)
    # CPU seconds per second each part spends with no events (JVM and cluster chatter,
    # pollers), from :meth:`measure_idle`; taken off the per-event cost as "net".
    idle_cpu_per_s: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of_stack(cls, state_path: Path) -> StackWatch:
        """From a stack's ``stack.json``."""
        state = json.loads(state_path.read_text())
        comps = state["components"]
        return cls(
            groups={role: int(e["pid"]) for role, e in comps.items()},
            redis_ports=[
                int(e["ports"]["port"]) for r, e in comps.items() if component_of(r) == "redis"
            ],
        )

    def sample(self, workers: dict[str, int] | None = None) -> Sample:
        """Now; ``workers`` adds worker processes (name -> pid, their own groups)."""
        cpu = {role: group_cpu_seconds(pgid) for role, pgid in self.groups.items()}
        cpu |= {name: group_cpu_seconds(pid) for name, pid in (workers or {}).items()}
        cpu["generator"] = own_cpu_seconds()
        calls, memory, replicas = {}, {}, set()
        for port in self.redis_ports:
            try:
                calls[port], memory[port] = commandstats(port), used_memory(port)
                if is_replica(port):
                    replicas.add(port)
            except OSError:
                continue  # a node that is down (a fault test) has nothing to add
        return Sample(cpu, calls, memory, redis_replicas=replicas)

    def measure_idle(self, seconds: float = 10.0) -> dict[str, float]:
        """What each part of the stack spends per second while nothing is sent."""
        before = self.sample()
        time.sleep(seconds)
        after = self.sample()
        spent = after.at - before.at
        self.idle_cpu_per_s = {
            role: (after.cpu_s[role] - before.cpu_s[role]) / spent
            for role in self.groups
            if role in before.cpu_s
        }
        return self.idle_cpu_per_s

    def per_event(self, before: Sample, after: Sample, events: int, ranked: int) -> dict[str, Any]:
        """What the phase cost per input event: CPU ms per process (and per component),
        Redis commands per event (those the scripts ran included: Redis counts them under
        their own names), Triton's CPU also per ranked recommendation."""
        n = max(1, events)
        spent = after.at - before.at
        cpu = {
            role: round(1000 * (after.cpu_s[role] - before.cpu_s.get(role, 0.0)) / n, 4)
            for role in after.cpu_s
        }
        idle = {role: 1000 * rate * spent / n for role, rate in self.idle_cpu_per_s.items()}
        net = {role: round(max(0.0, ms - idle.get(role, 0.0)), 4) for role, ms in cpu.items()}

        def by_part(per_role: dict[str, float]) -> dict[str, float]:
            out: dict[str, float] = {}
            for role, ms in per_role.items():
                part = "worker" if role.startswith("worker") else component_of(role)
                out[part] = round(out.get(part, 0.0) + ms, 4)
            return dict(sorted(out.items()))

        by_component = by_part(cpu)
        net_by_component = by_part(net)
        commands: dict[str, int] = {}
        on_primaries = 0  # a replica re-runs each write's effects (MULTI/EXEC, PEXPIREAT)
        for port, calls in after.redis_calls.items():
            for name, count in calls.items():
                ran = count - before.redis_calls.get(port, {}).get(name, 0)
                commands[name] = commands.get(name, 0) + ran
                if port not in after.redis_replicas:
                    on_primaries += ran
        scripts = sum(v for k, v in commands.items() if k in ("evalsha", "eval"))
        total = sum(commands.values())
        return {
            "events": events,
            "ranked": ranked,
            "seconds": round(spent, 1),
            "cpu_ms_per_event": dict(sorted(cpu.items())),
            "cpu_ms_per_event_by_component": by_component,
            # Less what the part spends idle over the same time (JVMs, cluster gossip,
            # pollers): the cost that grows with the events.
            "net_cpu_ms_per_event_by_component": net_by_component,
            "idle_cpu_cores_by_component": by_part(self.idle_cpu_per_s),
            "triton_cpu_ms_per_ranked": round(
                net_by_component.get("triton", 0.0) * n / max(1, ranked), 4
            ),
            "redis_commands_per_event": round(total / n, 2),
            "redis_commands_per_event_on_primaries": round(on_primaries / n, 2),
            "redis_script_calls_per_event": round(scripts / n, 2),
            "redis_top_commands_per_event": {
                k: round(v / n, 2)
                for k, v in sorted(commands.items(), key=lambda kv: -kv[1])[:12]
                if v > 0
            },
            "redis_memory_bytes": sum(after.redis_memory.values()),
        }
