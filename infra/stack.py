"""The local stack: a broker (Apache Kafka or Tansu), Redis and Triton on loopback.

``Stack.up`` starts the parts, waits until each answers, and records them in
``<stack_dir>/stack.json`` (pids, ports, logs) and ``<stack_dir>/stack.env``
(the ``SHOPREC_*`` endpoints, which ``Settings`` reads as a fallback).  Any
later process pointed at the same stack directory can ask for ``status`` or
bring it ``down``; nothing is kept in memory between calls.

``up(cluster=True)`` starts the cluster profile instead (``ClusterShape``): a
Kafka cluster of combined broker+controller nodes with replicated topics, a
Redis Cluster of primaries and replicas, and several Triton servers.  Each
node is one of the single-node parts (``KafkaBroker``, ``RedisServer``,
``TritonServer``) with its own role: ``broker-1``, ``redis-4``, ``triton-2``.

Layout of the stack directory::

    stack.json  stack.env  .lock
    kafka/   server.properties  data/  kafka.log     (data survives down/up)
    tansu/   tansu.log
    redis/   redis.conf  redis.log
    triton/  backends/python/  triton.log
    cluster/ kafka.cluster-id  kafka-1/ ...  redis-1/ ...  triton-1/ ...
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from infra import procs, redis_cluster
from infra.kafka import ClusterMetadata, KafkaBroker, describe_cluster
from infra.redis_server import RedisServer
from infra.tansu import TansuBroker
from infra.triton import TritonServer, shm_prefix_for
from shoprec.errors import StackError
from shoprec.settings import STACK_ENV_NAME, Settings

log = logging.getLogger("shoprec.infra")

COMPONENTS: tuple[str, ...] = ("broker", "redis", "triton")
DEFAULT_MODEL_REPO = Path(__file__).resolve().parent.parent / "model_repo"
STATE_FILE = "stack.json"
_STATE_VERSION = 1
CLUSTER_DIR = "cluster"
# Subfolders `down --wipe` removes; anything else in the stack dir is not ours.
_COMPONENT_DIRS = ("kafka", "tansu", "redis", "triton", CLUSTER_DIR)
# In the cluster profile a fixed port P of a part gives its nodes P, P + stride,
# P + 2 * stride, ...: Triton has three ports (8000-8002, then 8003-8005, ...).
_PORT_STRIDE = {"broker": 1, "redis": 1, "triton": 3}


@dataclass(frozen=True)
class ClusterShape:
    """How many of each part the cluster profile starts, and how Kafka replicates.

    Kafka runs ``kafka_nodes`` combined broker+controller nodes: every node
    is a voter of the controller quorum, so the cluster keeps its metadata
    and its partitions with one node down, at half the JVMs (and memory) of
    separate controllers.  Topics, the internal ones included, have
    ``replication_factor`` replicas and take writes while ``min_insync``
    of them are in sync.
    """

    kafka_nodes: int = 3
    redis_primaries: int = 3
    redis_replicas: int = 1  # per primary
    tritons: int = 2
    replication_factor: int = 3
    min_insync: int = 2
    # Three JVMs on a small machine next to Redis, two Tritons and the workers.
    kafka_heap: str = "384m"

    def __post_init__(self) -> None:
        if not 1 <= self.min_insync < self.replication_factor <= self.kafka_nodes:
            raise StackError(
                "the Kafka cluster needs 1 <= min_insync < replication_factor <= kafka_nodes "
                "(so a write survives a broker going away), got "
                f"{self.min_insync}, {self.replication_factor}, {self.kafka_nodes}"
            )
        if self.redis_primaries < 3 or self.redis_replicas < 0:
            raise StackError(
                f"Redis Cluster needs at least 3 primaries, got {self.redis_primaries} "
                f"(and {self.redis_replicas} replicas each)"
            )
        if self.tritons < 1:
            raise StackError(f"the cluster needs at least one Triton server, got {self.tritons}")

    def size(self, component: str) -> int:
        if component == "broker":
            return self.kafka_nodes
        if component == "redis":
            return self.redis_primaries * (1 + self.redis_replicas)
        return self.tritons


def member_roles(component: str, shape: ClusterShape | None) -> list[str]:
    """The roles a component runs as: itself alone, or ``<component>-1..n`` in a cluster."""
    if shape is None:
        return [component]
    return [f"{component}-{i}" for i in range(1, shape.size(component) + 1)]


def component_of(role: str) -> str:
    """``broker-2`` -> ``broker``; a single-node role is its component."""
    return role.split("-", 1)[0]


class Service(Protocol):
    """What the stack needs of each component (see kafka.py, redis_server.py, ...)."""

    @property
    def kind(self) -> str: ...

    @property
    def grace_s(self) -> float: ...

    @property
    def endpoint(self) -> str: ...

    @property
    def log_path(self) -> Path: ...

    def ports(self) -> dict[str, int]: ...

    def start(self) -> procs.Proc: ...

    def ready(self) -> bool: ...


@dataclass(frozen=True)
class Endpoints:
    """Where the running stack's services listen ('' for a part not started)."""

    broker: str  # "kafka" or "tansu"
    kafka_bootstrap: str  # host:port, comma-separated in a cluster
    redis_url: str  # redis://host:port/0 (a cluster: every node, redis://h:p1,h:p2/0)
    triton_url: str  # gRPC host:port, comma-separated in a cluster
    triton_http: str  # host:port, comma-separated in a cluster
    triton_metrics: str  # host:port (Prometheus text at /metrics), comma-separated
    redis_cluster: bool = False  # redis_url is a node of a Redis Cluster
    kafka_replication_factor: int = 1  # replicas shoprec's topics should have

    def env(self) -> dict[str, str]:
        """The ``SHOPREC_*`` variables that point shoprec at this stack."""
        pairs = {
            "SHOPREC_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "SHOPREC_KAFKA_REPLICATION_FACTOR": (
                str(self.kafka_replication_factor) if self.kafka_replication_factor > 1 else ""
            ),
            "SHOPREC_REDIS_URL": self.redis_url,
            "SHOPREC_REDIS_CLUSTER": "true" if self.redis_cluster else "",
            "SHOPREC_TRITON_URL": self.triton_url,
        }
        return {k: v for k, v in pairs.items() if v}


