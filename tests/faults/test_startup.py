"""Misconfiguration fails loudly at start-up instead of looping: a wrong Redis password
(a real Redis with AUTH) and an unreachable broker each stop the worker within seconds,
with a message that names the setting to fix and never the secret."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from infra import procs
from infra.redis_server import redis_binary
from shoprec.settings import Settings
from tests.faults.harness import FaultStack, scenario_settings

pytestmark = [pytest.mark.faults, pytest.mark.integration]

PASSWORD = "s3cret-Pa55word-7f1e"


def run_worker(settings: Settings, timeout_s: float = 90) -> tuple[int, str, float]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "worker"],
        env={**os.environ, **settings.as_env()},
        capture_output=True,
        timeout=timeout_s,
    )
    output = (done.stdout + done.stderr).decode(errors="replace")
    return done.returncode, output, time.monotonic() - start


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[int]:
    """A real redis-server that requires AUTH, with an ACL user beside the default one."""
    [port] = procs.free_ports(1)
    proc = subprocess.Popen(
        [
            redis_binary(),
            "--port",
            str(port),
            "--bind",
            procs.LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            PASSWORD,
            "--user",
            "shop",
            "on",
            f">{PASSWORD}",
            "~*",
            "&*",
            "+@all",
        ],
        stdout=(tmp_path / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port, password=PASSWORD).ping()
                break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_wrong_redis_password_fails_at_start(faults: FaultStack, redis_with_password: int) -> None:
    port = redis_with_password
    # The right ACL user and password work: the check is the password, not the server.
    assert redis.Redis.from_url(f"redis://shop:{PASSWORD}@127.0.0.1:{port}/0").ping()
    wrong = f"wrong-{PASSWORD[::-1]}"
    settings = scenario_settings(
        faults.endpoints, redis_url=f"redis://shop:{wrong}@127.0.0.1:{port}/0"
    )
    code, output, took = run_worker(settings)
    assert code != 0, output
    assert took < 60
    assert "SHOPREC_REDIS_URL" in output and "password" in output, output[-3000:]
    assert wrong not in output and PASSWORD not in output


def test_unreachable_broker_fails_at_start(faults: FaultStack) -> None:
    [closed] = procs.free_ports(1)  # nothing listens there
    settings = scenario_settings(
        faults.endpoints,
        kafka_bootstrap=f"127.0.0.1:{closed}",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_username="shop",
        kafka_sasl_password=PASSWORD,
    )
    code, output, took = run_worker(settings)
    assert code != 0, output
    assert took < 60, took
    assert "cannot reach Kafka" in output and "SHOPREC_KAFKA_BOOTSTRAP" in output, output[-3000:]
    assert PASSWORD not in output
