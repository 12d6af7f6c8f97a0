"""The real local stack: Redis, Apache Kafka, Tansu and Triton on loopback.

Triton serves a throwaway python-backend model generated here (not the
project's model_repo/), which reports what its stub process sees: the venv,
the editable shoprec, SHOPREC_REDIS_URL and the offline flags.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from infra import procs
from infra.stack import Endpoints, Stack
from shoprec.errors import StackError
from shoprec.settings import Settings
from tests.stack import running, stack_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO_ROOT = Path(__file__).resolve().parents[2]

PROBE_CONFIG = """\
backend: "python"
max_batch_size: 8
input [ {{ name: "x", data_type: TYPE_FP32, dims: [ 4 ] }} ]
output [ {{ name: "y", data_type: TYPE_FP32, dims: [ 4 ] }} ]
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
parameters {{ key: "probe_out" value: {{ string_value: "{probe_out}" }} }}
"""

PROBE_MODEL = """\
import json
import os
import sys

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        {init}
        import infra
        import shoprec

        config = json.loads(args["model_config"])
        out = config["parameters"]["probe_out"]["string_value"]
        info = {{
            "prefix": sys.prefix,
            "shoprec": shoprec.__file__,
            "infra": infra.__file__,
            "redis_url": os.environ.get("SHOPREC_REDIS_URL"),
            "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
            "transformers_offline": os.environ.get("TRANSFORMERS_OFFLINE"),
        }}
        with open(out, "w") as f:
            json.dump(info, f)

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x * 2)]))
        return responses
"""


def write_model_repo(root: Path, probe_out: Path, *, broken: bool = False) -> Path:
    """A repository with one trivial python model ("probe" or "broken")."""
    name = "broken" if broken else "probe"
    init = 'raise RuntimeError("deliberately broken model")' if broken else "pass"
    model_dir = root / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(PROBE_CONFIG.format(probe_out=probe_out))
    (model_dir / "1" / "model.py").write_text(PROBE_MODEL.format(init=init))
    return root


def processes_mentioning(text: str) -> list[int]:
    """Live pids whose command line contains ``text`` (the stack dir is in every one)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and running(int(entry.name)):
            found.append(int(entry.name))
    return found


async def produce(bootstrap: str, topic: str, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"user-1")
    finally:
        await producer.stop()


async def consume_until(bootstrap: str, topic: str, value: bytes, timeout_s: float = 20.0) -> bool:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            if any(m.value == value for msgs in batches.values() for m in msgs):
                return True
        return False
    finally:
        await consumer.stop()