def format_env_file(endpoints: Endpoints) -> str:
    """``stack.env``: dotenv lines that Settings reads when the variables are not set."""
    lines = ["# Written by `shoprec stack up`; removed by `shoprec stack down`."]
    lines += [f"{key}={value}" for key, value in endpoints.env().items()]
    return "\n".join(lines) + "\n"


class Stack:
    """The local stack rooted at ``settings.stack_dir``.

    ``model_repo`` is the Triton model repository (default: ``model_repo/``
    at the repository root).  As a context manager it brings the stack down
    on exit; call ``up`` inside it::

        with Stack(settings, model_repo=repo) as stack:
            endpoints = stack.up(components=("broker", "redis"))
    """

    def __init__(self, settings: Settings, model_repo: Path | None = None) -> None:
        self.settings = settings
        self.stack_dir = settings.stack_dir.expanduser().resolve()
        self.model_repo = (model_repo or DEFAULT_MODEL_REPO).expanduser().resolve()
        self.state_path = self.stack_dir / STATE_FILE
        self.env_path = self.stack_dir / STACK_ENV_NAME

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # --- public API -----------------------------------------------------------------

    def up(
        self,
        components: Sequence[str] = COMPONENTS,
        timeout_s: float = 180.0,
        cluster: bool | ClusterShape = False,
    ) -> Endpoints:
        """Start ``components``, wait until each is ready, record and return the endpoints.

        ``cluster`` (True, or a ``ClusterShape``) starts the cluster profile:
        every component as several nodes, Kafka and Redis joined into clusters.

        Raises StackError when a stack recorded in this directory still runs,
        when a fixed port is taken, or when a part does not become ready
        within ``timeout_s`` (counted per part from its start; for a cluster,
        from its first node's start); whatever was started is stopped again
        before the error propagates.
        """
        wanted = _check_components(components)
        shape = (
            cluster if isinstance(cluster, ClusterShape) else ClusterShape() if cluster else None
        )
        if shape is not None and "broker" in wanted and self.settings.broker != "kafka":
            raise StackError(
                f"the cluster profile runs Apache Kafka, not {self.settings.broker} "
                "(which does not replicate): unset SHOPREC_BROKER or set it to kafka"
            )
        with self._locked():
            self._refuse_if_running()
            ports = self._resolve_ports(wanted, shape)
            services = self._services(self.settings.broker, ports, shape)
            members = {component: member_roles(component, shape) for component in wanted}
            state = self._new_state(shape)
            started: dict[str, procs.Proc] = {}
            began: dict[str, float] = {}

            def start(component: str) -> None:
                for role in members.get(component, []):
                    service = services[role]
                    if shape is not None and isinstance(service, RedisServer):
                        service.forget_cluster()
                    began[role] = time.monotonic()
                    started[role] = self._start(role, service, state)

            def wait(component: str) -> None:
                for role in members.get(component, []):
                    left = max(0.0, began[role] + timeout_s - time.monotonic())
                    _wait(services[role], started[role], left, began[role])
                if shape is not None and component in members:
                    first = members[component][0]
                    left = max(0.0, began[first] + timeout_s - time.monotonic())
                    self._form_cluster(
                        component, [services[r] for r in members[component]], shape, left
                    )

            try:
                # Redis first, and ready before Triton starts: models may
                # connect to it while they initialise.  It takes milliseconds.
                start("redis")
                wait("redis")
                # Triton and the broker take seconds each; start both, then wait.
                start("triton")
                start("broker")
                wait("broker")
                wait("triton")
            except BaseException:
                self._stop({role: (services[role], proc) for role, proc in started.items()})
                self.state_path.unlink(missing_ok=True)
                raise
            endpoints = self._endpoints(ports, members, shape)
            state["ready"] = True
            state["endpoints"] = asdict(endpoints)
            self._write_state(state)
            _write_atomic(self.env_path, format_env_file(endpoints))
            log.info("stack up in %s: %s", self.stack_dir, endpoints.env())
            return endpoints

    def down(self, wipe: bool = False) -> None:
        """Stop every recorded process and forget the stack; ``wipe`` also deletes its data."""
        with self._locked():
            state = self._read_state()
            if state is None:
                log.info("no stack recorded in %s", self.stack_dir)
            else:
                running = {
                    role: (self._service(role, state), _recorded(entry, role))
                    for role, entry in state["components"].items()
                }
                self._stop(running)
            self.state_path.unlink(missing_ok=True)
            self.env_path.unlink(missing_ok=True)
            if wipe:
                for name in _COMPONENT_DIRS:
                    shutil.rmtree(self.stack_dir / name, ignore_errors=True)
                log.info("wiped the stack's data in %s", self.stack_dir)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per recorded component: kind, pid, port, endpoint, alive, healthy, log.

        A cluster adds one entry per cluster, each with its own ``healthy``:
        ``kafka-cluster`` (live brokers, the leader of
        every partition per topic, partitions missing in-sync replicas) and
        ``redis-cluster`` (its state and the slot ranges and replicas of each
        primary); each Redis node says whether it is a primary or a replica.
        """
        state = self._read_state()
        if state is None:
            return {}
        report: dict[str, dict[str, Any]] = {}
        for role, entry in state["components"].items():
            service = self._service(role, state)
            proc = _recorded(entry)
            alive = procs.is_alive(proc)
            report[role] = {
                "kind": service.kind,
                "pid": proc.pid,
                "port": service.ports()["port"],
                "endpoint": service.endpoint,
                "alive": alive,
                "healthy": alive and _healthy(service),
                "log": str(service.log_path),
            }
        shape = _recorded_shape(state)
        if shape is not None:
            ports = {role: dict(entry["ports"]) for role, entry in state["components"].items()}
            brokers = {r: p["port"] for r, p in ports.items() if component_of(r) == "broker"}
            if brokers:
                report["kafka-cluster"] = kafka_cluster_report(brokers, shape)
            nodes = {r: p["port"] for r, p in ports.items() if component_of(r) == "redis"}
            if nodes:
                report["redis-cluster"] = redis_cluster_report(nodes, shape, report)
        return report

    def endpoints(self) -> Endpoints | None:
        """The endpoints of the recorded stack, if one is up."""
        state = self._read_state()
        if state is None or not state.get("endpoints"):
            return None
        return Endpoints(**state["endpoints"])

    def stop_component(self, role: str) -> None:
        """Stop one part, keeping its ports and data (fault tests: broker restart)."""
        with self._locked():
            state = self._require_state()
            entry = state["components"].get(role)
            if entry is None:
                raise StackError(f"the stack in {self.stack_dir} has no {role}")
            service = self._service(role, state)
            self._stop({role: (service, _recorded(entry, role))})

    def start_component(self, role: str, timeout_s: float = 180.0) -> None:
        """Start one stopped part again on the same ports and wait until it is ready."""
        with self._locked():
            state = self._require_state()
            if role not in state["components"]:
                raise StackError(f"the stack in {self.stack_dir} has no {role}")
            if procs.owns_group(_recorded(state["components"][role])):
                raise StackError(f"{role} of the stack in {self.stack_dir} is still running")
            service = self._service(role, state)
            began = time.monotonic()
            proc = self._start(role, service, state)
            try:
                _wait(service, proc, timeout_s, began)
            except BaseException:
                self._stop({role: (service, proc)})
                raise

    # --- internals ------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # Two `stack up` at once in one directory would both see no stack.
        self.stack_dir.mkdir(parents=True, exist_ok=True)
        with open(self.stack_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise StackError(f"{self.state_path} is not valid JSON ({exc}); remove it") from exc
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise StackError(f"{self.state_path} was written by another version; remove it")
        return state

    def _require_state(self) -> dict[str, Any]:
        state = self._read_state()
        if state is None:
            raise StackError(f"no stack is recorded in {self.stack_dir}")
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        _write_atomic(self.state_path, json.dumps(state, indent=2) + "\n")

    def _refuse_if_running(self) -> None:
        state = self._read_state()
        if state is None:
            return
        alive = [
            f"{entry.get('kind', role)} (pid {entry['pid']})"
            for role, entry in state["components"].items()
            if procs.owns_group(_recorded(entry))
        ]
        if alive:
            raise StackError(
                f"a stack is already running in {self.stack_dir}: {', '.join(alive)}; "
                "`shoprec stack status` shows it, `shoprec stack down` stops it"
            )
        log.info("removing the record of a stack that is no longer running")
        self.state_path.unlink(missing_ok=True)
        self.env_path.unlink(missing_ok=True)

    def _resolve_ports(
        self, wanted: Sequence[str], shape: ClusterShape | None = None
    ) -> dict[str, dict[str, int]]:
        s = self.settings
        per_component: dict[str, dict[str, tuple[int, str]]] = {
            "broker": {"port": (s.kafka_port, "SHOPREC_KAFKA_PORT")},
            "redis": {"port": (s.redis_port, "SHOPREC_REDIS_PORT")},
            "triton": {
                "port": (s.triton_grpc_port, "SHOPREC_TRITON_GRPC_PORT"),
                "http": (s.triton_http_port, "SHOPREC_TRITON_HTTP_PORT"),
                "metrics": (s.triton_metrics_port, "SHOPREC_TRITON_METRICS_PORT"),
            },
        }
        if s.broker == "kafka":
            # No setting: nothing outside the broker talks to its controller.
            per_component["broker"]["controller"] = (0, "")
        if shape is not None:
            # Nor to the Redis Cluster bus, which only the nodes use.
            per_component["redis"]["bus"] = (0, "")
        asked: dict[str, dict[str, tuple[int, str]]] = {}
        for component in wanted:
            stride = _PORT_STRIDE[component]
            for i, role in enumerate(member_roles(component, shape)):
                asked[role] = {}
                for key, (base, variable) in per_component[component].items():
                    port = base + i * stride if base else 0
                    if port > 65535:
                        raise StackError(
                            f"{role} would need port {port}: set {variable} lower, or to 0"
                        )
                    asked[role][key] = (port, variable)
        needed = [(role, key) for role in asked for key in asked[role]]
        fixed = [asked[role][key][0] for role, key in needed if asked[role][key][0]]
        if len(fixed) != len(set(fixed)):
            raise StackError(f"the stack's ports must differ, got {sorted(fixed)}")
        spare = iter(p for p in procs.free_ports(len(needed) + len(fixed)) if p not in fixed)
        ports: dict[str, dict[str, int]] = {}
        for role, key in needed:
            port, variable = asked[role][key]
            if port == 0:
                port = next(spare)
            elif procs.port_open(procs.LOOPBACK, port):
                raise StackError(
                    f"port {port} for {role} is already in use on {procs.LOOPBACK}; "
                    f"stop what uses it or set {variable}=0 to pick a free port"
                )
            ports.setdefault(role, {})[key] = port
        return ports

    def _services(
        self, broker: str, ports: dict[str, dict[str, int]], shape: ClusterShape | None = None
    ) -> dict[str, Service]:
        return build_services(
            self.settings,
            stack_dir=self.stack_dir,
            model_repo=self.model_repo,
            broker=broker,
            ports=ports,
            cluster=shape,
        )

    def _service(self, role: str, state: dict[str, Any]) -> Service:
        """Rebuild a recorded component (same ports, same folders)."""
        ports = {r: dict(entry["ports"]) for r, entry in state["components"].items()}
        services = build_services(
            self.settings,
            stack_dir=Path(state["stack_dir"]),
            model_repo=Path(state["model_repo"]),
            broker=state["broker"],
            ports=ports,
            cluster=_recorded_shape(state),
        )
        if role not in services:
            raise StackError(f"unknown component {role!r} in {self.state_path}")
        return services[role]

    def _new_state(self, shape: ClusterShape | None = None) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "stack_dir": str(self.stack_dir),
            "model_repo": str(self.model_repo),
            "broker": self.settings.broker,
            "cluster": asdict(shape) if shape is not None else None,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "ready": False,
            "components": {},
            "endpoints": None,
        }

    def _form_cluster(
        self, component: str, nodes: Sequence[Service], shape: ClusterShape, timeout_s: float
    ) -> None:
        """Wait until the started nodes of ``component`` work as one cluster.

        Redis nodes are joined by ``redis-cli --cluster create`` first; Kafka's
        join by themselves (static quorum), and are a cluster once every
        node is registered.  Tritons are independent servers.
        """
        ports = [node.ports()["port"] for node in nodes]
        first = nodes[0]
        began = time.monotonic()
        check: Callable[[], bool]
        if component == "redis":
            redis_cluster.create(ports, shape.redis_replicas, timeout_s=max(1.0, timeout_s))
            what = f"Redis Cluster on ports {ports}"

            def check() -> bool:
                return redis_cluster.ready(ports, shape.redis_primaries)

        elif component == "broker":
            what = f"Kafka cluster on ports {ports}"

            def check() -> bool:
                meta = _first_metadata(ports)
                return meta is not None and len(meta.brokers) == shape.kafka_nodes

        else:
            return
        left = max(0.0, timeout_s - (time.monotonic() - began))
        procs.wait_until(check, left, what, first.log_path, interval=0.2)
        log.info("%s formed in %.1f s", what, time.monotonic() - began)

    def _start(self, role: str, service: Service, state: dict[str, Any]) -> procs.Proc:
        log.info("starting %s on %s", service.kind, service.endpoint)
        proc = service.start()
        # Recorded at once, so `down` from another shell finds a half-started stack.
        state["components"][role] = {
            "kind": service.kind,
            **proc.to_json(),
            "ports": service.ports(),
            "endpoint": service.endpoint,
        }
        self._write_state(state)
        return proc

    def _stop(self, running: dict[str, tuple[Service, procs.Proc]]) -> None:
        leftovers = []
        for service, proc in running.values():
            if isinstance(service, TritonServer):
                leftovers += service.shm_regions(proc)
        procs.stop_all([(proc, service.grace_s) for service, proc in running.values()])
        for path in leftovers:
            path.unlink(missing_ok=True)

    def _endpoints(
        self,
        ports: dict[str, dict[str, int]],
        members: dict[str, list[str]],
        shape: ClusterShape | None,
    ) -> Endpoints:
        host = procs.LOOPBACK

        def hp(component: str, key: str = "port") -> str:
            return ",".join(f"{host}:{ports[role][key]}" for role in members.get(component, []))

        redis_nodes = members.get("redis", [])
        return Endpoints(
            broker=self.settings.broker if "broker" in members else "",
            kafka_bootstrap=hp("broker"),
            # A cluster client learns the others from one node, but a client started while
            # that node is down would find none: every node is named.
            redis_url=(
                nodes_url(host, [ports[r]["port"] for r in redis_nodes]) if redis_nodes else ""
            ),
            triton_url=hp("triton"),
            triton_http=hp("triton", "http"),
            triton_metrics=hp("triton", "metrics"),
            redis_cluster=shape is not None and bool(redis_nodes),
            kafka_replication_factor=(
                shape.replication_factor if shape is not None and "broker" in members else 1
            ),
        )


def build_services(
    settings: Settings,
    *,
    stack_dir: Path,
    model_repo: Path,
    broker: str,
    ports: dict[str, dict[str, int]],
    cluster: ClusterShape | None = None,
) -> dict[str, Service]:
    """The stack's components for these ports (a part absent from ``ports`` gets port 0)."""

    def port(role: str, key: str = "port") -> int:
        return ports.get(role, {}).get(key, 0)

    if cluster is not None:
        return _cluster_services(
            settings,
            root=stack_dir / CLUSTER_DIR,
            model_repo=model_repo,
            ports=ports,
            shape=cluster,
            port=port,
        )

    redis = RedisServer(workdir=stack_dir / "redis", port=port("redis"))
    broker_service: Service
    if broker == "kafka":
        broker_service = KafkaBroker(
            workdir=stack_dir / "kafka",
            port=port("broker"),
            controller_port=port("broker", "controller"),
            heap=settings.kafka_heap,
            partitions=settings.topic_partitions,
        )
    elif broker == "tansu":
        broker_service = TansuBroker(workdir=stack_dir / "tansu", port=port("broker"))
    else:
        raise StackError(f"unknown broker {broker!r} (kafka or tansu)")
    triton = TritonServer(
        workdir=stack_dir / "triton",
        model_repo=model_repo,
        http_port=port("triton", "http"),
        grpc_port=port("triton"),
        metrics_port=port("triton", "metrics"),
        # Triton started without the stack's Redis talks to the configured one.
        redis_url=redis.url if "redis" in ports else settings.redis_url.get_secret_value(),
    )
    return {"broker": broker_service, "redis": redis, "triton": triton}


