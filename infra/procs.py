"""Start, watch and stop the local stack's processes (Linux: reads /proc).

Every service runs in a session of its own, so its process-group id is its
pid: stopping signals the whole group, which also reaches the helpers a
service forks (Triton's python-backend stubs).  A process is identified by
its pid *and* its start time, so a pid recycled by the kernel after the
stack died is never signalled by a later ``shoprec stack down``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from shoprec.errors import StackError

log = logging.getLogger("shoprec.infra")

LOOPBACK = "127.0.0.1"
LOG_TAIL_LINES = 30

# The services this process started: an exited one stays a zombie, still
# "in" its group, until its parent reaps it, so stopping polls these.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class Proc:
    """A started service process: enough to find and stop it from any process."""

    name: str
    pid: int
    start_time: int | None
    log_path: Path

    def to_json(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "start_time": self.start_time,
            "log": str(self.log_path),
        }

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, object]) -> Proc:
        pid = data["pid"]
        start_time = data.get("start_time")
        if not isinstance(pid, int) or not (start_time is None or isinstance(start_time, int)):
            raise StackError(f"stack state for {name} is corrupt: {dict(data)!r}")
        return cls(name=name, pid=pid, start_time=start_time, log_path=Path(str(data["log"])))


def start(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """Start ``argv`` in a new session, appending its stdout and stderr to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        out.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        out.flush()
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise StackError(f"could not start {name} ({argv[0]}): {exc}") from exc
    _CHILDREN[popen.pid] = popen
    return Proc(name=name, pid=popen.pid, start_time=start_time_of(popen.pid), log_path=log_path)


def start_time_of(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if unknown."""
    stat = _read_stat(pid)
    return int(stat[19]) if stat is not None else None


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; it ends at the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def _reap(pid: int) -> None:
    # Only our own Popen children: a bare waitpid could steal the exit status
    # of a child someone else in this process started.
    popen = _CHILDREN.get(pid)
    if popen is not None and popen.poll() is not None:
        del _CHILDREN[pid]


def is_alive(proc: Proc) -> bool:
    """Whether the process still runs (a zombie or a recycled pid does not count)."""
    _reap(proc.pid)
    stat = _read_stat(proc.pid)
    if stat is None or stat[0] == "Z":
        return False
    return proc.start_time is None or int(stat[19]) == proc.start_time


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read_stat(int(entry.name))
        if stat is not None and stat[0] != "Z" and int(stat[2]) == pgid:
            members.append(int(entry.name))
    return members


def owns_group(proc: Proc) -> bool:
    """Whether process group ``proc.pid`` still holds processes that are ours.

    The leader may be gone while its children live on (a crashed tritonserver
    leaves its stubs); the kernel never hands out a pid that is still some
    group's id, so members of a leaderless group are ours.  A live leader
    with another start time is a stranger that got the recycled pid.
    """
    _reap(proc.pid)
    stat = _read_stat(proc.pid)
    if stat is not None and stat[0] != "Z":
        return proc.start_time is None or int(stat[19]) == proc.start_time
    return bool(group_members(proc.pid))


def _group_gone(proc: Proc) -> bool:
    _reap(proc.pid)
    return not group_members(proc.pid)


def _signal_group(proc: Proc, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def stop(proc: Proc, grace_s: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it outlives ``grace_s``."""
    stop_all([(proc, grace_s)])


def stop_all(targets: Sequence[tuple[Proc, float]]) -> None:
    """Stop several process groups at once, so their shutdowns overlap.

    Each gets SIGTERM, then SIGKILL once its grace period is over; returns
    when no process of any group is left.
    """
    began = time.monotonic()
    # (process, deadline of the current signal, whether SIGKILL was sent)
    pending: list[tuple[Proc, float, bool]] = []
    for proc, grace_s in targets:
        if not owns_group(proc):
            continue
        log.info("stopping %s (pid %d)", proc.name, proc.pid)
        _signal_group(proc, signal.SIGTERM)
        pending.append((proc, began + grace_s, False))
    while pending:
        still = []
        for proc, deadline, killed in pending:
            if _group_gone(proc):
                log.info("%s stopped in %.1f s", proc.name, time.monotonic() - began)
                continue
            if time.monotonic() >= deadline:
                if killed:
                    raise StackError(f"{proc.name} (process group {proc.pid}) survived SIGKILL")
                log.warning("%s (pid %d) outlived SIGTERM; killing it", proc.name, proc.pid)
                _signal_group(proc, signal.SIGKILL)
                deadline, killed = time.monotonic() + 10.0, True
            still.append((proc, deadline, killed))
        pending = still
        if pending:
            time.sleep(0.05)


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    log_path: Path | None = None,
    *,
    proc: Proc | None = None,
    interval: float = 0.1,
) -> float:
    """Poll ``predicate`` until it holds; return the seconds it took.

    Raises StackError with the tail of ``log_path`` on timeout, or at once
    when ``proc`` exits, since waiting out the timeout then only wastes time.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        if predicate():
            return time.monotonic() - started
        if proc is not None and not is_alive(proc):
            raise StackError(f"{what}: {proc.name} exited while starting" + _tail_note(log_path))
        if time.monotonic() >= deadline:
            raise StackError(f"{what}: not ready after {timeout:.0f} s" + _tail_note(log_path))
        time.sleep(interval)


def _tail_note(log_path: Path | None) -> str:
    if log_path is None:
        return ""
    return f"\n--- last {LOG_TAIL_LINES} lines of {log_path} ---\n{tail(log_path)}"


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def memory_mb(pid: int, field: str = "VmRSS") -> float | None:
    """A memory field of ``/proc/<pid>/status`` in MiB (``VmRSS``: resident now, ``VmHWM``:
    its peak so far); None once the process is gone, or where the field is absent."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return None


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """``n`` distinct free ports; the sockets stay bound until all are chosen."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
