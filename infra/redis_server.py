"""A throwaway Redis on loopback: no persistence, state lives as long as the process."""

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


def redis_conf(*, port: int, data_dir: Path) -> str:
    """The server's config file; the feature store rebuilds from Kafka, so nothing is saved."""
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
    """redis-server in ``workdir``: redis.conf and redis.log."""

    workdir: Path
    port: int

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

    def ports(self) -> dict[str, int]:
        return {"port": self.port}

    def start(self) -> procs.Proc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(redis_conf(port=self.port, data_dir=self.workdir))
        return procs.start(
            self.kind, [redis_binary(), str(self.config_path)], self.log_path, cwd=self.workdir
        )

    def ready(self) -> bool:
        return ping(procs.LOOPBACK, self.port)
