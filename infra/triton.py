"""Triton Inference Server from the nvidia-pytriton wheel, python backend only.

What makes the wheel's server work outside PyTriton (measured, see
``../shared/notes/triton-on-cpu.md``):

* the python-backend stub ignores PYTHONPATH: it runs the first ``python3``
  on PATH, so this venv's ``bin`` goes first and models import whatever the
  venv holds (shoprec itself is installed editable);
* pyenv's libpython goes first on LD_LIBRARY_PATH, or the stub loads
  Debian's libpython 3.11.2 against pyenv's 3.11.7 standard library;
* the stub is copied out of the wheel, so its ``$ORIGIN`` RPATH no longer
  finds ``nvidia_pytriton.libs``: that folder goes on LD_LIBRARY_PATH too;
* the server binary runs in place, where its own RPATH works.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from infra import procs
from shoprec.errors import StackError

SHM_DIR = Path("/dev/shm")
_SHM_PREFIX = "triton_python_backend_shm_region_"


def pytriton_server_dir() -> Path:
    """``site-packages/pytriton/tritonserver`` of the installed wheel (without importing it)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("nvidia-pytriton is not installed: it provides tritonserver")
    server_dir = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (server_dir / "bin" / "tritonserver").is_file():
        raise StackError(f"no tritonserver binary under {server_dir}")
    return server_dir


def wheel_libs_dir(server_dir: Path) -> Path:
    """The wheel's bundled shared libraries (auditwheel's ``nvidia_pytriton.libs``)."""
    return server_dir.parent.parent / "nvidia_pytriton.libs"


def python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def prepare_backends(dest: Path, server_dir: Path) -> Path:
    """A backend directory holding the python backend and this Python's stub.

    Files are copied only when missing or changed, so repeated ``up`` calls
    do not rewrite them under a server that might be reading them.
    """
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    stub = server_dir / "python_backend_stubs" / python_tag() / "triton_python_backend_stub"
    if not stub.is_file():
        raise StackError(f"the pytriton wheel has no python backend stub for Python {python_tag()}")
    sources = [p for p in (server_dir / "backends" / "python").iterdir() if p.is_file()]
    for src in [*sources, stub]:
        target = python_dir / src.name
        st = src.stat()
        if target.exists():
            tt = target.stat()
            if tt.st_size == st.st_size and tt.st_mtime == st.st_mtime:
                continue
        shutil.copy2(src, target)
    return dest


def triton_env(
    base: Mapping[str, str],
    *,
    redis_url: str,
    venv_bin: Path,
    libpython_dir: Path,
    wheel_libs: Path,
    redis_cluster: bool = False,
) -> dict[str, str]:
    """The server's environment: the caller's, with the venv and its libraries first."""
    env = dict(base)
    env["PATH"] = os.pathsep.join(
        [str(venv_bin), *(p for p in base.get("PATH", "").split(os.pathsep) if p)]
    )
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [
            str(libpython_dir),
            str(wheel_libs),
            *(p for p in base.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p),
        ]
    )
    env["SHOPREC_REDIS_URL"] = redis_url
    if redis_cluster:
        env["SHOPREC_REDIS_CLUSTER"] = "true"
    # Models load their weights from installed packages; never wait on the Hub.
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def venv_bin_dir() -> Path:
    """The ``bin`` of the running interpreter's environment (the venv when in one)."""
    return Path(sys.prefix) / "bin"


def libpython_dir() -> Path:
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir:
        raise StackError("this Python does not say where its libpython lives (LIBDIR)")
    return Path(str(libdir))


def model_names(model_repo: Path) -> list[str]:
    """The models Triton will find in ``model_repo``: its visible subfolders."""
    return sorted(
        p.name for p in model_repo.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
    )