def infer_probe(http: str) -> list[float]:
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    req = urllib.request.Request(
        f"http://{http}/v2/models/probe/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        out = json.loads(resp.read())
    return [float(v) for v in out["outputs"][0]["data"]]


@dataclass
class Running:
    stack: Stack
    endpoints: Endpoints
    root: Path
    probe_out: Path


@pytest.fixture(scope="module")
def kafka_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("kafka-stack")
    probe_out = root / "probe.json"
    repo = write_model_repo(root / "models", probe_out)
    stack = Stack(stack_settings(root / "stack"), model_repo=repo)
    endpoints = stack.up(timeout_s=120)
    try:
        yield Running(stack, endpoints, root, probe_out)
    finally:
        stack.down()
        assert processes_mentioning(str(root)) == []


def test_every_part_is_up_and_recorded(
    kafka_stack: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    ep = kafka_stack.endpoints
    assert ep.broker == "kafka"
    status = kafka_stack.stack.status()
    assert set(status) == {"broker", "redis", "triton"}
    for role, part in status.items():
        assert part["alive"] and part["healthy"], (role, part)
    assert status["broker"]["kind"] == "kafka"
    assert status["broker"]["endpoint"] == ep.kafka_bootstrap

    stack_dir = kafka_stack.stack.stack_dir
    state = json.loads((stack_dir / "stack.json").read_text())
    assert state["endpoints"]["triton_url"] == ep.triton_url
    for name in [k for k in os.environ if k.startswith("SHOPREC_")]:
        monkeypatch.delenv(name)  # real variables would win over the file
    from_env = Settings(_env_file=stack_dir / "stack.env")
    assert from_env.kafka_bootstrap == ep.kafka_bootstrap
    assert from_env.triton_url == ep.triton_url
    assert from_env.redis_url.get_secret_value() == ep.redis_url


def test_redis_answers(kafka_stack: Running) -> None:
    client = redis.Redis.from_url(kafka_stack.endpoints.redis_url)
    try:
        assert client.ping()
        client.set("infra:test", b"ok")
        assert client.get("infra:test") == b"ok"
    finally:
        client.close()


def test_triton_model_runs_in_the_venv_with_the_stack_env(kafka_stack: Running) -> None:
    assert infer_probe(kafka_stack.endpoints.triton_http) == [2.0, 4.0, 6.0, 8.0]
    info = json.loads(kafka_stack.probe_out.read_text())
    assert Path(info["prefix"]) == Path(sys.prefix)
    assert Path(info["shoprec"]).is_relative_to(REPO_ROOT)  # the editable install
    assert Path(info["infra"]).is_relative_to(REPO_ROOT)
    assert info["redis_url"] == kafka_stack.endpoints.redis_url
    assert info["hf_hub_offline"] == "1"
    assert info["transformers_offline"] == "1"
    with urllib.request.urlopen(f"http://{kafka_stack.endpoints.triton_metrics}/metrics") as r:
        assert b"nv_inference_request_success" in r.read()


def test_second_up_in_the_same_dir_is_refused(kafka_stack: Running) -> None:
    again = Stack(kafka_stack.stack.settings, model_repo=kafka_stack.stack.model_repo)
    with pytest.raises(StackError, match="already running"):
        again.up(components=("redis",))


async def test_kafka_keeps_messages_across_a_broker_restart(kafka_stack: Running) -> None:
    stack, bootstrap = kafka_stack.stack, kafka_stack.endpoints.kafka_bootstrap
    topic, value = f"infra-restart-{uuid.uuid4().hex[:8]}", uuid.uuid4().bytes
    await produce(bootstrap, topic, value)

    stack.stop_component("broker")
    host, port = bootstrap.split(":")
    assert not procs.port_open(host, int(port))
    assert stack.status()["broker"]["alive"] is False
    stack.start_component("broker", timeout_s=120)
    assert stack.status()["broker"]["healthy"] is True

    assert await consume_until(bootstrap, topic, value)


async def test_down_from_another_process_leaves_nothing(kafka_stack: Running) -> None:
    stack = kafka_stack.stack
    topic, value = f"infra-down-{uuid.uuid4().hex[:8]}", uuid.uuid4().bytes
    await produce(kafka_stack.endpoints.kafka_bootstrap, topic, value)
    state = json.loads(stack.state_path.read_text())
    recorded = [procs.Proc.from_json(part["kind"], part) for part in state["components"].values()]
    group_pids = [pid for proc in recorded for pid in procs.group_members(proc.pid)]
    assert len(group_pids) > len(recorded)  # Triton's stub is in Triton's group

    script = "from infra.stack import Stack; from shoprec.settings import Settings; "
    script += "Stack(Settings()).down()"
    env = {**os.environ, "SHOPREC_STACK_DIR": str(stack.stack_dir)}
    # Another cwd, so no .shoprec/stack.env of a developer's stack gets read.
    down = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, env=env, cwd=kafka_stack.root
    )
    assert await asyncio.wait_for(down.wait(), 120) == 0

    for proc in recorded:
        assert not procs.is_alive(proc), proc
        assert procs.group_members(proc.pid) == []
    assert [pid for pid in group_pids if running(pid)] == []
    assert processes_mentioning(str(kafka_stack.root)) == []
    assert not stack.state_path.exists()
    assert not stack.env_path.exists()
    assert stack.status() == {}

    # `down` keeps Kafka's data: a new `up`, on new ports, still has the topic.
    again = stack.up(components=("broker",), timeout_s=120)
    assert again.kafka_bootstrap != kafka_stack.endpoints.kafka_bootstrap
    assert await consume_until(again.kafka_bootstrap, topic, value)
    stack.down(wipe=True)
    assert not (stack.stack_dir / "kafka").exists()
    assert processes_mentioning(str(kafka_stack.root)) == []


async def test_tansu_broker_round_trip(tmp_path: Path) -> None:
    stack = Stack(stack_settings(tmp_path / "stack", broker="tansu"))
    with stack:
        ep = stack.up(components=("broker",), timeout_s=30)
        assert ep.broker == "tansu"
        assert ep.redis_url == "" and ep.triton_url == ""
        env_text = stack.env_path.read_text()
        assert f"SHOPREC_KAFKA_BOOTSTRAP={ep.kafka_bootstrap}" in env_text
        assert "SHOPREC_REDIS_URL" not in env_text
        pid = stack.status()["broker"]["pid"]
        await produce(ep.kafka_bootstrap, "infra-tansu", b"hello")
        assert await consume_until(ep.kafka_bootstrap, "infra-tansu", b"hello")
    assert not running(pid)
    assert processes_mentioning(str(tmp_path)) == []


def test_a_model_that_fails_to_load_fails_up_fast(tmp_path: Path) -> None:
    repo = write_model_repo(tmp_path / "models", tmp_path / "probe.json", broken=True)
    stack = Stack(stack_settings(tmp_path / "stack"), model_repo=repo)
    started = time.monotonic()
    with pytest.raises(StackError, match="deliberately broken") as err:
        stack.up(components=("triton",), timeout_s=120)
    assert time.monotonic() - started < 60
    assert "triton.log" in str(err.value)
    assert not stack.state_path.exists()
    assert processes_mentioning(str(tmp_path)) == []


def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    busy = Stack(stack_settings(tmp_path / "busy"))
    with busy:
        ep = busy.up(components=("redis",), timeout_s=30)
        port = int(ep.redis_url.rsplit(":", 1)[1].split("/")[0])
        settings = stack_settings(tmp_path / "other").model_copy(update={"redis_port": port})
        with pytest.raises(StackError, match=f"port {port} for redis is already in use"):
            Stack(settings).up(components=("redis",))
    assert processes_mentioning(str(tmp_path)) == []