def _cluster_services(
    settings: Settings,
    *,
    root: Path,
    model_repo: Path,
    ports: dict[str, dict[str, int]],
    shape: ClusterShape,
    port: Callable[..., int],
) -> dict[str, Service]:
    """The cluster profile's nodes, each a single-node part with its own folder under ``root``."""
    services: dict[str, Service] = {}
    brokers = member_roles("broker", shape)
    voters = tuple((i, port(role, "controller")) for i, role in enumerate(brokers, 1))
    for i, role in enumerate(brokers, 1):
        services[role] = KafkaBroker(
            workdir=root / f"kafka-{i}",
            port=port(role),
            controller_port=port(role, "controller"),
            heap=shape.kafka_heap,
            partitions=settings.topic_partitions,
            node_id=i,
            voters=voters,
            cluster_id_file=root / "kafka.cluster-id",
            replication_factor=shape.replication_factor,
            min_insync=shape.min_insync,
        )
    redis_nodes = member_roles("redis", shape)
    for i, role in enumerate(redis_nodes, 1):
        services[role] = RedisServer(
            workdir=root / f"redis-{i}", port=port(role), cluster_bus_port=port(role, "bus")
        )
    seed = services[redis_nodes[0]]
    ours = redis_nodes[0] in ports and isinstance(seed, RedisServer)
    # Every node: a Triton whose item follower starts while one node is down still finds
    # the cluster through another.
    cluster_url = nodes_url(procs.LOOPBACK, [port(r) for r in redis_nodes])
    for i, role in enumerate(member_roles("triton", shape), 1):
        workdir = root / f"triton-{i}"
        services[role] = TritonServer(
            workdir=workdir,
            model_repo=model_repo,
            http_port=port(role, "http"),
            grpc_port=port(role),
            metrics_port=port(role, "metrics"),
            # Triton started without the cluster's Redis talks to the configured one.
            redis_url=cluster_url if ours else settings.redis_url.get_secret_value(),
            redis_cluster=True if ours else settings.redis_cluster,
            shm_prefix=shm_prefix_for(workdir),
        )
    return services


