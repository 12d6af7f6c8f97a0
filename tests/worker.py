"""``shoprec worker`` in a subprocess, as the integration and fault tests run it.

Each worker gets its Prometheus endpoint on a free port (unless its settings name one),
and the tests read its counters there, never from a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from infra import procs
from shoprec.settings import Settings
from streams.observability import scrape

# The worker logs this once its counters are final (consumer stopped, batches done).
FINAL_MARK = "final stats"


class WorkerProcess:
    """``shoprec worker`` as a subprocess, as in production, with its metrics endpoint on
    a free port (or the settings' own), where the test reads its counters."""

    def __init__(self, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None):
        self.log_path = log_path
        port = settings.metrics_port or procs.free_port()
        self.metrics_url = f"http://{settings.metrics_host}:{port}/metrics"
        own = settings.model_copy(update={"metrics_port": port})
        env = {**os.environ, **own.as_env(), **(extra_env or {})}
        self._log = log_path.open("ab")
        self._offset = log_path.stat().st_size
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log_path.parent,
            start_new_session=True,
        )

    def log(self) -> str:
        with self.log_path.open("rb") as fh:
            fh.seek(self._offset)
            return fh.read().decode(errors="replace")

    def tail(self, n: int = 6000) -> str:
        return self.log()[-n:]

    async def wait_for(self, text: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker did not log {text!r}:\n{self.tail()}")
            await asyncio.sleep(0.2)

    async def ready(self) -> WorkerProcess:
        await self.wait_for("Worker ready")
        return self

    def counters(self) -> dict[str, Any]:
        """The worker's counters now, from its metrics endpoint."""
        return scrape(self.metrics_url)

    def stop(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """SIGTERM, wait, and return the worker's final counters.

        They are read from the metrics endpoint once the worker has logged its final
        stats: by then its consumer has stopped and every batch it took is done (it may
        finish batches after the signal), so they no longer change; the endpoint answers
        until the process exits."""
        final: dict[str, Any] | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while self.proc.poll() is None:
                if final is None and FINAL_MARK in self.log():
                    with contextlib.suppress(OSError):
                        final = self.counters()
                if time.monotonic() > deadline:
                    self.kill()
                    raise AssertionError(f"worker did not stop in {timeout_s} s:\n{self.tail()}")
                time.sleep(0.02)
        self._log.close()
        if final is None:
            raise AssertionError(f"no final counters read from {self.metrics_url}:\n{self.tail()}")
        return final

    def close(self) -> None:
        """Stop the worker if it still runs, whatever state it is in (for clean-ups)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def kill(self) -> None:
        """SIGKILL the worker's whole process group: no shutdown, no commit, no flush."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()
