"""What the tests need around a private local stack: its settings, and whether a pid runs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from shoprec.settings import Settings


def stack_settings(stack_dir: Path, broker: Literal["kafka", "tansu"] = "kafka") -> Settings:
    """A stack kept in ``stack_dir`` on ports the OS assigns, whatever a developer's
    environment or ``.shoprec/stack.env`` says."""
    return Settings(
        stack_dir=stack_dir,
        broker=broker,
        kafka_port=0,
        redis_port=0,
        triton_http_port=0,
        triton_grpc_port=0,
        triton_metrics_port=0,
        _env_file=None,
    )


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