def nodes_url(host: str, ports: Sequence[int]) -> str:
    """The Redis URL naming every node (``redis://h:p1,h:p2/0``), so a client started while
    one node is down still finds the cluster."""
    return "redis://" + ",".join(f"{host}:{p}" for p in ports) + "/0"


def _first_metadata(ports: Sequence[int]) -> ClusterMetadata | None:
    """The cluster's metadata from the first broker that answers."""
    for port in ports:
        meta = describe_cluster(procs.LOOPBACK, port)
        if meta is not None:
            return meta
    return None


def kafka_cluster_report(brokers: dict[str, int], shape: ClusterShape) -> dict[str, Any]:
    """The Kafka cluster as its metadata says: ``brokers`` maps role -> client port.

    Node ids are the roles' numbers (``broker-2`` is node 2); partitions are
    listed by number, each with its leader's role (None while it has none).
    """
    meta = _first_metadata(list(brokers.values()))
    if meta is None:
        return {"kind": "kafka-cluster", "healthy": False, "error": "no broker answers"}
    return kafka_report_from(meta, shape)


def kafka_report_from(meta: ClusterMetadata, shape: ClusterShape) -> dict[str, Any]:
    def role(node_id: int) -> str | None:
        return f"broker-{node_id}" if node_id >= 0 else None

    leaders = {
        topic: [role(p.leader) for p in parts] for topic, parts in sorted(meta.topics.items())
    }
    under = {
        topic: [p.partition for p in parts if len(p.isr) < len(p.replicas)]
        for topic, parts in sorted(meta.topics.items())
    }
    offline = [t for t, ls in leaders.items() if None in ls]
    # No "controller": under KRaft the Metadata response names a random live broker as
    # the controller (clients cannot reach the quorum), so showing it would mislead.
    return {
        "kind": "kafka-cluster",
        "healthy": len(meta.brokers) == shape.kafka_nodes and not offline,
        "brokers": sorted(r for r in map(role, meta.brokers) if r is not None),
        "replication_factor": shape.replication_factor,
        "min_insync_replicas": shape.min_insync,
        "leaders": leaders,
        "under_replicated": {topic: ps for topic, ps in under.items() if ps},
    }


