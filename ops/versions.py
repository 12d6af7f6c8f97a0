"""The ranker's versions: candidates outside the served repository, promotion, rollback, and
Triton's model control on every server.

Triton runs in explicit model-control mode with ``--load-model=*`` and the ranker's
``version_policy: latest 1`` (``infra/triton.py``, ``deploy/k8s/app/triton.yaml``): at
start, and at every load request, it serves the newest version folder it finds.  So the
served repository (``SHOPREC_MODEL_REPO``) holds only versions that were promoted, and
candidates are written elsewhere (``SHOPREC_MODEL_ARCHIVE``), never where a restarting
server would pick them up.  An explicit version policy sent with each load request would
also keep a candidate from being served, but only until a server restarts and reads
``config.pbtxt`` again; a repository that holds only promoted versions is right whatever
restarts.  Hence:

* a candidate is written to ``<archive>/<model>/<n>/`` (``n`` never reused: one more than
  any version in either place);
* promotion copies it into ``<repo>/<model>/.incoming-<n>`` and renames that to ``<n>``
  (atomic on one filesystem; Triton ignores folders that are not numbers), then asks every
  server to load the model: each serves ``n`` once loaded, the old version answering until
  then;
* rollback moves the newest served version back to the archive and asks every server to
  load again: the previous version is the newest again, also after any restart.

Every server: ``SHOPREC_TRITON_URL`` may list several ``host:port``, and a host name is
resolved to all its addresses (a Kubernetes headless Service names every Triton pod).
Each promotion, rejection and rollback is appended to ``<archive>/<model>/history.jsonl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tritonclient.grpc.aio as grpc_aio
from tritonclient.utils import InferenceServerException

from shoprec.errors import ConfigError, DependencyUnavailable, describe
from shoprec.settings import Settings

log = logging.getLogger("shoprec.versions")

CARD_FILE = "card.json"
HISTORY_FILE = "history.jsonl"
INCOMING = ".incoming-"


@dataclass(frozen=True)
class Versions:
    """The versions of one model: served (in Triton's repository) and archived."""

    repo: Path
    archive: Path
    model: str = "fused_ranker"

    @classmethod
    def from_settings(cls, settings: Settings) -> Versions:
        return cls(settings.model_repo, settings.model_archive, settings.ranker_model)

    @property
    def served_dir(self) -> Path:
        return self.repo / self.model

    @property
    def archive_dir(self) -> Path:
        return self.archive / self.model

    def served(self) -> list[int]:
        """Version numbers in the served repository, oldest first."""
        return _numbers(self.served_dir)

    def archived(self) -> list[int]:
        """Candidates and retired versions, oldest first."""
        return _numbers(self.archive_dir)

    def live(self) -> int | None:
        """What Triton serves under ``latest 1``: the newest served version."""
        served = self.served()
        return served[-1] if served else None

    def next_version(self) -> int:
        return max([0, *self.served(), *self.archived()]) + 1

    def folder(self, n: int) -> Path:
        """Where version ``n`` is now (served first)."""
        for base in (self.served_dir, self.archive_dir):
            if (base / str(n)).is_dir():
                return base / str(n)
        raise ConfigError(
            f"no version {n} of {self.model} in {self.served_dir} or {self.archive_dir} "
            "(`shoprec model list` shows the versions)"
        )

    def card(self, n: int) -> dict[str, Any] | None:
        path = self.folder(n) / CARD_FILE
        return dict(json.loads(path.read_text())) if path.is_file() else None

    def candidate_dir(self, n: int) -> Path:
        return self.archive_dir / str(n)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time (the learner, a CLI promotion or rollback)."""
        self.archive_dir.mkdir(parents=True, exist_ok=True)
        with open(self.archive_dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def promote(self, n: int) -> Path:
        """Move candidate ``n`` into the served repository (it is the newest served after)."""
        src = self.candidate_dir(n)
        if not src.is_dir():
            raise ConfigError(f"version {n} is not a candidate in {self.archive_dir}")
        newest = self.live()
        if newest is not None and n < newest:
            raise ConfigError(
                f"version {n} is older than the live version {newest}: Triton serves the "
                "newest folder, so it could never be live. Retrain, or roll back first."
            )
        staging = self.served_dir / f"{INCOMING}{n}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(src, staging, ignore=shutil.ignore_patterns("__pycache__"))
        os.replace(staging, self.served_dir / str(n))
        shutil.rmtree(src)
        return self.served_dir / str(n)

    def retire(self, n: int) -> Path:
        """Move served version ``n`` back to the archive (never served again unless promoted)."""
        src = self.served_dir / str(n)
        if not src.is_dir():
            raise ConfigError(f"version {n} is not in the served repository {self.served_dir}")
        dst = self.archive_dir / str(n)
        self.archive_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.rmtree(src)
        return dst

    def record(self, entry: dict[str, Any]) -> None:
        """Append one decision (promoted, rejected, rolled back) to the history."""
        self.archive_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"ts": time.time(), **entry}, sort_keys=True)
        with open(self.archive_dir / HISTORY_FILE, "a") as fh:
            fh.write(line + "\n")

    def history(self) -> list[dict[str, Any]]:
        path = self.archive_dir / HISTORY_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _numbers(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


# --- model control on every server ------------------------------------------------------------


def triton_endpoints(urls: str) -> list[str]:
    """Every server behind ``SHOPREC_TRITON_URL``: each comma-separated ``host:port``, the
    host resolved to all its addresses (a headless Service resolves to every pod)."""
    out: list[str] = []
    for url in filter(None, (u.strip() for u in urls.split(","))):
        host, sep, port = url.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"SHOPREC_TRITON_URL entry {url!r} is not host:port")
        try:
            infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            raise DependencyUnavailable(f"cannot resolve Triton host {host!r}: {exc}") from exc
        for family, *_, addr in infos:
            ip = str(addr[0])
            endpoint = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
            if endpoint not in out:
                out.append(endpoint)
    return out


async def served_version(endpoint: str, model: str, timeout_s: float = 10.0) -> int | None:
    """The version of ``model`` a server has ready (the newest when several are)."""
    client = grpc_aio.InferenceServerClient(endpoint)
    try:
        index = await client.get_model_repository_index(as_json=True, client_timeout=timeout_s)
    finally:
        await client.close()
    ready = [
        int(m["version"])
        for m in index.get("models", [])
        if m.get("name") == model and m.get("state") == "READY" and str(m.get("version")).isdigit()
    ]
    return max(ready) if ready else None


async def load_everywhere(
    urls: str, model: str, expect: int | None, timeout_s: float = 300.0
) -> dict[str, str]:
    """Ask every server to load ``model`` (its newest version) and check it serves
    ``expect``; returns ``{endpoint: problem}`` for the servers where that failed."""
    endpoints = triton_endpoints(urls)
    problems = await asyncio.gather(*(_load_one(e, model, expect, timeout_s) for e in endpoints))
    return {e: p for e, p in zip(endpoints, problems, strict=True) if p}


async def reconcile(urls: str, model: str, live: int) -> dict[str, str]:
    """Ask the servers that do not serve ``live`` (a restart or an outage during a
    promotion) to load again; returns the servers still not serving it."""
    endpoints = triton_endpoints(urls)

    async def one(endpoint: str) -> str:
        try:
            if await served_version(endpoint, model) == live:
                return ""
        except Exception as exc:
            return f"unreachable: {describe(exc)}"
        return await _load_one(endpoint, model, live, 300.0)

    problems = await asyncio.gather(*(one(e) for e in endpoints))
    return {e: p for e, p in zip(endpoints, problems, strict=True) if p}


async def _load_one(endpoint: str, model: str, expect: int | None, timeout_s: float) -> str:
    client = grpc_aio.InferenceServerClient(endpoint)
    try:
        await client.load_model(model, client_timeout=timeout_s)
    except InferenceServerException as exc:
        return f"load failed: {exc.message()}"
    except Exception as exc:  # unreachable server: the next cycle tries again
        return f"load failed: {describe(exc)}"
    finally:
        await client.close()
    try:
        got = await served_version(endpoint, model)
    except Exception as exc:
        return f"version check failed: {describe(exc)}"
    if expect is not None and got != expect:
        return f"serves version {got}, expected {expect}"
    return ""
