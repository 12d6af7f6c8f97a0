"""The local stack: a broker (Apache Kafka or Tansu), Redis and Triton on loopback.

``Stack.up`` starts the parts, waits until each answers, and records them in
``<stack_dir>/stack.json`` (pids, ports, logs) and ``<stack_dir>/stack.env``
(the ``SHOPREC_*`` endpoints, which ``Settings`` reads as a fallback).  Any
later process pointed at the same stack directory can ask for ``status`` or
bring it ``down``; nothing is kept in memory between calls.

Layout of the stack directory::

    stack.json  stack.env  .lock
    kafka/   server.properties  data/  kafka.log     (data survives down/up)
    tansu/   tansu.log
    redis/   redis.conf  redis.log
    triton/  backends/python/  triton.log
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from infra import procs
from infra.kafka import KafkaBroker
from infra.redis_server import RedisServer
from infra.tansu import TansuBroker
from infra.triton import TritonServer, shm_regions
from shoprec.errors import StackError
from shoprec.settings import Settings

log = logging.getLogger("shoprec.infra")

COMPONENTS: tuple[str, ...] = ("broker", "redis", "triton")
DEFAULT_MODEL_REPO = Path(__file__).resolve().parent.parent / "model_repo"
STATE_FILE = "stack.json"
ENV_FILE = "stack.env"
_STATE_VERSION = 1
# Subfolders `down --wipe` removes; anything else in the stack dir is not ours.
_COMPONENT_DIRS = ("kafka", "tansu", "redis", "triton")


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
    kafka_bootstrap: str  # host:port
    redis_url: str  # redis://host:port/0
    triton_url: str  # gRPC host:port
    triton_http: str  # host:port
    triton_metrics: str  # host:port (Prometheus text at /metrics)

    def env(self) -> dict[str, str]:
        """The ``SHOPREC_*`` variables that point shoprec at this stack."""
        pairs = {
            "SHOPREC_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "SHOPREC_REDIS_URL": self.redis_url,
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
        self.env_path = self.stack_dir / ENV_FILE

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

    def up(self, components: Sequence[str] = COMPONENTS, timeout_s: float = 180.0) -> Endpoints:
        """Start ``components``, wait until each is ready, record and return the endpoints.

        Raises StackError when a stack recorded in this directory still runs,
        when a fixed port is taken, or when a part does not become ready
        within ``timeout_s`` (counted per part from its start); whatever was
        started is stopped again before the error propagates.
        """
        wanted = _check_components(components)
        with self._locked():
            self._refuse_if_running()
            ports = self._resolve_ports(wanted)
            services = self._services(self.settings.broker, ports)
            state = self._new_state()
            started: dict[str, procs.Proc] = {}
            began: dict[str, float] = {}

            def start(role: str) -> None:
                began[role] = time.monotonic()
                started[role] = self._start(role, services[role], state)

            def wait(role: str) -> None:
                left = max(0.0, began[role] + timeout_s - time.monotonic())
                _wait(services[role], started[role], left, began[role])

            try:
                # Redis first, and ready before Triton starts: models may
                # connect to it while they initialise.  It takes milliseconds.
                if "redis" in wanted:
                    start("redis")
                    wait("redis")
                # Triton and the broker take seconds each; start both, then wait.
                for role in ("triton", "broker"):
                    if role in wanted:
                        start(role)
                for role in ("broker", "triton"):
                    if role in wanted:
                        wait(role)
            except BaseException:
                self._stop({role: (services[role], proc) for role, proc in started.items()})
                self.state_path.unlink(missing_ok=True)
                raise
            endpoints = self._endpoints(ports, wanted)
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
                    role: (self._service(role, state), _recorded(entry))
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
        """Per recorded component: kind, pid, port, endpoint, alive, healthy, log."""
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
            self._stop({role: (service, _recorded(entry))})

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

    def _resolve_ports(self, wanted: Sequence[str]) -> dict[str, dict[str, int]]:
        s = self.settings
        asked: dict[str, dict[str, tuple[int, str]]] = {
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
            asked["broker"]["controller"] = (0, "")
        needed = [(role, key) for role in wanted for key in asked[role]]
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

    def _services(self, broker: str, ports: dict[str, dict[str, int]]) -> dict[str, Service]:
        return build_services(
            self.settings,
            stack_dir=self.stack_dir,
            model_repo=self.model_repo,
            broker=broker,
            ports=ports,
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
        )
        if role not in services:
            raise StackError(f"unknown component {role!r} in {self.state_path}")
        return services[role]

    def _new_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "stack_dir": str(self.stack_dir),
            "model_repo": str(self.model_repo),
            "broker": self.settings.broker,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "ready": False,
            "components": {},
            "endpoints": None,
        }

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
            if service.kind == "triton":
                leftovers += shm_regions(proc)
        procs.stop_all([(proc, service.grace_s) for service, proc in running.values()])
        for path in leftovers:
            path.unlink(missing_ok=True)

    def _endpoints(self, ports: dict[str, dict[str, int]], wanted: Sequence[str]) -> Endpoints:
        host = procs.LOOPBACK

        def hp(role: str, key: str = "port") -> str:
            return f"{host}:{ports[role][key]}" if role in wanted else ""

        return Endpoints(
            broker=self.settings.broker if "broker" in wanted else "",
            kafka_bootstrap=hp("broker"),
            redis_url=f"redis://{host}:{ports['redis']['port']}/0" if "redis" in wanted else "",
            triton_url=hp("triton"),
            triton_http=hp("triton", "http"),
            triton_metrics=hp("triton", "metrics"),
        )


def build_services(
    settings: Settings,
    *,
    stack_dir: Path,
    model_repo: Path,
    broker: str,
    ports: dict[str, dict[str, int]],
) -> dict[str, Service]:
    """The stack's components for these ports (a part absent from ``ports`` gets port 0)."""

    def port(role: str, key: str = "port") -> int:
        return ports.get(role, {}).get(key, 0)

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


def _recorded(entry: dict[str, Any]) -> procs.Proc:
    return procs.Proc.from_json(str(entry.get("kind", "?")), entry)


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