def redis_cluster_report(
    nodes: dict[str, int], shape: ClusterShape, report: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The Redis Cluster as its nodes say: ``nodes`` maps role -> port.

    Also notes in each node's entry of ``report`` whether it is a primary
    or a replica (roles change: a replica takes over a failed primary).
    """
    info = redis_cluster.cluster_info(list(nodes.values()))
    seen = redis_cluster.nodes(list(nodes.values()))
    if info is None or seen is None:
        return {"kind": "redis-cluster", "healthy": False, "error": "no node answers"}
    return redis_report_from(info, seen, nodes, shape, report)


def redis_report_from(
    info: dict[str, str],
    seen: Sequence[redis_cluster.ClusterNode],
    nodes: dict[str, int],
    shape: ClusterShape,
    report: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    by_port = {port: role for role, port in nodes.items()}
    by_id = {n.node_id: by_port.get(n.port, f"?:{n.port}") for n in seen}
    primaries: dict[str, dict[str, Any]] = {}
    for node in sorted(seen, key=lambda n: (n.slots or ((redis_cluster.HASH_SLOTS, 0),))[0]):
        role = by_id[node.node_id]
        if role in report:
            report[role]["cluster_role"] = "primary" if node.primary else "replica"
            report[role]["cluster_failed"] = node.failed
        if node.primary and node.slots:
            primaries[role] = {"slots": node.slot_ranges, "replicas": []}
    for node in seen:
        primary = by_id.get(node.primary_id or "")
        if not node.primary and primary in primaries:
            primaries[primary]["replicas"].append(by_id[node.node_id])
    return {
        "kind": "redis-cluster",
        "healthy": info.get("cluster_state") == "ok"
        and info.get("cluster_slots_ok") == str(redis_cluster.HASH_SLOTS),
        "state": info.get("cluster_state"),
        "slots_ok": int(info.get("cluster_slots_ok", 0)),
        "known_nodes": int(info.get("cluster_known_nodes", 0)),
        "primaries": primaries,
    }


def _recorded_shape(state: dict[str, Any]) -> ClusterShape | None:
    recorded = state.get("cluster")
    return ClusterShape(**recorded) if recorded else None


def _wait(service: Service, proc: procs.Proc, timeout_s: float, began: float) -> None:
    procs.wait_until(
        service.ready,
        timeout_s,
        f"{service.kind} on {service.endpoint}",
        service.log_path,
        proc=proc,
    )
    log.info("%s ready in %.1f s", service.kind, time.monotonic() - began)


def _check_components(components: Sequence[str]) -> list[str]:
    if isinstance(components, str):
        components = [components]
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise StackError(f"unknown components {unknown}; choose from {', '.join(COMPONENTS)}")
    return [c for c in COMPONENTS if c in components]


def _recorded(entry: dict[str, Any], role: str = "") -> procs.Proc:
    # Named by kind alone ("kafka"), or by role where there are several ("broker-2").
    name = role if role and role != component_of(role) else str(entry.get("kind", "?"))
    return procs.Proc.from_json(name, entry)


def _healthy(service: Service) -> bool:
    try:
        return service.ready()
    except StackError:
        return False


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
