"""Nothing listens beyond loopback by default: Kafka, Redis, Triton (HTTP, gRPC, metrics),
the worker's Prometheus endpoint and the pull API bind 127.0.0.1, as the kernel's socket
table shows."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

import pytest

from bench.api import start_api
from infra import procs
from shoprec.settings import Settings
from tests.faults.harness import FaultStack, scenario_settings
from tests.worker import WorkerProcess

pytestmark = [pytest.mark.faults, pytest.mark.integration]

LISTEN = "0A"


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets in LISTEN state on ``port`` (IPv4 and IPv6)."""
    found: set[str] = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr_hex, port_hex = local.split(":")
            if state != LISTEN or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(addr_hex)
            # /proc prints each 32-bit word in host (little-endian) order.
            words = struct.unpack("<" + "I" * (len(raw) // 4), raw)
            found.add(socket.inet_ntop(family, struct.pack(">" + "I" * len(words), *words)))
    return found


def only_loopback(addresses: set[str]) -> bool:
    """Bound, and only to loopback (Java binds IPv4 loopback as ``::ffff:127.0.0.1``)."""

    def loopback(text: str) -> bool:
        ip = ipaddress.ip_address(text)
        mapped = getattr(ip, "ipv4_mapped", None)
        return ip.is_loopback or (mapped is not None and mapped.is_loopback)

    return bool(addresses) and all(loopback(a) for a in addresses)


def port_of(hostport: str) -> int:
    return int(hostport.rsplit(":", 1)[1])


def test_the_stack_binds_loopback_only(faults: FaultStack) -> None:
    e = faults.endpoints
    ports = {
        "kafka": port_of(e.kafka_bootstrap),
        "redis": port_of(e.redis_url.rsplit("/", 1)[0]),
        "triton grpc": port_of(e.triton_url),
        "triton http": port_of(e.triton_http),
        "triton metrics": port_of(e.triton_metrics),
    }
    for name, port in ports.items():
        assert only_loopback(listening_addresses(port)), (name, port, listening_addresses(port))


async def test_worker_metrics_bind_loopback_by_default(faults: FaultStack, logs: Path) -> None:
    assert Settings.model_fields["metrics_host"].default == "127.0.0.1"
    [port] = procs.free_ports(1)
    settings = scenario_settings(faults.endpoints, metrics_port=port)
    worker = await WorkerProcess(settings, logs / "worker.log").ready()
    try:
        await worker.wait_for("metrics on http://127.0.0.1")
        assert listening_addresses(port) == {"127.0.0.1"}, listening_addresses(port)
    finally:
        worker.stop()


def test_pull_api_binds_loopback_by_default(faults: FaultStack, logs: Path) -> None:
    assert Settings.model_fields["api_host"].default == "127.0.0.1"
    api = start_api(scenario_settings(faults.endpoints), logs / "api.log")
    try:
        port = int(api.url.rsplit(":", 1)[1])
        procs.wait_until(
            lambda: bool(listening_addresses(port)),
            60,
            "the pull API to listen",
            api.proc.log_path,
            proc=api.proc,
        )
        assert listening_addresses(port) == {"127.0.0.1"}, listening_addresses(port)
    finally:
        api.stop()