def _http_get(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def _repository_index(http: str, timeout: float = 2.0) -> list[dict[str, str]]:
    req = urllib.request.Request(f"http://{http}/v2/repository/index", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read())
    except (OSError, ValueError):
        return []
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []


def shm_regions(proc: procs.Proc, prefix: str = _SHM_PREFIX) -> list[Path]:
    """Shared-memory files the server's stubs hold (their names are on their command lines).

    A SIGTERMed server removes them; one that had to be SIGKILLed leaves
    them in /dev/shm, so they are noted before stopping and removed after.
    """
    regions = []
    for pid in procs.group_members(proc.pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in args:
            name = arg.decode(errors="replace")
            if name.startswith(prefix) and "/" not in name:
                regions.append(SHM_DIR / name)
    return regions


def shm_prefix_for(workdir: Path) -> str:
    """A shared-memory prefix of the server in ``workdir``, unlike any other server's.

    Two servers with one prefix can still run (the python backend adds a
    random suffix since 24.04), but a prefix of its own makes every region
    in /dev/shm attributable to one server, so one that was SIGKILLed, or
    crashed before ``down`` could read its stubs' command lines, is cleaned up too.
    """
    digest = hashlib.sha256(str(workdir.resolve()).encode()).hexdigest()[:12]
    return f"shoprec_{digest}_"


@dataclass(frozen=True)
class TritonServer:
    """tritonserver serving ``model_repo``; ``workdir`` holds backends/ and triton.log."""

    workdir: Path
    model_repo: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    redis_url: str
    redis_cluster: bool = False
    # The python backend's shared-memory prefix; None keeps Triton's default.
    shm_prefix: str | None = None

    kind = "triton"
    # The server waits up to --exit-timeout-secs for in-flight requests, then
    # unloads models (about 5 s for torch models); SIGKILL only after that.
    exit_timeout_s = 10
    grace_s = 30.0

    @property
    def endpoint(self) -> str:
        """The gRPC endpoint (what shoprec's clients use)."""
        return f"{procs.LOOPBACK}:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"{procs.LOOPBACK}:{self.http_port}"

    @property
    def metrics(self) -> str:
        return f"{procs.LOOPBACK}:{self.metrics_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "triton.log"

    @property
    def backend_dir(self) -> Path:
        return self.workdir / "backends"

    def ports(self) -> dict[str, int]:
        return {"port": self.grpc_port, "http": self.http_port, "metrics": self.metrics_port}

    def argv(self, server_dir: Path) -> list[str]:
        host = procs.LOOPBACK
        return [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={self.model_repo}",
            f"--backend-directory={self.backend_dir}",
            f"--http-address={host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={host}",
            f"--metrics-port={self.metrics_port}",
            # Explicit control loads everything now and lets callers load new
            # versions later (client.load_model) without a restart.
            "--model-control-mode=explicit",
            "--load-model=*",
            # One broken model must not take the others down; readiness
            # reports it instead.
            "--exit-on-error=false",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            *(
                [f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]
                if self.shm_prefix
                else []
            ),
        ]

    def env(self, server_dir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
        return triton_env(
            os.environ if base is None else base,
            redis_url=self.redis_url,
            venv_bin=venv_bin_dir(),
            libpython_dir=libpython_dir(),
            wheel_libs=wheel_libs_dir(server_dir),
            redis_cluster=self.redis_cluster,
        )

    def shm_regions(self, proc: procs.Proc) -> list[Path]:
        """The shared-memory files of this server: those its stubs hold and, with a
        prefix of its own, any left in /dev/shm by an earlier run that died."""
        regions = shm_regions(proc, self.shm_prefix or _SHM_PREFIX)
        if self.shm_prefix:
            regions += [p for p in SHM_DIR.glob(f"{self.shm_prefix}*") if p not in regions]
        return regions

    def start(self) -> procs.Proc:
        if not self.model_repo.is_dir():
            raise StackError(f"Triton model repository {self.model_repo} does not exist")
        server_dir = pytriton_server_dir()
        self.workdir.mkdir(parents=True, exist_ok=True)
        prepare_backends(self.backend_dir, server_dir)
        return procs.start(
            self.kind,
            self.argv(server_dir),
            self.log_path,
            env=self.env(server_dir),
            cwd=self.workdir,
        )

    def ready(self) -> bool:
        """Server ready and every model of the repository ready.

        Triton loads the start-up models before it opens its HTTP port, so
        a model that is not ready once the server is live has failed to
        load: that raises StackError at once instead of waiting out the
        timeout.  (With strict readiness such a failure also keeps
        ``/v2/health/ready`` at 400 for good.)
        """
        if _http_get(f"http://{self.http}/v2/health/live") != 200:
            return False
        for name in model_names(self.model_repo):
            if _http_get(f"http://{self.http}/v2/models/{name}/ready") == 200:
                continue
            states = [m for m in _repository_index(self.http) if m.get("name") == name]
            failed = [m for m in states if m.get("state") == "UNAVAILABLE"]
            if failed:
                reason = (failed[0].get("reason") or "no reason given").strip()
                raise StackError(
                    f"Triton could not load model {name!r}: {reason}"
                    f"\n--- last {procs.LOG_TAIL_LINES} lines of {self.log_path} ---\n"
                    f"{procs.tail(self.log_path)}"
                )
            return False
        return _http_get(f"http://{self.http}/v2/health/ready") == 200
