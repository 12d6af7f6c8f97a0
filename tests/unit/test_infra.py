"""infra/ without services: config files, ports, processes, Triton's environment, state files."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import procs
from infra.kafka import metadata_broker_count, random_cluster_id, server_properties
from infra.redis_server import redis_conf
from infra.stack import Endpoints, Stack, format_env_file
from infra.triton import TritonServer, model_names, prepare_backends, python_tag, triton_env
from shoprec.errors import StackError
from shoprec.settings import Settings
from tests.kafka_answer import answering_once
from tests.stack import running


def props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")


def settings(stack_dir: Path, **overrides: object) -> Settings:
    return Settings(stack_dir=stack_dir, _env_file=None, **overrides)  # type: ignore[arg-type]


@pytest.fixture
def no_shoprec_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("SHOPREC_")]:
        monkeypatch.delenv(name)


# --- Kafka ---------------------------------------------------------------------------


def test_server_properties_make_one_loopback_node(tmp_path: Path) -> None:
    p = props(
        server_properties(port=9092, controller_port=9093, data_dir=tmp_path / "data", partitions=6)
    )
    assert p["process.roles"] == "broker,controller"
    assert p["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert p["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    assert p["controller.quorum.bootstrap.servers"] == "127.0.0.1:9093"
    assert p["controller.listener.names"] == "CONTROLLER"
    assert p["log.dirs"] == str(tmp_path / "data")
    assert p["num.partitions"] == "6"
    assert p["auto.create.topics.enable"] == "true"
    assert p["group.initial.rebalance.delay.ms"] == "0"
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor"):
        assert p[key] == "1"


def test_cluster_ids_look_like_kafkas() -> None:
    for _ in range(200):
        cid = random_cluster_id()
        assert len(cid) == 22 and not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16


@pytest.fixture
def fake_broker() -> Iterator[tuple[int, list[bytes]]]:
    """A socket answering one Metadata request with one broker, recording the request."""
    with answering_once(struct.pack(">ii", 0, 1) + b"\0" * 20) as served:
        yield served


def test_metadata_probe_speaks_the_kafka_protocol(fake_broker: tuple[int, list[bytes]]) -> None:
    port, seen = fake_broker
    assert metadata_broker_count("127.0.0.1", port) == 1
    api_key, api_version = struct.unpack(">hh", seen[0][:4])
    assert (api_key, api_version) == (3, 4)


def test_metadata_probe_says_none_when_nothing_answers() -> None:
    assert metadata_broker_count("127.0.0.1", procs.free_port(), timeout=0.2) is None
    with socket.create_server(("127.0.0.1", 0)) as mute:
        # Accepts (the backlog does) but never answers: the probe times out.
        assert metadata_broker_count("127.0.0.1", mute.getsockname()[1], timeout=0.2) is None


# --- Redis ---------------------------------------------------------------------------


def test_redis_conf_binds_loopback_and_saves_nothing(tmp_path: Path) -> None:
    odd_dir = tmp_path / 'with space "and quote"'
    conf = redis_conf(port=6390, data_dir=odd_dir).splitlines()
    assert "port 6390" in conf
    assert "bind 127.0.0.1" in conf
    assert "protected-mode yes" in conf
    assert 'save ""' in conf
    assert "appendonly no" in conf
    assert 'dir "' + str(odd_dir).replace('"', '\\"') + '"' in conf


# --- ports and processes -------------------------------------------------------------


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = procs.free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.create_server(("127.0.0.1", port)):
            pass


def test_port_open() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        assert procs.port_open("127.0.0.1", server.getsockname()[1])
    assert not procs.port_open("127.0.0.1", procs.free_port())


def test_tail_returns_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert procs.tail(log, 3) == "line 97\nline 98\nline 99"
    assert procs.tail(tmp_path / "missing.log") == ""


def test_start_logs_and_stop_kills_the_whole_group(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "svc.log"
    # The child ignores SIGTERM, as a wedged helper would: the group gets SIGKILL.
    script = "trap '' TERM; echo started; sh -c \"trap '' TERM; sleep 60\" & wait"
    proc = procs.start("svc", ["sh", "-c", script], log)
    procs.wait_until(lambda: len(procs.group_members(proc.pid)) >= 2, 5, "child", log)
    members = procs.group_members(proc.pid)
    assert procs.is_alive(proc)
    started = time.monotonic()
    procs.stop(proc, grace_s=0.5)
    assert time.monotonic() - started < 5
    assert not procs.is_alive(proc)
    assert procs.group_members(proc.pid) == []
    # Killed orphans may linger a moment as zombies until init reaps them.
    assert all(not running(pid) for pid in members)
    text = log.read_text()
    assert "starting svc" in text and "started" in text


def test_a_recycled_pid_is_not_ours(tmp_path: Path) -> None:
    proc = procs.start("svc", ["sleep", "30"], tmp_path / "svc.log")
    assert proc.start_time is not None
    stranger = procs.Proc("svc", proc.pid, proc.start_time + 1, proc.log_path)
    assert not procs.is_alive(stranger)
    assert not procs.owns_group(stranger)
    procs.stop_all([(stranger, 0.1)])  # must not signal it
    assert procs.is_alive(proc)
    procs.stop(proc)
    assert not procs.is_alive(proc)


def test_proc_round_trips_through_json(tmp_path: Path) -> None:
    proc = procs.Proc("kafka", 123, 456, tmp_path / "k.log")
    assert procs.Proc.from_json("kafka", json.loads(json.dumps(proc.to_json()))) == proc
    with pytest.raises(StackError):
        procs.Proc.from_json("kafka", {"pid": "x", "log": "y"})


def test_wait_until_reports_time_and_failures(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    log.write_text("boom: the reason\n")
    assert procs.wait_until(lambda: True, 1, "x", log) < 1
    with pytest.raises(StackError, match=r"(?s)not ready after.*boom: the reason"):
        procs.wait_until(lambda: False, 0.2, "svc on 1.2.3.4:5", log)
    dying = procs.start("svc", ["sh", "-c", "echo dying; exit 3"], log)
    started = time.monotonic()
    with pytest.raises(StackError, match=r"(?s)exited while starting.*dying"):
        procs.wait_until(lambda: False, 30, "svc", log, proc=dying)
    assert time.monotonic() - started < 5


# --- Triton --------------------------------------------------------------------------


def test_triton_env_puts_the_venv_and_pyenv_first(tmp_path: Path) -> None:
    base = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/opt/lib", "KEEP": "me"}
    env = triton_env(
        base,
        redis_url="redis://127.0.0.1:1/0",
        venv_bin=Path("/v/bin"),
        libpython_dir=Path("/pyenv/lib"),
        wheel_libs=Path("/site/nvidia_pytriton.libs"),
    )
    assert env["PATH"].split(os.pathsep) == ["/v/bin", "/usr/bin", "/bin"]
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [
        "/pyenv/lib",
        "/site/nvidia_pytriton.libs",
        "/opt/lib",
    ]
    assert env["SHOPREC_REDIS_URL"] == "redis://127.0.0.1:1/0"
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["KEEP"] == "me"
    assert base["PATH"] == "/usr/bin:/bin"  # the caller's mapping is untouched
    bare = triton_env(
        {},
        redis_url="r",
        venv_bin=Path("/v/bin"),
        libpython_dir=Path("/l"),
        wheel_libs=Path("/w"),
    )
    assert bare["PATH"] == "/v/bin" and bare["LD_LIBRARY_PATH"] == f"/l{os.pathsep}/w"


def test_triton_env_uses_this_interpreter(tmp_path: Path) -> None:
    server = TritonServer(tmp_path, tmp_path, 1, 2, 3, "redis://x")
    fake_server_dir = tmp_path / "site" / "pytriton" / "tritonserver"
    env = server.env(fake_server_dir, base={"PATH": "/bin"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.prefix) / "bin")
    ld = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert ld[0] == sysconfig.get_config_var("LIBDIR")
    assert ld[1] == str(tmp_path / "site" / "nvidia_pytriton.libs")


def test_triton_argv_binds_loopback_in_explicit_mode(tmp_path: Path) -> None:
    server = TritonServer(tmp_path / "w", tmp_path / "repo", 8000, 8001, 8002, "redis://x")
    argv = server.argv(tmp_path / "ts")
    assert argv[0] == str(tmp_path / "ts" / "bin" / "tritonserver")
    for flag in (
        f"--model-repository={tmp_path / 'repo'}",
        f"--backend-directory={tmp_path / 'w' / 'backends'}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        "--http-port=8000",
        "--grpc-port=8001",
        "--metrics-port=8002",
        "--model-control-mode=explicit",
        "--load-model=*",
        "--exit-on-error=false",
        "--strict-readiness=true",
    ):
        assert flag in argv
    assert server.endpoint == "127.0.0.1:8001"


def test_prepare_backends_copies_backend_and_stub_once(tmp_path: Path) -> None:
    server_dir = tmp_path / "tritonserver"
    (server_dir / "backends" / "python").mkdir(parents=True)
    (server_dir / "backends" / "python" / "libtriton_python.so").write_bytes(b"so")
    (server_dir / "backends" / "python" / "triton_python_backend_utils.py").write_text("")
    (server_dir / "backends" / "python" / "__pycache__").mkdir()
    stub_dir = server_dir / "python_backend_stubs" / python_tag()
    stub_dir.mkdir(parents=True)
    (stub_dir / "triton_python_backend_stub").write_bytes(b"stub")

    dest = prepare_backends(tmp_path / "backends", server_dir)
    python_dir = dest / "python"
    assert sorted(p.name for p in python_dir.iterdir()) == [
        "libtriton_python.so",
        "triton_python_backend_stub",
        "triton_python_backend_utils.py",
    ]
    stub = python_dir / "triton_python_backend_stub"
    before = stub.stat().st_ino, stub.stat().st_mtime_ns
    prepare_backends(tmp_path / "backends", server_dir)
    assert (stub.stat().st_ino, stub.stat().st_mtime_ns) == before

    (stub_dir / "triton_python_backend_stub").unlink()
    with pytest.raises(StackError, match="no python backend stub"):
        prepare_backends(tmp_path / "other", server_dir)


def test_model_names_are_the_visible_folders(tmp_path: Path) -> None:
    for name in ("item_encoder", "fused_ranker", ".hidden", "__pycache__"):
        (tmp_path / name).mkdir()
    (tmp_path / "README.md").write_text("")
    assert model_names(tmp_path) == ["fused_ranker", "item_encoder"]


# --- the stack's files ---------------------------------------------------------------


ENDPOINTS = Endpoints(
    broker="kafka",
    kafka_bootstrap="127.0.0.1:19092",
    redis_url="redis://127.0.0.1:16379/0",
    triton_url="127.0.0.1:18001",
    triton_http="127.0.0.1:18000",
    triton_metrics="127.0.0.1:18002",
)


def test_stack_env_lines() -> None:
    lines = format_env_file(ENDPOINTS).splitlines()
    assert lines[0].startswith("#")
    assert lines[1:] == [
        "SHOPREC_KAFKA_BOOTSTRAP=127.0.0.1:19092",
        "SHOPREC_REDIS_URL=redis://127.0.0.1:16379/0",
        "SHOPREC_TRITON_URL=127.0.0.1:18001",
    ]
    partial = Endpoints("tansu", "127.0.0.1:1", "", "", "", "")
    assert format_env_file(partial).splitlines()[1:] == ["SHOPREC_KAFKA_BOOTSTRAP=127.0.0.1:1"]


@pytest.mark.usefixtures("no_shoprec_env")
def test_settings_read_stack_env(tmp_path: Path) -> None:
    env_file = tmp_path / "stack.env"
    env_file.write_text(format_env_file(ENDPOINTS))
    s = Settings(_env_file=env_file)
    assert s.kafka_bootstrap == ENDPOINTS.kafka_bootstrap
    assert s.redis_url.get_secret_value() == ENDPOINTS.redis_url
    assert s.triton_url == ENDPOINTS.triton_url


def test_status_and_down_without_a_stack(tmp_path: Path) -> None:
    stack = Stack(settings(tmp_path / "s"))
    assert stack.status() == {}
    assert stack.endpoints() is None
    stack.down(wipe=True)  # nothing recorded: a no-op, not an error


def test_up_rejects_unknown_components(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="unknown components"):
        Stack(settings(tmp_path / "s")).up(components=("zookeeper",))


def test_up_refuses_a_taken_port_before_starting_anything(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        stack = Stack(settings(tmp_path / "s", redis_port=port))
        with pytest.raises(StackError, match=f"port {port} for redis is already in use"):
            stack.up(components=("redis",))
    assert not (tmp_path / "s" / "stack.json").exists()
    assert not (tmp_path / "s" / "redis").exists()


def test_up_refuses_while_a_recorded_stack_lives_and_down_stops_it(tmp_path: Path) -> None:
    stack_dir = tmp_path / "s"
    stack = Stack(settings(stack_dir))
    stand_in = procs.start("redis", ["sleep", "60"], stack_dir / "redis" / "redis.log")
    state = {
        "version": 1,
        "stack_dir": str(stack_dir),
        "model_repo": str(tmp_path),
        "broker": "kafka",
        "ready": True,
        "components": {
            "redis": {
                "kind": "redis",
                **stand_in.to_json(),
                "ports": {"port": 1},
                "endpoint": "redis://127.0.0.1:1/0",
            }
        },
        "endpoints": None,
    }
    (stack_dir / "stack.json").write_text(json.dumps(state))
    (stack_dir / "stack.env").write_text("SHOPREC_REDIS_URL=redis://127.0.0.1:1/0\n")

    with pytest.raises(StackError, match=rf"already running in .*redis \(pid {stand_in.pid}\)"):
        stack.up(components=("redis",))
    status = stack.status()
    assert status["redis"]["alive"] is True and status["redis"]["healthy"] is False

    stack.down(wipe=True)
    assert not procs.is_alive(stand_in)
    assert not (stack_dir / "stack.json").exists()
    assert not (stack_dir / "stack.env").exists()
    assert not (stack_dir / "redis").exists()


def test_a_stale_record_is_dropped(tmp_path: Path) -> None:
    stack_dir = tmp_path / "s"
    gone = procs.start("redis", ["true"], stack_dir / "x.log")
    procs.wait_until(lambda: not procs.is_alive(gone), 5, "exit")
    state = {
        "version": 1,
        "stack_dir": str(stack_dir),
        "model_repo": str(tmp_path),
        "broker": "kafka",
        "components": {"redis": {"kind": "redis", **gone.to_json(), "ports": {"port": 1}}},
    }
    (stack_dir / "stack.json").write_text(json.dumps(state))
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        # Gets past the stale record, then stops at the taken port: nothing starts.
        with pytest.raises(StackError, match="already in use"):
            Stack(settings(stack_dir, redis_port=port)).up(components=("redis",))
    assert not (stack_dir / "stack.json").exists()
